"""Model URIs: where a base model comes from.

A model URI is a local directory (`/m`, `file:///m`), a directory inside the
run's storage (`storage://base/m`), or a model the runtime builds itself
(`builtin://tiny-qwen3`, `builtin://tiny-qwen3-vl`), materialised once into
`<storage>/base-models/<name>`. Nothing is downloaded from a model hub.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from copd_runtime.builtin.build import BUILTIN_MODELS, build_builtin
from copd_runtime.models.policy import atomic_dir

BUILTIN_VERSION = "v2"  # bump when a builtin builder changes what it makes


def _builtin_cache() -> Path:
    """Builtin models are deterministic: build each once per machine, copy into each run's storage."""
    return Path(os.environ.get("COPD_MODEL_CACHE", Path.home() / ".cache" / "copd-operator" / "models"))


def resolve_model_dir(uri: str, storage: Path) -> Path:
    """Turn a model URI into a local directory, building a builtin model if needed."""
    if uri.startswith("builtin://"):
        name = uri.removeprefix("builtin://")
        if name not in BUILTIN_MODELS:
            raise ValueError(f"unknown builtin model {name!r}; known: {', '.join(BUILTIN_MODELS)}")
        target = storage / "base-models" / name
        if not (target / "config.json").exists():
            cached = _builtin_cache() / f"{name}-{BUILTIN_VERSION}"
            if not (cached / "config.json").exists():
                with atomic_dir(cached) as tmp:
                    build_builtin(name, tmp)
            with atomic_dir(target) as tmp:
                shutil.copytree(cached, tmp, dirs_exist_ok=True)
        return target
    if uri.startswith("storage://"):
        return storage / uri.removeprefix("storage://")
    return Path(uri.removeprefix("file://"))
