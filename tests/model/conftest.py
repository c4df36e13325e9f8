import pytest
import torch

from copd_runtime.builtin.tiny_text import build_tiny_qwen3
from copd_runtime.models.policy import save_policy


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """Two slightly different tiny Qwen3 directories (a, b) and their common base."""
    root = tmp_path_factory.mktemp("tiny")
    base = build_tiny_qwen3(seed=0, warm_steps=30)
    save_policy(base, root / "base")
    for name, seed in (("a", 1), ("b", 2)):
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in base.model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        save_policy(base, root / name)
    return {n: root / n for n in ("base", "a", "b")}
