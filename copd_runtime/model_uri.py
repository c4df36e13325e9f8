"""Model URIs: where a base model comes from.

A model URI is a local directory (`/m`, `file:///m`), a directory inside the
run's storage (`storage://base/m`), or a model the runtime builds itself
(`builtin://tiny-qwen3`, `builtin://tiny-qwen3-vl`: shipped in the package,
see `builtin/build.py`), copied once into `<storage>/base-models/<name>`.
Nothing is downloaded from a model hub.
"""

from __future__ import annotations

from pathlib import Path

from copd_runtime.builtin.build import BUILTIN_MODELS, copy_shipped


def resolve_model_dir(uri: str, storage: Path) -> Path:
    """Turn a model URI into a local directory (a builtin model is copied from the package)."""
    if uri.startswith("builtin://"):
        name = uri.removeprefix("builtin://")
        if name not in BUILTIN_MODELS:
            raise ValueError(f"unknown builtin model {name!r}; known: {', '.join(BUILTIN_MODELS)}")
        target = storage / "base-models" / name
        if not (target / "config.json").exists():
            copy_shipped(name, target)  # the committed weights, checked against their SHA-256
        return target
    if uri.startswith("storage://"):
        return storage / uri.removeprefix("storage://")
    return Path(uri.removeprefix("file://"))
