"""Aggregate the comparison's runs: comparison.json, comparison.md, pilot.json and PNG plots."""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from experiments.compare.spec import CompareSpec  # noqa: E402

NOTES = {
    "experts": "K RL-only models (a CoPDRun without OPD, through LocalRun); expert k scored on domain k "
               "(oracle routing, not one policy)",
    "experts_merged": "the experts run's merge (linear average): merge without any OPD",
    "mixed_rlvr": "one policy, the runtime's grpo_step on batches drawn from all domains",
    "static_opd": "experts = CoPD's RL stages only (C·S_RL steps each), then the base distils from all of them "
                  "(run_branch_stage)",
    "copd": "a CoPDRun through LocalRun: mutual mesh OPD every cycle, teachers frozen at OPD start, linear merge",
    "copd_oneway": "only the first branch distils (from the others); the others spend OPD slots on RL; merged "
                   "(run_branch_stage)",
    "copd_oneshot": "a CoPDRun of one cycle through LocalRun: all RL first, then one mutual OPD phase; merged",
    "copd_adaptive": "copd with schedule.mode adaptive (LocalRun): a direction distils while its mass overlap asks "
                     "for it; a branch with none spends the OPD steps on RL",
}


BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0  # fixed before any run: the intervals are a function of the scores alone


def _std(xs: list[float]) -> float:
    """Sample standard deviation (n − 1) over seeds; 0 for one seed."""
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def bootstrap_ci(xs: list[float], level: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES,
                 seed: int = BOOTSTRAP_SEED) -> list[float]:
    """Percentile bootstrap interval of the mean of `xs` (resampling seeds with replacement)."""
    if len(xs) < 2:
        return [round(xs[0], 4)] * 2 if xs else [float("nan")] * 2
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(xs, k=len(xs))) for _ in range(resamples))
    lo = means[int((1 - level) / 2 * resamples)]
    hi = means[min(resamples - 1, int((1 + level) / 2 * resamples))]
    return [round(lo, 4), round(hi, 4)]


def paired(a: dict, b: dict) -> dict | None:
    """CoPD-style method `a` minus baseline `b` on the seeds both ran (same seed = same data order,
    same step seeds): mean difference of the domain-average score, its sample std, a bootstrap 95%
    interval, and how many seeds `a` won."""
    sa = {s["seed"]: s["avg"] for s in a["seeds"]}
    sb = {s["seed"]: s["avg"] for s in b["seeds"]}
    common = sorted(set(sa) & set(sb))
    if not common:
        return None
    diffs = [sa[s] - sb[s] for s in common]
    return {"seeds": common, "diffs": [round(x, 4) for x in diffs], "mean": round(statistics.fmean(diffs), 4),
            "std": round(_std(diffs), 4), "ci95": bootstrap_ci(diffs),
            "wins": sum(x > 0 for x in diffs), "losses": sum(x < 0 for x in diffs)}


def aggregate(spec: CompareSpec, out: Path) -> dict:
    methods = {}
    for name in spec.method_names():
        runs = [json.loads((out / "runs" / name / f"seed-{s}.json").read_text()) for s in spec.seeds
                if (out / "runs" / name / f"seed-{s}.json").exists()]
        if not runs:
            continue
        doms = spec.domains
        per = {d: [r["eval"][d] for r in runs] for d in doms}
        avgs = [sum(r["eval"][d] for d in doms) / len(doms) for r in runs]
        methods[name] = {
            "seeds": [{"seed": r["seed"], "eval": r["eval"], "avg": round(a, 4), "seconds": r.get("seconds"),
                       "branches": r.get("branches")} for r, a in zip(runs, avgs)],
            "eval": {d: round(statistics.fmean(v), 4) for d, v in per.items()},
            "spread": {d: round(_std(v), 4) for d, v in per.items()},
            "range": {d: [min(v), max(v)] for d, v in per.items()},
            "avg": round(statistics.fmean(avgs), 4),
            "avg_spread": round(_std(avgs), 4),
            "avg_ci95": bootstrap_ci(avgs),
            "avg_range": [round(min(avgs), 4), round(max(avgs), 4)],
            "updates": runs[0]["updates"], "rl_updates": runs[0]["rl_updates"],
            "opd_updates": runs[0]["opd_updates"], "rollouts": runs[0]["rollouts"],
            "opd_updates_per_seed": [r["opd_updates"] for r in runs],
            "skipped_updates": [r.get("skipped_updates") for r in runs],
            "merge_ready": [r.get("merge_ready") for r in runs], "executor": runs[0].get("executor"),
            "adaptive_plan": [r.get("adaptive_plan") for r in runs] if runs[0].get("adaptive_plan") else None,
            "schedule": runs[0].get("schedule"), "note": NOTES.get(name, f"copd with S_RL:S_OPD = {name[5:]}" if name.startswith("copd@") else ""),
        }
    return methods


def aggregate_pilot(spec: CompareSpec, out: Path) -> dict | None:
    files = sorted((out / "runs" / "pilot").glob("*.json"))
    if not files:
        return None
    rows = [r for f in files for r in json.loads(f.read_text())["rows"]]
    summary = []
    for d in sorted({r["domain"] for r in rows}):
        for n in sorted({r["teacher_steps"] for r in rows if r["domain"] == d}):
            rs = [r for r in rows if r["domain"] == d and r["teacher_steps"] == n]
            absorbed = [r["absorbed"] for r in rs if r["absorbed"] is not None]
            summary.append({
                "domain": d, "teacher_steps": n, "n": len(rs),
                **{k: round(statistics.fmean(r[k] for r in rs), 4)
                   for k in ("topk_overlap", "symmetric_kl", "opd_overlap_mean", "teacher_acc", "student_before",
                             "student_after", "gain")},
                "absorbed": round(statistics.fmean(absorbed), 4) if absorbed else None,
            })
    return {"opd_steps": spec.pilot.opd_steps if spec.pilot else None, "rows": rows, "summary": summary}


def write_report(spec: CompareSpec, out: Path, base: dict[str, float], wall_seconds: float | None = None,
                 provenance: dict | None = None, eval_overlap: dict | None = None,
                 kernels: dict | None = None) -> dict:
    out = Path(out)
    methods = aggregate(spec, out)
    plots = [plot_scores(spec, methods, base, out / "scores.png")]
    if any(json.loads(p.read_text()).get("cycles") for p in (out / "runs" / "copd").glob("*.json")) \
            if (out / "runs" / "copd").exists() else False:
        plots.append(plot_alignment(spec, out, out / "alignment.png"))
    pilot = aggregate_pilot(spec, out)
    if pilot:
        (out / "pilot.json").write_text(json.dumps(pilot, indent=2))
        plots.append(plot_pilot(pilot, out / "pilot.png"))
    copd_like = [n for n in methods if n in ("copd", "copd_adaptive") or n.startswith("copd@")]
    baselines = [n for n in methods if n in ("experts_merged", "mixed_rlvr", "static_opd", "copd_oneway",
                                              "copd_oneshot", "experts")]
    baselines += ["copd"] if "copd_adaptive" in methods and "copd" in methods else []
    doc = {
        "domains": spec.domains, "seeds": spec.seeds, "base_eval": base,
        "base_model": {"uri": spec.base_model, **(provenance or {})},
        "eval_overlap": eval_overlap or {},
        "statistics": {"spread": "sample std over seeds (n-1)",
                       "ci95": f"percentile bootstrap of the mean over seeds, {BOOTSTRAP_RESAMPLES} resamples, "
                               f"RNG seed {BOOTSTRAP_SEED}",
                       "paired": "per-seed difference of the domain-average score, same seeds"},
        "paired": {f"{a} - {b}": p for a in copd_like for b in baselines
                   if a != b and (p := paired(methods[a], methods[b])) is not None},
        "budget": {"branches": len(spec.domains), "cycles": spec.budget.cycles,
                   "steps_per_branch_per_cycle": spec.budget.steps_per_cycle,
                   "total_updates": len(spec.domains) * spec.budget.cycles * spec.budget.steps_per_cycle},
        "methods": methods, "plots": [p.name for p in plots], "wall_seconds": wall_seconds,
    }
    if kernels:
        doc["kernels"] = kernels
    (out / "comparison.json").write_text(json.dumps(doc, indent=2))
    (out / "comparison.md").write_text(markdown(spec, doc, pilot, out))
    return doc


def alignment_rows(spec: CompareSpec, out: Path, key: str) -> list[tuple[str, list[str]]]:
    rows = []
    for method in ("copd", "copd_adaptive", "experts", "copd_oneway", "copd_oneshot"):
        c = _cycle_curves(out, method, spec.seeds)
        if c is None:
            continue
        cells = ["/".join(f"{c[b][key][i]:.2f}" for b in spec.domains) for i in range(1, len(c["cycle"]))]
        rows.append((method, cells))
    return rows


def markdown(spec: CompareSpec, doc: dict, pilot: dict | None, out: Path) -> str:
    d = spec.domains
    b = doc["budget"]
    lines = [
        f"# CoPD comparison ({len(spec.seeds)} seeds: {spec.seeds})", "",
        f"Budget: {b['total_updates']} optimizer updates per method "
        f"(K={b['branches']} × C={b['cycles']} × T={b['steps_per_branch_per_cycle']}). "
        f"Greedy accuracy on {spec.eval_size} held-out prompts per domain (eval prompts disjoint from train "
        f"prompts by construction; measured overlap "
        + ", ".join(f"{x} {o['fraction_in_train']:.3f}" for x, o in doc.get("eval_overlap", {}).items())
        + f"); mean ± sample std over seeds; avg with a bootstrap 95% interval of the mean. Base model "
        f"`{doc['base_model']['uri']}` sha256 `{doc['base_model'].get('sha256', '?')[:16]}…`.", "",
        "| method | " + " | ".join(d) + " | avg | updates (RL+OPD) | S_RL:S_OPD × cycles | rollouts | run by |",
        "|---|" + "---|" * (len(d) + 5),
        "| base (no training) | " + " | ".join(f"{doc['base_eval'][x]:.3f}" for x in d)
        + f" | {sum(doc['base_eval'][x] for x in d) / len(d):.3f} | 0 | | 0 | |",
    ]
    for name, m in doc["methods"].items():
        cells = [f"{m['eval'][x]:.3f} ± {m['spread'][x]:.3f}" for x in d]
        sched = m.get("schedule")
        sched = f"{sched[0][0]}:{sched[0][1]} × {len(sched)}" if sched else ""
        ci = m.get("avg_ci95") or [float("nan")] * 2
        opd = m.get("opd_updates_per_seed") or [m["opd_updates"]]
        split = (f"{m['rl_updates']}+{m['opd_updates']}" if min(opd) == max(opd) else
                 f"{m['updates'] - max(opd)}–{m['updates'] - min(opd)} + {min(opd)}–{max(opd)} over seeds")
        rollouts = m["rollouts"] if min(opd) == max(opd) else "varies"
        if m.get("adaptive_plan"):
            sched += " (adaptive)"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | **{m['avg']:.3f}** ± {m['avg_spread']:.3f} "
                     f"[{ci[0]:.3f}, {ci[1]:.3f}] | "
                     f"{m['updates']} ({split}) | {sched} | {rollouts} | "
                     f"{m.get('executor') or ''} |")
    if doc.get("paired"):
        lines += ["", "Paired differences of the domain-average score (same seeds; mean ± sample std, bootstrap "
                  "95% interval, seeds won/lost):", "", "| comparison | mean diff | 95% interval | won/lost |",
                  "|---|---|---|---|"]
        for k, p in doc["paired"].items():
            lines.append(f"| {k} | {p['mean']:+.3f} ± {p['std']:.3f} | [{p['ci95'][0]:+.3f}, {p['ci95'][1]:+.3f}] "
                         f"| {p['wins']}/{p['losses']} of {len(p['seeds'])} |")
    for n, m in doc["methods"].items():
        plans = m.get("adaptive_plan")
        if not plans:
            continue
        a = spec.adaptive
        ndir = len(d) * (len(d) - 1)
        lines += ["", f"Adaptive schedule of `{n}` (lowerAlignment {a.lower_alignment}, upperAlignment "
                  f"{a.upper_alignment}, minPhaseCycles {a.min_phase_cycles}, maxPhaseCycles "
                  f"{a.max_phase_cycles or 'none'}): directions distilling per cycle, of {ndir}, per seed:", "",
                  "| seed | " + " | ".join(f"cycle {c['cycle']}" for c in plans[0]) + " |",
                  "|---|" + "---|" * len(plans[0])]
        for s, plan in zip(m["seeds"], plans):
            lines.append(f"| {s['seed']} | " + " | ".join(str(c["directions_distilling"]) for c in plan) + " |")
    merged = [(n, m) for n, m in doc["methods"].items() if m["seeds"][0].get("branches") and n != "experts"]
    if merged:
        lines += ["", "Branches before the merge (mean over seeds of each branch's own-domain score → merged "
                  "score on that domain):", "", "| method | " + " | ".join(d) + " |", "|---|" + "---|" * len(d)]
        for n, m in merged:
            cells = []
            for x in d:
                own = [s["branches"][x][x] for s in m["seeds"] if x in (s["branches"] or {})]
                cells.append(f"{statistics.fmean(own):.3f} → {m['eval'][x]:.3f}" if own else "")
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
    for key, label in (("overlap", "top-k overlap"), ("mass", "mass overlap Σmin(p, q) on the top-k union"),
                       ("symkl", "symmetric KL")):
        rows = alignment_rows(spec, out, key)
        if rows:
            n = max(len(c) for _, c in rows)
            lines += ["", f"Alignment at the end of each cycle, {label} of each branch (as student) with its peers "
                      f"({' / '.join(d)}; mean over seeds; the Diagnose stage's probe):", "",
                      "| method | " + " | ".join(f"cycle {i}" for i in range(1, n + 1)) + " |",
                      "|---|" + "---|" * n]
            lines += [f"| {name} | " + " | ".join(cells) + " |" for name, cells in rows]
    if pilot:
        lines += ["", f"## Pilot: OPD gain vs teacher–student overlap ({pilot['opd_steps']} OPD steps, "
                  "student = base)", "",
                  "| domain | teacher RL steps | top-k overlap | sym. KL | teacher acc | student before → after "
                  "| gain | absorbed |", "|---|---|---|---|---|---|---|---|"]
        for r in pilot["summary"]:
            ab = "" if r["absorbed"] is None else f"{r['absorbed']:.2f}"
            lines.append(f"| {r['domain']} | {r['teacher_steps']} | {r['topk_overlap']:.3f} | "
                         f"{r['symmetric_kl']:.3f} | {r['teacher_acc']:.3f} | {r['student_before']:.3f} → "
                         f"{r['student_after']:.3f} | {r['gain']:+.3f} | {ab} |")
    lines += ["", "Plots: " + ", ".join(f"![{p}]({p})" for p in doc["plots"]), ""]
    if doc.get("wall_seconds"):
        lines.append(f"Wall time of this invocation: {doc['wall_seconds']:.0f} s.")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# Plots


def plot_scores(spec: CompareSpec, methods: dict, base: dict, path: Path) -> Path:
    names = list(methods)
    groups = [*spec.domains, "avg"]
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(names) * len(groups) / 3), 4.5))
    w = 0.8 / len(groups)
    for gi, g in enumerate(groups):
        xs = [i + (gi - (len(groups) - 1) / 2) * w for i in range(len(names))]
        if g == "avg":
            ys = [methods[n]["avg"] for n in names]
            lo = [methods[n]["avg"] - methods[n]["avg_range"][0] for n in names]
            hi = [methods[n]["avg_range"][1] - methods[n]["avg"] for n in names]
        else:
            ys = [methods[n]["eval"][g] for n in names]
            lo = [methods[n]["eval"][g] - methods[n]["range"][g][0] for n in names]
            hi = [methods[n]["range"][g][1] - methods[n]["eval"][g] for n in names]
        ax.bar(xs, ys, w, yerr=[lo, hi], capsize=2, label=g, color="black" if g == "avg" else None,
               alpha=0.8 if g == "avg" else 1.0)
    for gi, g in enumerate(spec.domains):
        ax.axhline(base[g], color=f"C{gi}", ls=":", lw=1)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("greedy accuracy (mean over seeds; bars: min–max)")
    ax.set_title("Per-domain score by method at equal optimizer-step budget (dotted: base model)")
    ax.legend(fontsize=8, ncol=len(groups))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _cycle_curves(out: Path, method: str, seeds: list[int]) -> dict | None:
    runs = [json.loads(p.read_text()) for s in seeds if (p := out / "runs" / method / f"seed-{s}.json").exists()]
    runs = [r for r in runs if r.get("cycles")]
    if not runs:
        return None
    cyc = [c["cycle"] for c in runs[0]["cycles"]]
    names = list(runs[0]["cycles"][0]["branches"])
    res: dict = {"cycle": cyc}
    for b in names:
        res[b] = {key: [_mean_over_runs(runs, i, b, key) for i in range(len(cyc))]
                  for key in ("overlap", "mass", "symkl", "own_eval", "rl_reward")}
    return res


def _cycle_value(c: dict, b: str, key: str) -> float | None:
    if key in ("overlap", "mass", "symkl"):
        field = {"overlap": "topk_overlap", "mass": "mass_overlap", "symkl": "symmetric_kl"}[key]
        vals = [x[field] for x in c["directions"] if x["student"] == b and x.get(field) is not None]
        if c["cycle"] == 0 and key == "mass":
            return 1.0  # the common base
        return statistics.fmean(vals) if vals else None
    return c["branches"][b][key]


def _mean_over_runs(runs: list[dict], i: int, b: str, key: str) -> float:
    vals = [v for r in runs if (v := _cycle_value(r["cycles"][i], b, key)) is not None]
    return statistics.fmean(vals) if vals else float("nan")


def plot_alignment(spec: CompareSpec, out: Path, path: Path) -> Path:
    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    titles = {"overlap": "top-k overlap (student ← peers, student's states)",
              "symkl": "symmetric KL (student ← peers)", "own_eval": "own-domain greedy accuracy",
              "rl_reward": "mean RL reward in the cycle"}
    for method, ls in (("copd", "-"), ("experts", "--")):
        c = _cycle_curves(out, method, spec.seeds)
        if c is None:
            continue
        for bi, b in enumerate(spec.domains):
            for ax, key in zip(axes, titles):
                ax.plot(c["cycle"], c[b][key], ls, marker="o", color=f"C{bi}", label=f"{method}: {b}")
    for ax, t in zip(axes, titles.values()):
        ax.set_title(t, fontsize=9)
        ax.set_xlabel("cycle (experts: same step boundaries, no OPD)")
    axes[0].legend(fontsize=7)
    fig.suptitle("CoPD (solid) vs RL-only experts (dashed), mean over seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_pilot(pilot: dict, path: Path) -> Path:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    doms = sorted({r["domain"] for r in pilot["rows"]})
    for di, d in enumerate(doms):
        rs = [r for r in pilot["rows"] if r["domain"] == d]
        sm = [r for r in pilot["summary"] if r["domain"] == d]
        axes[0].scatter([r["topk_overlap"] for r in rs], [r["gain"] for r in rs], color=f"C{di}", alpha=0.5, s=15)
        axes[0].plot([r["topk_overlap"] for r in sm], [r["gain"] for r in sm], "-o", color=f"C{di}", label=d)
        ab = [(r["topk_overlap"], r["absorbed"]) for r in sm if r["absorbed"] is not None]
        axes[1].plot([a for a, _ in ab], [b for _, b in ab], "-o", color=f"C{di}", label=d)
        axes[2].plot([r["teacher_steps"] for r in sm], [r["topk_overlap"] for r in sm], "-o", color=f"C{di}",
                     label=f"{d}: overlap")
        axes[2].plot([r["teacher_steps"] for r in sm], [r["teacher_acc"] for r in sm], ":s", color=f"C{di}",
                     label=f"{d}: teacher acc")
    axes[0].set(xlabel="top-k overlap (student=base ← teacher)", ylabel="student gain on teacher's domain",
                title=f"OPD gain after {pilot['opd_steps']} steps (dots: seeds)")
    axes[1].set(xlabel="top-k overlap", ylabel="gain / (teacher acc − student acc)",
                title="fraction of the teacher's lead absorbed")
    axes[2].set(xlabel="teacher RL steps from the common start", title="distance and quality of the teachers")
    for ax in axes:
        ax.axhline(0, color="grey", lw=0.5)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
