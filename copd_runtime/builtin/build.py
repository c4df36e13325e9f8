"""The builtin base models, by name."""

from __future__ import annotations

from pathlib import Path

from copd_runtime.builtin.tiny_text import build_tiny_qwen3
from copd_runtime.builtin.tiny_vlm import build_tiny_qwen3_vl
from copd_runtime.models.policy import save_policy

BUILTIN_MODELS = ("tiny-qwen3", "tiny-qwen3-vl")


def build_builtin(name: str, dest: Path) -> None:
    if name == "tiny-qwen3":
        save_policy(build_tiny_qwen3(), dest)
    elif name == "tiny-qwen3-vl":
        save_policy(build_tiny_qwen3_vl(), dest)
    else:
        raise ValueError(f"unknown builtin model {name!r}")
