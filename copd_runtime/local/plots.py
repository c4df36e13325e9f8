"""PNG plots of a run from its metrics.jsonl and per-cycle diagnostics."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _x(records: list[dict], order: list[tuple]) -> list[int]:
    pos = {k: i for i, k in enumerate(order)}
    return [pos[(r["cycle"], r["phase"], r["step"])] for r in records]


def plot_run(records: list[dict], diagnostics: list[dict], out_dir: Path) -> list[Path]:
    """reward.png: reward per branch over its steps, RL/OPD shaded;
    alignment.png: top-k overlap and symmetric KL per direction, per OPD step and per cycle."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    branches = sorted({r["branch"] for r in records})
    order = sorted({(r["cycle"], r["phase"], r["step"]) for r in records},
                   key=lambda k: (k[0], 0 if k[1] == "RL" else 1, k[2]))

    fig, ax = plt.subplots(figsize=(9, 4))
    _shade(ax, order)
    for b in branches:
        rs = [r for r in records if r["branch"] == b]
        ax.plot(_x(rs, order), [r["reward_mean"] for r in rs], marker=".", label=b)
    ax.set_xlabel("step (RL shaded blue, OPD orange)")
    ax.set_ylabel("reward (RL: own domain; OPD: peer domains)")
    ax.set_title("Reward per branch")
    ax.legend()
    fig.tight_layout()
    paths.append(out_dir / "reward.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    # per OPD step: the top-k-union lower bound of the symmetric KL; per cycle: the exact one
    for ax, key, dkey, title in ((axes[0], "topk_overlap", "topk_overlap", "Top-k overlap (student←teacher)"),
                                 (axes[1], "topk_union_symmetric_kl", "symmetric_kl",
                                  "Symmetric KL (student←teacher): dots top-k-union bound, lines exact")):
        _shade(ax, order)
        for b in branches:
            rs = [r for r in records if r["branch"] == b and r["phase"] == "OPD"]
            teachers = sorted({k.split("/", 1)[1] for r in rs for k in r if k.startswith(key + "/")})
            for t in teachers:
                pts = [(x, r[f"{key}/{t}"]) for x, r in zip(_x(rs, order), rs)]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], ".", alpha=0.6, label=f"{b}←{t} (OPD step)")
        cyc_end = {}
        for i, k in enumerate(order):
            cyc_end[k[0]] = i
        for s_t in sorted({(d["student"], d["teacher"]) for d in diagnostics}):
            ds = sorted((d for d in diagnostics if (d["student"], d["teacher"]) == s_t), key=lambda d: d["cycle"])
            ax.plot([cyc_end.get(d["cycle"], 0) for d in ds], [d[dkey] for d in ds], "-o",
                    label=f"{s_t[0]}←{s_t[1]} (probe, end of cycle)")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=6)
    fig.tight_layout()
    paths.append(out_dir / "alignment.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def _shade(ax, order: list[tuple]) -> None:
    start = 0
    for i in range(1, len(order) + 1):
        if i == len(order) or order[i][:2] != order[start][:2]:
            ax.axvspan(start - 0.5, i - 0.5, color="tab:blue" if order[start][1] == "RL" else "tab:orange",
                       alpha=0.08)
            start = i
