"""What every job of the comparison shares: the base model, the datasets, the scoring.

The datasets are generated once (data seed `dataSeed`) and written as JSONL files
under `<output>/storage/data/`; the evaluation here and every CoPDRun the
methods build read those same files, so all methods and seeds train and are
scored on the same examples.
"""

from __future__ import annotations

import copy
import random
from pathlib import Path

import torch

from copd_core.seeding import step_seed
from copd_core.spec import DatasetSpec, RewardSpec
from copd_runtime.data.datasets import default_reward, load_dataset, write_jsonl
from copd_runtime.data.examples import Dataset
from copd_runtime.hub import InProcessHub
from copd_runtime.model_uri import resolve_model_dir
from copd_runtime.models.policy import Policy, load_policy
from copd_runtime.recipes.evaluate import accuracy
from copd_runtime.recipes.grpo import grpo_step
from experiments.compare.interference import CONFLICTING, CONFLICTING_REWARD, split_examples
from experiments.compare.spec import CompareSpec


def data_dir(storage: Path) -> Path:
    return Path(storage) / "data"


def dataset_spec(storage: Path, domain: str) -> DatasetSpec:
    d = data_dir(storage).resolve()
    return DatasetSpec(path=str(d / f"{domain}.train.jsonl"), eval_path=str(d / f"{domain}.eval.jsonl"))


def reward_spec(domain: str) -> RewardSpec:
    return CONFLICTING_REWARD.get(domain) or default_reward(domain)


def write_datasets(spec: CompareSpec, storage: Path) -> None:
    """The domains at `dataSeed` (train: the builtin size, eval: `evalSize`), as JSONL. Idempotent.
    The conflicting benchmark's domains come from `interference.split_examples` (same hash split)."""
    for d in spec.domains:
        ds = dataset_spec(storage, d)
        if Path(ds.path).exists() and Path(ds.eval_path).exists():
            continue
        if d in CONFLICTING:
            write_jsonl(Path(ds.eval_path), split_examples(d, spec.eval_size, spec.data_seed, "eval"))
            write_jsonl(Path(ds.path), split_examples(d, DatasetSpec(builtin="arith").size, spec.data_seed, "train"))
            continue
        gen = load_dataset(d, DatasetSpec(builtin=d), None, storage, spec.data_seed, eval_size=spec.eval_size)
        write_jsonl(Path(ds.eval_path), gen.eval)
        write_jsonl(Path(ds.path), gen.train)


class Branch:
    """A policy with its own AdamW state, trained in memory (mixed RLVR, the pilot)."""

    def __init__(self, name: str, base: Policy, lr: float):
        self.name = name
        self.policy = copy.deepcopy(base)
        self.optimizer = torch.optim.AdamW(self.policy.model.parameters(), lr=lr, weight_decay=0.0)
        self.rl_steps = 0


class MemoryHub(InProcessHub):
    """The in-process hub, serving frozen in-memory snapshots instead of directories (the pilot)."""

    def __init__(self, teachers: dict[str, Policy], temperature: float):
        super().__init__({n: Path(f"<memory:{n}>") for n in teachers}, temperature)
        for name, p in teachers.items():
            snap = copy.deepcopy(p)
            snap.model.requires_grad_(False)
            snap.model.eval()
            self._teachers[name] = snap


class Ctx:
    """Everything a job needs: spec, base policy, datasets. Built once per worker process."""

    def __init__(self, spec: CompareSpec, storage: Path):
        self.spec = spec
        self.storage = Path(storage).resolve()
        write_datasets(spec, self.storage)
        self.base = load_policy(resolve_model_dir(spec.base_uri(), self.storage))
        self.data: dict[str, Dataset] = {
            d: load_dataset(d, dataset_spec(self.storage, d), reward_spec(d), self.storage, spec.data_seed)
            for d in spec.domains
        }
        self._base_eval: dict[str, float] | None = None

    def branch(self, name: str) -> Branch:
        return Branch(name, self.base, self.spec.rl.learning_rate)

    def evaluate(self, policy: Policy) -> dict[str, float]:
        return {d: round(accuracy(policy, ds, self.spec.rl.max_new_tokens), 4) for d, ds in self.data.items()}

    def evaluate_dir(self, model_dir: Path) -> dict[str, float]:
        return self.evaluate(load_policy(model_dir))

    @property
    def base_eval(self) -> dict[str, float]:
        if self._base_eval is None:
            self._base_eval = self.evaluate(self.base)
        return self._base_eval


def seeded(seed: int, *parts) -> random.Random:
    """Seed torch and return a Python RNG for one step, from (seed, *parts)."""
    s = step_seed(seed, *parts)
    torch.manual_seed(s)
    return random.Random(s)


def do_rl(ctx: Ctx, b: Branch, n: int, seed: int) -> None:
    """`n` GRPO steps of an in-memory branch on its own domain (the pilot's teachers)."""
    for _ in range(n):
        rng = seeded(seed, "RL", b.name, b.rl_steps)
        grpo_step(b.policy, b.optimizer, ctx.data[b.name], ctx.spec.rl, rng)
        b.rl_steps += 1
