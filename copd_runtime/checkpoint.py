"""Branch checkpoints: weights (safetensors), optimizer, RNG and counters, written atomically.

Layout: `<storage>/branches/<branch>/checkpoints/c{cycle:03d}-{stage}-s{step:05d}/`
with the HF model files, `optimizer.pt`, `rng.pt` and `state.json`. A directory
only appears under its final name once complete (temp dir + rename), so the
newest directory is always a complete checkpoint: a trainer killed at any moment
resumes from it.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from copd_runtime.models.policy import Policy, atomic_dir, save_policy

STAGE_ORDER = {"RL": 0, "OPD": 1}


@dataclass(frozen=True, order=True)
class Counters:
    cycle: int
    stage: str  # "RL" | "OPD"
    step: int  # steps completed in that stage
    stage_steps: int  # steps the stage has in total

    @property
    def stage_done(self) -> bool:
        return self.step >= self.stage_steps

    def key(self) -> tuple[int, int, int]:
        return (self.cycle, STAGE_ORDER[self.stage], self.step)

    def dirname(self) -> str:
        return f"c{self.cycle:03d}-{self.stage}-s{self.step:05d}"


def branch_dir(storage: Path, branch: str) -> Path:
    return storage / "branches" / branch


def list_checkpoints(storage: Path, branch: str) -> list[tuple[Counters, Path]]:
    root = branch_dir(storage, branch) / "checkpoints"
    out = []
    for d in root.glob("c*-*-s*"):
        state = d / "state.json"
        if state.exists():
            out.append((Counters(**json.loads(state.read_text())), d))
    return sorted(out, key=lambda x: x[0].key())


def latest_checkpoint(storage: Path, branch: str, before: tuple[int, str] | None = None):
    """Newest complete checkpoint, optionally strictly before stage (cycle, stage) began."""
    cks = list_checkpoints(storage, branch)
    if before is not None:
        bound = (before[0], STAGE_ORDER[before[1]])
        cks = [c for c in cks if c[0].key()[:2] < bound]
    return cks[-1] if cks else None


def save_checkpoint(storage: Path, branch: str, policy: Policy, optimizer, counters: Counters, keep: int = 3):
    final = branch_dir(storage, branch) / "checkpoints" / counters.dirname()
    with atomic_dir(final) as tmp:
        save_policy(policy, tmp)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        rng = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state()  # this rank's device
        torch.save(rng, tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps(asdict(counters)))
    _gc(storage, branch, keep)
    return final


def _gc(storage: Path, branch: str, keep: int) -> None:
    """Keep the newest `keep` checkpoints and the two newest stage-final ones: the stage that
    just ended is the frozen teacher a peer's hub may still be loading."""
    cks = list_checkpoints(storage, branch)
    protected = set([p for c, p in cks if c.stage_done][-2:])
    for _, p in cks[:-keep]:
        if p not in protected:
            shutil.rmtree(p, ignore_errors=True)


def load_optimizer_and_rng(ckpt: Path, optimizer) -> None:
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=False, map_location=_device_of(optimizer)))
    rng = torch.load(ckpt / "rng.pt", weights_only=False, map_location="cpu")
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])


def _device_of(optimizer) -> torch.device:
    for g in optimizer.param_groups:
        for p in g["params"]:
            return p.device
    return torch.device("cpu")
