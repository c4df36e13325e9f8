"""The conflicting benchmark's base model: the shipped tiny-qwen3, warm-started on both conventions.

    python -m experiments.compare.conflict_base --output experiments/compare/bases/tiny-qwen3-conflict

The shipped base (`builtin://tiny-qwen3`) never saw the conflicting domains' prompts ("7 8=", no
prefix): sampled at T = 1 it scores 0 on `plain` and on `boxed` (it answers "\\boxed{9}..."), so RL
from it would have no reward signal. This continues the builtin's own SFT warm start
(`sft_warm_start`: AdamW, lr 3e-3, batch 32, seed 0) for `--steps` (100) steps on the TRAIN
prompts of both domains, each prompt once with each answer: a base that answers in either
convention, so that RL on one domain has signal and pulls away from the other. These settings were
fixed before any comparison ran on this benchmark; the script then reports the precondition it
was built for (sampled reward > 0 on both domains) and the greedy scores.

The weights are committed (they are ~0.4 MB) with `SHA256SUMS.json`; the comparison records the
model's SHA-256 in `comparison.json`, so every machine starts from the same bytes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from copd_runtime.builtin.build import file_sums
from copd_runtime.builtin.warm_start import sft_warm_start
from copd_runtime.model_uri import resolve_model_dir
from copd_runtime.models.policy import load_policy
from copd_runtime.recipes.evaluate import accuracy
from experiments.compare.interference import CONFLICTING, CONFLICTING_REWARD, split_examples

STEPS = 100
TRAIN = 512  # examples per domain (the builtin dataset size); the same prompts for both


def build(out: Path, steps: int = STEPS, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    policy = load_policy(resolve_model_dir("builtin://tiny-qwen3", out.parent / ".conflict-base-storage"))
    rows = [ex for d in CONFLICTING for ex in split_examples(d, TRAIN, 0, "train")]
    losses = sft_warm_start(policy, rows, steps, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    policy.model.save_pretrained(out, safe_serialization=True)
    policy.tokenizer.save_pretrained(out)
    sums = file_sums(out)
    (out / "SHA256SUMS.json").write_text(json.dumps(sums, indent=2) + "\n")
    return {"steps": steps, "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4), "sha256": sums}


def check(model_dir: Path, n: int = 64, samples: int = 4) -> dict:
    """Sampled reward (T = 1, the RL recipe's) and greedy accuracy per domain, on eval prompts."""
    from copd_runtime.data.examples import Dataset
    from copd_runtime.data.rewards import score
    from copd_runtime.rollout import sample

    torch.manual_seed(0)
    policy = load_policy(model_dir)
    res = {}
    for d in CONFLICTING:
        ev = split_examples(d, n, 1, "eval")
        r = sample(policy, [e for e in ev for _ in range(samples)], 12, 1.0, logprobs=False)
        sampled = sum(score(t, e.answer, CONFLICTING_REWARD[d]) for t, e in zip(r.responses, r.examples)) / len(ev) / samples
        greedy = accuracy(policy, Dataset(d, [], ev, CONFLICTING_REWARD[d]), 12)
        res[d] = {"sampled_reward": round(sampled, 4), "greedy_accuracy": round(greedy, 4)}
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.compare.conflict_base")
    ap.add_argument("--output", "-o", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--check-only", action="store_true", help="only report the precondition of an existing base")
    a = ap.parse_args(argv)
    doc = {} if a.check_only else build(a.output.resolve(), a.steps)
    doc["check"] = check(a.output.resolve())
    print(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
