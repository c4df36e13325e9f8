"""Why is top-k overlap below the paper's 0.9 here? A measurement of the "peaked distributions,
tail tokens reshuffled" explanation.

    python -m experiments.compare.topk_hypothesis examples/compare.yaml --output DIR [--steps 10 40] [--seeds 0 1]

Pairs of policies at increasing distance from the common start (the shipped base): for each domain
d and RL budget n, the base (student) against the base after n GRPO steps on d (teacher), and two
branches after n RL steps each on different domains (a CoPD-like pair, before any OPD). On states the
student visits (its own samples on the teacher's eval prompts, like the Diagnose stage) both full
next-token distributions p (student), q (teacher) are compared, per state:

- `topk_overlap`: |TopK(p) ∩ TopK(q)| / k (the paper's metric, k = diagnostics.topK);
- `floor_jaccard`: Jaccard of {v: p_v ≥ τ} and {v: q_v ≥ τ} (tokens that carry probability, τ = 0.01);
- `nucleus_jaccard`: Jaccard of the two top-p (0.9) nucleus sets;
- `mass_overlap`: Σ_v min(p_v, q_v) over the whole vocabulary (= 1 − total variation);
- `topk_union_mass_overlap`: the same over the union of both top-k sets (what an OPD step can compute);
- `nucleus_size`: tokens in p's 0.9-nucleus; `missed_mass`: p's mass on its top-k tokens that are
  not in q's top-k (what a top-k mismatch costs in probability).

Decision rule, fixed before the measurement: the explanation holds for a pair when top-k overlap
< 0.9 while (a) the median nucleus size is < k (top-k then necessarily reaches into the tail), (b)
the missed mass is < 0.05 and (c) floor and nucleus Jaccards are ≥ 0.9.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

from experiments.compare.kernels import describe, pin

if __name__ == "__main__":
    pin()  # before torch loads: the kernels of comparison.json (kernels.py)

import torch  # noqa: E402

from copd_core.seeding import step_seed
from copd_runtime.rollout import forward_logits, predicts_response_N_L, sample
from experiments.compare.context import Ctx, do_rl
from experiments.compare.spec import CompareSpec, load_compare_spec

FLOOR = 0.01
TOP_P = 0.9


def _nucleus(p_M_V: torch.Tensor, top_p: float) -> torch.Tensor:
    """Boolean [M, V]: the smallest set of most likely tokens whose mass reaches `top_p`."""
    sp, idx = p_M_V.sort(-1, descending=True)
    keep_sorted = (sp.cumsum(-1) - sp) < top_p  # the token that crosses top_p is kept
    return torch.zeros_like(keep_sorted).scatter(-1, idx, keep_sorted)


def _jaccard(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a & b).sum(-1).float() / (a | b).sum(-1).clamp(min=1).float()


def compare_distributions(logp_M_V: torch.Tensor, logq_M_V: torch.Tensor, k: int, floor: float = FLOOR,
                          top_p: float = TOP_P) -> dict[str, torch.Tensor]:
    """Per-state alignment measures of student p and teacher q (full distributions, [M, V])."""
    p, q = logp_M_V.exp(), logq_M_V.exp()
    V = p.shape[-1]
    tk_p = torch.zeros_like(p, dtype=torch.bool).scatter(-1, p.topk(k, -1).indices, True)
    tk_q = torch.zeros_like(q, dtype=torch.bool).scatter(-1, q.topk(k, -1).indices, True)
    union = tk_p | tk_q
    return {
        "topk_overlap": (tk_p & tk_q).sum(-1).float() / k,
        "floor_jaccard": _jaccard(p >= floor, q >= floor),
        "nucleus_jaccard": _jaccard(_nucleus(p, top_p), _nucleus(q, top_p)),
        "mass_overlap": torch.minimum(p, q).sum(-1),
        "topk_union_mass_overlap": (torch.minimum(p, q) * union).sum(-1),
        "nucleus_size": _nucleus(p, top_p).sum(-1).float(),
        "tokens_above_floor": (p >= floor).sum(-1).float(),
        "missed_mass": (p * (tk_p & ~tk_q)).sum(-1),
        "vocab": torch.full((p.shape[0],), float(V)),
    }


@torch.no_grad()
def measure_pair(student, teacher, probe, k: int, max_new_tokens: int, temperature: float, seed: int) -> dict:
    torch.manual_seed(seed)
    r = sample(student, probe, max_new_tokens, temperature, logprobs=False)
    at = predicts_response_N_L(r)
    lp, lq = (torch.log_softmax(forward_logits(m, r.input_ids, r.attention_mask)[:, :-1][at].float() / temperature,
                                -1) for m in (student, teacher))
    per = compare_distributions(lp, lq, k)
    out = {name: round(float(v.mean()), 4) for name, v in per.items()}
    out["nucleus_size_median"] = float(per["nucleus_size"].median())
    out["states"] = int(lp.shape[0])
    return out


def verdict(row: dict, k: int) -> str:
    if row["topk_overlap"] >= 0.9:
        return "top-k overlap already >= 0.9"
    holds = (row["nucleus_size_median"] < k and row["missed_mass"] < 0.05 and row["floor_jaccard"] >= 0.9
             and row["nucleus_jaccard"] >= 0.9)
    return "explained (peaked; only tail tokens differ)" if holds else "not explained"


def run(spec: CompareSpec, out: Path, steps: list[int], seeds: list[int]) -> dict:
    ctx = Ctx(spec, out / "storage")
    s = spec
    k = s.diagnostics.top_k
    rows = []
    for seed in seeds:
        branches = {d: ctx.branch(d) for d in s.domains}
        for n in sorted(steps):
            for b in branches.values():
                do_rl(ctx, b, n - b.rl_steps, seed)
            snaps = {d: copy.deepcopy(b.policy) for d, b in branches.items()}
            for d in s.domains:
                probe = ctx.data[d].eval[: s.diagnostics.probe_prompts]
                pairs = [("base", ctx.base, f"{d}@{n}", snaps[d])]
                other = s.domains[(s.domains.index(d) + 1) % len(s.domains)]
                pairs.append((f"{other}@{n}", snaps[other], f"{d}@{n}", snaps[d]))
                for sname, sp, tname, tp in pairs:
                    m = measure_pair(sp, tp, probe, k, s.rl.max_new_tokens, s.rl.temperature,
                                     step_seed(seed, "topk-hypothesis", d))
                    rows.append({"seed": seed, "rl_steps": n, "probe_domain": d, "student": sname,
                                 "teacher": tname, "kind": "base<-expert" if sname == "base" else "branch<-branch",
                                 **m})
    summary = []
    for kind in ("base<-expert", "branch<-branch"):
        for n in sorted(steps):
            rs = [r for r in rows if r["kind"] == kind and r["rl_steps"] == n]
            if not rs:
                continue
            agg = {key: round(statistics.fmean(r[key] for r in rs), 4)
                   for key in ("topk_overlap", "floor_jaccard", "nucleus_jaccard", "mass_overlap",
                               "topk_union_mass_overlap", "nucleus_size", "nucleus_size_median",
                               "tokens_above_floor", "missed_mass")}
            summary.append({"kind": kind, "rl_steps": n, "pairs": len(rs), **agg, "verdict": verdict(agg, k)})
    doc = {"k": k, "floor": FLOOR, "top_p": TOP_P, "base_model": s.base_model, "seeds": seeds, "steps": steps,
           "rows": rows, "summary": summary, "kernels": describe()}
    out.mkdir(parents=True, exist_ok=True)
    (out / "topk_hypothesis.json").write_text(json.dumps(doc, indent=2))
    return doc


def markdown(doc: dict) -> str:
    lines = [f"| pair | RL steps | top-k overlap (k={doc['k']}) | floor Jaccard (p≥{doc['floor']}) | "
             f"nucleus Jaccard (top-p {doc['top_p']}) | mass overlap Σmin(p,q) | on top-k union | "
             "nucleus size (median) | tokens ≥ floor | missed mass | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["summary"]:
        lines.append(f"| {r['kind']} | {r['rl_steps']} | {r['topk_overlap']:.3f} | {r['floor_jaccard']:.3f} | "
                     f"{r['nucleus_jaccard']:.3f} | {r['mass_overlap']:.3f} | {r['topk_union_mass_overlap']:.3f} | "
                     f"{r['nucleus_size']:.2f} ({r['nucleus_size_median']:.1f}) | {r['tokens_above_floor']:.2f} | "
                     f"{r['missed_mass']:.4f} | {r['verdict']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.compare.topk_hypothesis")
    ap.add_argument("spec", type=Path)
    ap.add_argument("--output", "-o", type=Path, required=True)
    ap.add_argument("--steps", type=int, nargs="+", default=[10, 40])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    doc = run(load_compare_spec(args.spec), args.output.resolve(), args.steps, args.seeds)
    md = markdown(doc)
    (args.output / "topk_hypothesis.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
