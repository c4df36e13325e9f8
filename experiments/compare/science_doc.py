"""docs/science.md's tables are the committed outputs, copied in by this, never by hand.

    python -m experiments.compare.science_doc [--check]

Between `<!-- include: PATH -->` and `<!-- end include -->` the document holds the file PATH (relative
to the repository root, e.g. docs/science/conflicting/comparison.md, as `make compare` wrote it), its
headings moved down by `demote` levels (`<!-- include: PATH demote=2 -->`) and its relative links made
relative to the document (`](scores.png)` → `](science/scores.png)`). Without --check the
blocks are rewritten in place; with --check nothing is written and the exit status is 1 when a block
differs from its file (the test suite runs the check).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "science.md"
BLOCK = re.compile(r"(<!-- include: (?P<path>\S+)(?: demote=(?P<demote>\d+))? -->\n)(?P<body>.*?)(<!-- end include -->)", re.S)


def _demoted(text: str, levels: int) -> str:
    return re.sub(r"^(#+) ", lambda m: "#" * (len(m.group(1)) + levels) + " ", text, flags=re.M)


def _rebased(text: str, prefix: str) -> str:
    """Relative link targets of an included file, seen from the including document."""
    return re.sub(r"\]\((?![a-z]+:|/|#)([^)]+)\)", lambda m: f"]({prefix}{m.group(1)})", text) if prefix else text


def render(doc: str, root: Path = ROOT, doc_dir: str = "docs") -> str:
    """The document (in `doc_dir`, relative to `root`) with every include block holding its file's text."""
    def fill(m: re.Match) -> str:
        path = root / m.group("path")
        if not path.is_file():
            raise FileNotFoundError(f"docs/science.md includes {m.group('path')}, which does not exist")
        rel = os.path.relpath(path.parent, root / doc_dir)
        body = _rebased(path.read_text().strip("\n"), "" if rel == "." else rel + "/")
        body = _demoted(body, int(m.group("demote") or 0))
        return f"{m.group(1)}{body}\n{m.group(5)}"

    return BLOCK.sub(fill, doc)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.compare.science_doc", description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only check; exit 1 if a block is stale")
    ap.add_argument("--doc", type=Path, default=DOC)
    a = ap.parse_args(argv)
    old = a.doc.read_text()
    new = render(old)
    if a.check:
        stale = [m.group("path") for m, n in zip(BLOCK.finditer(old), BLOCK.finditer(new), strict=True)
                 if m.group("body") != n.group("body")]
        print("stale: " + ", ".join(stale) if stale else f"{a.doc}: every included table is current")
        return 1 if stale else 0
    a.doc.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
