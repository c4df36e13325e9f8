"""Merging branch checkpoints into one policy, written as a normal HF model directory.

- linear: θ = Σ_k w_k θ_k with weights normalised to sum 1;
- task arithmetic: θ = θ_base + λ · Σ_k w_k (θ_k − θ_base).
Every tensor is merged in float32 and cast back to its stored dtype. Config,
tokenizer/processor files are copied from the first branch.

`merge_dirs` streams: it reads one block of rows of one tensor at a time from each of the K
branch directories (and the base), each through its own short-lived `safe_open`, adds it
into a float32 accumulator and puts the result into the output shard being filled; a full
shard is written and dropped. Peak memory is a few float32 blocks (`BLOCK_ELEMENTS`) plus
one output shard (`max_shard_bytes`), whatever K and the model size. The
output is sharded as Hugging Face shards (`model-00001-of-0000N.safetensors` plus
`model.safetensors.index.json`; one `model.safetensors` when it fits one shard), which
`from_pretrained` loads. `linear_merge` / `task_arithmetic_merge` are the same sums
over state dicts held in memory (the reference the tests compare with).
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import torch
from huggingface_hub import split_state_dict_into_shards_factory  # installed with transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from copd_runtime.models.policy import atomic_dir

# Hugging Face's default is 50 GB; smaller shards bound the merge's memory (one shard is held)
DEFAULT_MAX_SHARD_BYTES = 2 * 10**9
INDEX = "model.safetensors.index.json"
NOT_COPIED = {"optimizer.pt", "rng.pt", "state.json", "manifest.json", INDEX}
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def _linear_one(load: Callable[[int], torch.Tensor], w: list[float], dtype: torch.dtype) -> torch.Tensor:
    """Σ_k w_k θ_k in float32 (w normalised), one branch tensor in memory at a time."""
    acc: torch.Tensor | int = 0
    for k, wk in enumerate(w):
        acc = acc + wk * load(k).float()
    return acc.to(dtype)


def _task_arithmetic_one(base: torch.Tensor, load: Callable[[int], torch.Tensor], weights: list[float],
                         scale: float) -> torch.Tensor:
    b = base.float()
    acc: torch.Tensor | int = 0
    for k, wk in enumerate(weights):
        acc = acc + wk * (load(k).float() - b)
    return (b + scale * acc).to(base.dtype)


def _normalised(weights: list[float]) -> list[float]:
    total = sum(weights)
    if total <= 0:
        raise ValueError("merge weights must not all be 0")
    return [x / total for x in weights]


def linear_merge(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    w = _normalised(weights)
    _check_same_keys(states)
    return {name: _linear_one(lambda k, n=name: states[k][n], w, states[0][name].dtype) for name in states[0]}


def task_arithmetic_merge(
    base: dict[str, torch.Tensor], states: list[dict[str, torch.Tensor]], weights: list[float], scale: float
) -> dict[str, torch.Tensor]:
    _check_same_keys([base, *states])
    return {name: _task_arithmetic_one(base[name], lambda k, n=name: states[k][n], weights, scale)
            for name in base}


def _check_same_keys(states: list[dict[str, torch.Tensor]]) -> None:
    keys = set(states[0])
    for s in states[1:]:
        if set(s) != keys:
            raise ValueError(f"checkpoints differ in tensors: {sorted(keys ^ set(s))[:5]}")


def read_state(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model directory, in memory (the in-memory reference path)."""
    state: dict[str, torch.Tensor] = {}
    for f in _weight_files(Path(model_dir)):
        state.update(load_file(f))
    return state


def _weight_files(model_dir: Path) -> list[Path]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors")
    return files


def _header(path: Path) -> dict:
    """A safetensors file's header (names → dtype, shape, offsets), read without touching the data."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        head = json.loads(f.read(n))
    head.pop("__metadata__", None)
    return head


class _Tensors:
    """The tensors of one model directory, by name: which file holds each (from the headers), and
    rows of each read through a short-lived `safe_open` (closed, its mapping dropped, once read)."""

    def __init__(self, model_dir: Path):
        self.dir = Path(model_dir)
        self.file: dict[str, Path] = {}
        self.info: dict[str, tuple[torch.dtype, list[int]]] = {}
        for f in _weight_files(self.dir):
            for name, h in _header(f).items():
                self.file[name] = f
                self.info[name] = (_DTYPES[h["dtype"]], h["shape"])

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of a tensor (the whole of a 0-d one), as float32 (a fresh copy)."""
        with safe_open(self.file[name], framework="pt", device="cpu") as f:
            t = f.get_tensor(name) if not self.info[name][1] else f.get_slice(name)[start:stop]
            return t.to(torch.float32, copy=True)


BLOCK_ELEMENTS = 2**24  # rows of a tensor merged at a time: ~64 MB per float32 copy


def _merged_tensor(name: str, branches: list[_Tensors], w: list[float], base: _Tensors | None, scale: float,
                   dtype: torch.dtype) -> torch.Tensor:
    """One merged tensor, computed a block of rows at a time with the operations of `_linear_one` /
    `_task_arithmetic_one` in the same order (done in place: bit for bit the same result)."""
    shape = branches[0].info[name][1]
    out = torch.empty(shape, dtype=dtype)
    n_rows = shape[0] if shape else 1
    per_row = max(1, torch.Size(shape[1:]).numel()) if shape else 1
    step = max(1, BLOCK_ELEMENTS // per_row)
    for s in range(0, n_rows, step):
        e = min(n_rows, s + step)
        b = base.rows(name, s, e) if base is not None else None
        acc = None
        for k, wk in enumerate(w):
            d = branches[k].rows(name, s, e)
            if b is not None:
                d.sub_(b)
            d.mul_(wk)
            acc = d if acc is None else acc.add_(d)
            del d
        if b is not None:
            acc = acc.mul_(scale).add_(b)
        if shape:
            out[s:e] = acc.to(dtype)
        else:
            out = acc.to(dtype)
        del acc, b
    return out


def merge_dirs(
    branch_dirs: list[Path], weights: list[float], out: Path, method: str = "linear",
    base_dir: Path | None = None, scale: float = 1.0, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    if method not in ("linear", "task-arithmetic"):
        raise ValueError(f"unknown merge method {method!r}")
    if method == "task-arithmetic" and base_dir is None:
        raise ValueError("task-arithmetic needs the base model")
    branches = [_Tensors(d) for d in branch_dirs]
    base = _Tensors(base_dir) if method == "task-arithmetic" else None
    keys = set(branches[0].file)
    for t in [*branches[1:], *([base] if base else [])]:
        if set(t.file) != keys:
            raise ValueError(f"checkpoints differ in tensors: {sorted(keys ^ set(t.file))[:5]}")
    # the output tensor's dtype: the first branch's (linear) or the base's (task arithmetic)
    ref = base or branches[0]
    w = _normalised(weights) if method == "linear" else list(weights)

    split = split_state_dict_into_shards_factory(
        {n: ref.info[n] for n in sorted(keys)}, filename_pattern="model{suffix}.safetensors",
        max_shard_size=max_shard_bytes,
        get_storage_size=lambda i: torch.Size(i[1]).numel() * torch.empty((), dtype=i[0]).element_size())
    with atomic_dir(out) as tmp:
        for f in Path(branch_dirs[0]).iterdir():
            if f.is_file() and f.suffix != ".safetensors" and f.name not in NOT_COPIED:
                shutil.copy2(f, tmp / f.name)
        for filename, names in split.filename_to_tensors.items():
            shard = {n: _merged_tensor(n, branches, w, base, scale, ref.info[n][0]) for n in names}
            save_file(shard, tmp / filename, metadata={"format": "pt"})
            del shard
        if split.is_sharded:
            (tmp / INDEX).write_text(json.dumps(
                {"metadata": split.metadata, "weight_map": dict(sorted(split.tensor_to_filename.items()))},
                indent=2))
    return out


def merge_in_memory(branch_dirs: list[Path], weights: list[float], method: str = "linear",
                    base_dir: Path | None = None, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """The same merge with every state dict in memory: K+1 whole models (the reference; small models)."""
    states = [read_state(d) for d in branch_dirs]
    if method == "linear":
        return linear_merge(states, weights)
    if base_dir is None:
        raise ValueError("task-arithmetic needs the base model")
    return task_arithmetic_merge(read_state(base_dir), states, weights, scale)
