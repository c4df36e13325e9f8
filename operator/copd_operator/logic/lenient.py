"""Pure: read a CoPDRun the operator's own model does not fully know, without failing it.

A CRD newer than the operator may admit spec fields this operator's model forbids
(`extra="forbid"`, which keeps `copd run` strict about typos). On a cluster that must
not fail every run: `parse_lenient` drops exactly the unknown fields, parses the rest
strictly, and returns the dropped paths, which the cycle reports as condition
`SpecWarning` (reason UnknownFields) and an Event. Any other problem still raises
SpecError. Pods get the spec as this operator parsed it (without those fields).
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import ValidationError

from copd_core.spec import CoPDRunManifest, SpecError, parse_manifest

_MAX_PASSES = 8  # unknown fields inside a list item can hide others in the same pass; a few passes suffice


def _drop(doc: Any, loc: tuple) -> bool:
    """Remove doc[loc[0]][loc[1]]...; False when the path does not lead to a dict key."""
    node = doc
    for part in loc[:-1]:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        else:
            return False
    if isinstance(node, dict) and loc and loc[-1] in node:
        del node[loc[-1]]
        return True
    return False


def _path(loc: tuple) -> str:
    out = ""
    for p in loc:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def parse_lenient(doc: dict) -> tuple[CoPDRunManifest, tuple[str, ...]]:
    """(manifest, unknown field paths dropped). Raises SpecError for anything but unknown fields."""
    try:
        return parse_manifest(doc), ()
    except SpecError:
        pass
    work, dropped = copy.deepcopy(doc), []
    for _ in range(_MAX_PASSES):
        try:
            return CoPDRunManifest.model_validate(work), tuple(dropped)
        except ValidationError as err:
            extra = [tuple(e["loc"]) for e in err.errors() if e["type"] == "extra_forbidden"]
            removed = [loc for loc in extra if _drop(work, loc)]
            if not removed:
                break
            dropped.extend(_path(loc) for loc in removed)
    parse_manifest(work)  # raises SpecError naming what is still wrong
    raise SpecError("cannot drop the unknown fields")  # pragma: no cover - parse_manifest raised above
