"""Do two domains pull the shared parameters in conflicting directions? Gradient cosines at the base.

    python -m experiments.compare.interference --output DIR [--batches 4] [--batch 64]

The comparison's builtin domains are SEPARABLE: each has its own prompt prefix (`arith`, `rev`,
`max`), so the model can route on it. Here they are set against a CONFLICTING pair with no routing
prefix: `plain` ("7 8=" → "15") and `boxed` ("7 8=" → "\\boxed{15}"): the same prompts and the same
skill (addition) with incompatible answer conventions.

For each domain d and batch b (disjoint random batches, fixed seeds), g_{d,b} is the gradient at the
shipped base of the teacher-forced cross-entropy of the correct answer (+EOS) — the direction in
which training on d moves every shared parameter. Reported: the cosine between g of two different
domains (interference when negative), next to the cosine between two batches of the SAME domain
(what agreement looks like under batch noise). Then transfer: a copy of the base trained on one
domain alone (`--transfer-steps` AdamW steps of the same loss) and every domain's held-out answer
loss before → after; a rise on the OTHER domain is negative transfer (interference). Both are
supervised-loss proxies measured from the common start, not RL: they say whether the domains
conflict, not how CoPD copes with it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import sys
from pathlib import Path

from experiments.compare.kernels import describe, pin

if __name__ == "__main__":
    pin()  # before torch loads: the kernels of comparison.json (kernels.py)

import torch  # noqa: E402

from copd_core.spec import RewardSpec, Verifier
from copd_runtime.builtin.build import weights_sha256
from copd_runtime.builtin.warm_start import answer_loss
from copd_runtime.data.datasets import split_of, text_examples
from copd_runtime.data.examples import Example
from copd_runtime.model_uri import resolve_model_dir
from copd_runtime.models.policy import Policy, load_policy


def _plain(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return f"{a} {b}=", str(a + b)


def _boxed(rng: random.Random) -> tuple[str, str]:
    prompt, answer = _plain(rng)
    return prompt, "\\boxed{" + answer + "}"


CONFLICTING = {"plain": _plain, "boxed": _boxed}
# their verifiers in the comparison: an answer in the other convention scores 0
CONFLICTING_REWARD = {"plain": RewardSpec(verifier=Verifier.EXACT), "boxed": RewardSpec(verifier=Verifier.BOXED)}
SEPARABLE = ("arith", "reverse", "maxbox")


def split_examples(domain: str, n: int, seed: int, split: str) -> list[Example]:
    """`n` examples of a conflicting domain whose prompts belong to `split` (the builtin text domains'
    hash split, `split_of`: train and eval prompts disjoint by construction). One RNG key for both
    domains: `plain` and `boxed` draw the same prompts in the same order."""
    rng = random.Random(f"interference:{seed}:{split}")
    out: list[Example] = []
    while len(out) < n:
        prompt, answer = CONFLICTING[domain](rng)
        if split_of(prompt) == split:
            out.append(Example(prompt, answer, domain=domain))
    return out


def examples(domain: str, n: int, seed: int) -> list[Example]:
    if domain in CONFLICTING:
        rng = random.Random(f"interference:{seed}")  # one key for both: the same prompts, batch for batch
        return [Example(*CONFLICTING[domain](rng), domain=domain) for _ in range(n)]
    return text_examples(domain, n, seed)


def sft_gradient(policy: Policy, rows: list[Example]) -> torch.Tensor:
    """The flattened gradient of the mean answer-token cross-entropy (the warm start's loss)."""
    policy.model.zero_grad(set_to_none=True)
    loss = answer_loss(policy, rows)
    loss.backward()
    g = torch.cat([p.grad.flatten() for p in policy.model.parameters() if p.grad is not None])
    policy.model.zero_grad(set_to_none=True)
    return g


def measure(policy: Policy, domains: list[str], batches: int, batch: int) -> dict:
    grads = {d: [sft_gradient(policy, examples(d, batch, 100 + i)) for i in range(batches)] for d in domains}
    cos = torch.nn.functional.cosine_similarity
    same = {d: [float(cos(a, b, dim=0)) for a, b in itertools.combinations(grads[d], 2)] for d in domains}
    cross = {f"{x}~{y}": [float(cos(a, b, dim=0)) for a in grads[x] for b in grads[y]]
             for x, y in itertools.combinations(domains, 2)}

    def stats(v: list[float]) -> dict:
        return {"mean": round(statistics.fmean(v), 4), "min": round(min(v), 4), "max": round(max(v), 4), "n": len(v)}

    return {"same_domain": {d: stats(v) for d, v in same.items()},
            "cross_domain": {k: stats(v) for k, v in cross.items()}}


def sft_loss(policy: Policy, rows: list[Example]) -> float:
    with torch.no_grad():
        return float(answer_loss(policy, rows))


def transfer(base: Policy, domains: list[str], steps: int, batch: int, lr: float = 1e-3) -> dict:
    """Train a copy of the base on domain x alone (`steps` SGD steps of the answer cross-entropy, AdamW),
    and report the change of every domain's held-out loss: Δ > 0 on y ≠ x is negative transfer."""
    import copy

    held = {d: examples(d, 256, 999) for d in domains}
    before = {d: sft_loss(base, held[d]) for d in domains}
    res = {}
    for x in domains:
        p = copy.deepcopy(base)
        opt = torch.optim.AdamW(p.model.parameters(), lr=lr, weight_decay=0.0)
        for i in range(steps):
            opt.zero_grad(set_to_none=True)
            g = sft_gradient(p, examples(x, batch, 10_000 + i))
            offset = 0
            for prm in p.model.parameters():
                n = prm.numel()
                prm.grad = g[offset:offset + n].view_as(prm).clone()
                offset += n
            opt.step()
        res[x] = {y: round(sft_loss(p, held[y]) - before[y], 4) for y in domains}
    return {"loss_before": {d: round(v, 4) for d, v in before.items()}, "delta_loss_after_training_on": res,
            "steps": steps, "lr": lr}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.compare.interference")
    ap.add_argument("--output", "-o", type=Path, required=True)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--transfer-steps", type=int, default=30)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    out = args.output.resolve()
    policy = load_policy(resolve_model_dir("builtin://tiny-qwen3", out / "storage"))
    policy.model.train()
    doc = {"base_model": {"uri": "builtin://tiny-qwen3", "sha256": weights_sha256("tiny-qwen3")},
           "batches": args.batches, "batch": args.batch, "kernels": describe(),
           "separable": measure(policy, list(SEPARABLE), args.batches, args.batch),
           "conflicting": measure(policy, list(CONFLICTING), args.batches, args.batch)}
    for bench, doms in (("separable", list(SEPARABLE)), ("conflicting", list(CONFLICTING))):
        doc[bench]["transfer"] = transfer(policy, doms, args.transfer_steps, args.batch)
    out.mkdir(parents=True, exist_ok=True)
    (out / "interference.json").write_text(json.dumps(doc, indent=2))
    lines = ["| benchmark | pair | gradient cosine (mean [min, max]) |", "|---|---|---|"]
    for bench in ("separable", "conflicting"):
        for kind in ("same_domain", "cross_domain"):
            for k, s in doc[bench][kind].items():
                label = f"{k} (two batches of one domain)" if kind == "same_domain" else k
                lines.append(f"| {bench} | {label} | {s['mean']:+.3f} [{s['min']:+.3f}, {s['max']:+.3f}] |")
    lines += ["", "| benchmark | trained on | Δ held-out answer loss per domain (negative: better) |", "|---|---|---|"]
    for bench in ("separable", "conflicting"):
        t = doc[bench]["transfer"]
        for x, row in t["delta_loss_after_training_on"].items():
            lines.append(f"| {bench} | {x} ({t['steps']} steps) | "
                         + ", ".join(f"{y} {v:+.3f}" for y, v in row.items()) + " |")
    md = "\n".join(lines) + "\n"
    (out / "interference.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
