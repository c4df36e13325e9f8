"""Greedy accuracy of a policy on held-out examples of each domain."""

from __future__ import annotations

import torch

from copd_runtime.data.examples import Dataset
from copd_runtime.data.rewards import score
from copd_runtime.models.policy import Policy
from copd_runtime.rollout import sample


@torch.no_grad()
def accuracy(policy: Policy, dataset: Dataset, max_new_tokens: int, batch: int = 64) -> float:
    hits = 0.0
    for i in range(0, len(dataset.eval), batch):
        chunk = dataset.eval[i : i + batch]
        r = sample(policy, chunk, max_new_tokens, 1.0, greedy=True, logprobs=False)
        hits += sum(score(t, e.answer, dataset.reward) * (0.0 if tr else 1.0)
                    for t, e, tr in zip(r.responses, chunk, r.truncated.tolist()))
    return hits / max(1, len(dataset.eval))


def evaluate_all(policy: Policy, datasets: dict[str, Dataset], max_new_tokens: int) -> dict[str, float]:
    """Score per domain (branch datasets keyed by branch; reported by domain)."""
    return {ds.domain: round(accuracy(policy, ds, max_new_tokens), 4) for ds in datasets.values()}
