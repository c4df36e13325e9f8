"""The builtin base models, by name: shipped in the repository, and how they were built.

`builtin://tiny-qwen3` and `builtin://tiny-qwen3-vl` are tiny (~0.4 MB and ~0.7 MB of fp32
safetensors), so their weights are committed under `copd_runtime/builtin/weights/<name>/`
with their SHA-256 in `weights/SHA256SUMS.json`: every machine starts from the same bytes
(a warm start re-run elsewhere is not guaranteed to round the same way on another CPU).
`python -m copd_runtime.builtin.build` (`make builtin-models`) rebuilds them from the
builders, single-threaded with torch's deterministic algorithms, and rewrites the sums;
two builds on one machine are bit-identical (tests/model/test_builtin_models.py).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import shutil
import sys
from pathlib import Path

import torch

from copd_runtime.builtin.tiny_text import build_tiny_qwen3
from copd_runtime.builtin.tiny_vlm import build_tiny_qwen3_vl
from copd_runtime.models.policy import atomic_dir, save_policy

BUILTIN_MODELS = ("tiny-qwen3", "tiny-qwen3-vl")
SHIPPED = Path(__file__).parent / "weights"
SUMS = SHIPPED / "SHA256SUMS.json"


@contextlib.contextmanager
def deterministic():
    """One intra-op thread and torch's deterministic kernels, restored afterwards."""
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(det)
        torch.set_num_threads(threads)


def build_builtin(name: str, dest: Path) -> None:
    """Build a builtin model from scratch into `dest` (deterministic on one machine)."""
    with deterministic():
        if name == "tiny-qwen3":
            policy = build_tiny_qwen3()
        elif name == "tiny-qwen3-vl":
            policy = build_tiny_qwen3_vl()
        else:
            raise ValueError(f"unknown builtin model {name!r}")
        save_policy(policy, dest)


def file_sums(model_dir: Path) -> dict[str, str]:
    """SHA-256 of every file of a model directory, by file name."""
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(Path(model_dir).iterdir())
            if f.is_file()}


def shipped_sums() -> dict[str, dict[str, str]]:
    return json.loads(SUMS.read_text())


def weights_sha256(name: str) -> str:
    """The recorded SHA-256 of a builtin model's model.safetensors (what comparison.json records)."""
    return shipped_sums()[name]["model.safetensors"]


def copy_shipped(name: str, dest: Path) -> None:
    """Copy a shipped builtin model to `dest`, refusing files whose SHA-256 is not the recorded one."""
    if name not in BUILTIN_MODELS:
        raise ValueError(f"unknown builtin model {name!r}; known: {', '.join(BUILTIN_MODELS)}")
    src = SHIPPED / name
    want = shipped_sums().get(name)
    if not want or not (src / "model.safetensors").exists():
        raise FileNotFoundError(f"{src}: the shipped {name} weights are missing (make builtin-models rebuilds them)")
    got = file_sums(src)
    if got != want:
        bad = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
        raise ValueError(f"{src}: files differ from SHA256SUMS.json: {bad}")
    with atomic_dir(dest) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m copd_runtime.builtin.build",
                                 description="Rebuild the shipped builtin models and their SHA256SUMS.json.")
    ap.add_argument("--out", type=Path, default=SHIPPED)
    ap.add_argument("names", nargs="*", default=list(BUILTIN_MODELS))
    args = ap.parse_args(argv)
    sums_path = args.out / "SHA256SUMS.json"
    sums = json.loads(sums_path.read_text()) if sums_path.exists() else {}
    for name in args.names:
        dest = args.out / name
        if dest.exists():
            shutil.rmtree(dest)
        build_builtin(name, dest)
        sums[name] = file_sums(dest)
        print(f"{name}: model.safetensors sha256 {sums[name]['model.safetensors']}")
    sums_path.write_text(json.dumps(sums, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
