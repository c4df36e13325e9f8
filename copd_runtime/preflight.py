"""Check every input a run refers to before any work starts.

A missing dataset, a malformed JSONL line or a broken model directory used to be
found minutes into a run, as a traceback (locally) or as a trainer pod failing its
retries (on a cluster). `check_inputs` looks at everything the spec names, in the
order a user reads the manifest, and returns the problems as (spec field, path,
what is wrong); the CLI prints the first as one line and exits 2.

Reads files only: no torch, no model load. A model directory is checked for what
`load_policy` needs (a parseable config.json, weights, a tokenizer; a processor
config for a VLM); a JSONL dataset line by line, media paths included.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from copd_core.spec import CoPDRunSpec, DatasetSpec

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


@dataclass(frozen=True)
class InputProblem:
    field: str  # the spec field, as a user writes it: spec.branches[1].dataset.path
    path: str
    problem: str

    def line(self) -> str:
        return f"{self.field}: {self.path}: {self.problem}"


def _resolve(path: str, storage: Path) -> Path:
    p = Path(path.removeprefix("file://"))
    return p if p.is_absolute() else storage / p


def model_dir_problem(path: Path, kind: str = "auto") -> str | None:
    """What keeps `load_policy(path)` from working, or None."""
    if not path.exists():
        return "no such directory"
    if not path.is_dir():
        return "not a directory"
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        return "not a Hugging Face model directory (no config.json)"
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"config.json is not valid JSON ({e})"
    if not isinstance(cfg, dict) or "model_type" not in cfg:
        return "config.json has no model_type"
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        return f"no weights ({' or '.join(WEIGHT_FILES[:2])})"
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        return "no tokenizer (tokenizer.json or tokenizer_config.json)"
    vlm = kind == "vlm" or (kind == "auto" and "vision_config" in cfg)
    if vlm and not any((path / f).is_file() for f in PROCESSOR_FILES):
        return "a VLM without a processor (preprocessor_config.json)"
    return None


def jsonl_problem(path: Path) -> str | None:
    """What keeps `read_jsonl(path)` from working, or None. Media paths resolve beside the file."""
    if not path.exists():
        return "no such file"
    if not path.is_file():
        return "not a file"
    n = 0
    try:
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    d = json.loads(line)
                except json.JSONDecodeError as e:
                    return f"line {i}: not JSON ({e.msg})"
                if not isinstance(d, dict) or not isinstance(d.get("prompt"), str) or "answer" not in d:
                    return f"line {i}: not a {{\"prompt\": str, \"answer\": ...}} record"
                for key in ("images", "video"):
                    media = d.get(key, [])
                    if not isinstance(media, list):
                        return f"line {i}: {key} must be a list of paths"
                    for m in media:
                        mp = Path(str(m))
                        mp = mp if mp.is_absolute() else path.parent / mp
                        if not mp.is_file():
                            return f"line {i}: {key} file {mp} does not exist"
                n += 1
    except UnicodeDecodeError:
        return "not UTF-8 text"
    except OSError as e:
        return f"cannot read ({e.strerror})"
    return None if n else "no examples"


def _dataset_problems(field: str, ds: DatasetSpec, storage: Path) -> list[InputProblem]:
    out = []
    for name, value in (("path", ds.path), ("evalPath", ds.eval_path)):
        if value is None:
            continue
        p = _resolve(value, storage)
        problem = jsonl_problem(p)
        if problem:
            out.append(InputProblem(f"{field}.{name}", str(p), problem))
    return out


def check_inputs(spec: CoPDRunSpec, storage: Path, branches: list[str] | None = None) -> list[InputProblem]:
    """Every problem with the files `spec` names (only `branches`' datasets when given)."""
    storage = Path(storage)
    problems = []
    uri = spec.base_model.uri
    if not uri.startswith("builtin://"):  # builtin names are checked by the spec; they are built here
        path = storage / uri.removeprefix("storage://") if uri.startswith("storage://") else _resolve(uri, storage)
        problem = model_dir_problem(path, spec.base_model.kind)
        if problem:
            problems.append(InputProblem("spec.baseModel.uri", str(path), problem))
    for i, b in enumerate(spec.branches):
        if branches is None or b.name in branches:
            problems.extend(_dataset_problems(f"spec.branches[{i}].dataset", b.dataset, storage))
    return problems
