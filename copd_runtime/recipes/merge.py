"""Merging branch checkpoints into one policy, written as a normal HF model directory.

- linear: θ = Σ_k w_k θ_k with weights normalised to sum 1;
- task arithmetic: θ = θ_base + λ · Σ_k w_k (θ_k − θ_base).
Every tensor is merged in float32 and cast back to its stored dtype. Config,
tokenizer/processor files are copied from the first branch.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from copd_runtime.models.policy import atomic_dir


def linear_merge(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    total = sum(weights)
    if total <= 0:
        raise ValueError("merge weights must not all be 0")
    w = [x / total for x in weights]
    _check_same_keys(states)
    return {
        name: sum(wk * s[name].float() for wk, s in zip(w, states)).to(states[0][name].dtype)
        for name in states[0]
    }


def task_arithmetic_merge(
    base: dict[str, torch.Tensor], states: list[dict[str, torch.Tensor]], weights: list[float], scale: float
) -> dict[str, torch.Tensor]:
    _check_same_keys([base, *states])
    return {
        name: (base[name].float() + scale * sum(wk * (s[name].float() - base[name].float())
                                                for wk, s in zip(weights, states))).to(base[name].dtype)
        for name in base
    }


def _check_same_keys(states: list[dict[str, torch.Tensor]]) -> None:
    keys = set(states[0])
    for s in states[1:]:
        if set(s) != keys:
            raise ValueError(f"checkpoints differ in tensors: {sorted(keys ^ set(s))[:5]}")


def read_state(model_dir: Path) -> dict[str, torch.Tensor]:
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(f))
    return state


def merge_dirs(
    branch_dirs: list[Path], weights: list[float], out: Path, method: str = "linear",
    base_dir: Path | None = None, scale: float = 1.0,
) -> Path:
    states = [read_state(d) for d in branch_dirs]
    if method == "linear":
        merged = linear_merge(states, weights)
    elif method == "task-arithmetic":
        if base_dir is None:
            raise ValueError("task-arithmetic needs the base model")
        merged = task_arithmetic_merge(read_state(base_dir), states, weights, scale)
    else:
        raise ValueError(f"unknown merge method {method!r}")
    with atomic_dir(out) as tmp:
        for f in Path(branch_dirs[0]).iterdir():
            if f.is_file() and f.suffix != ".safetensors" and f.name not in {"optimizer.pt", "rng.pt", "state.json"} \
                    and not f.name.endswith(".safetensors.index.json"):
                shutil.copy2(f, tmp / f.name)
        save_file({k: v.contiguous() for k, v in merged.items()}, tmp / "model.safetensors",
                  metadata={"format": "pt"})
    return out
