"""The live progress display of `copd run`: one row per branch, refreshed every step."""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.live import Live
from rich.table import Table


class Progress:
    def __init__(self, run: str, branches: list[str], live: bool | None = None):
        self.run = run
        self.rows = {b: {} for b in branches}
        self.header = "Pending"
        self.console = Console()
        self.live_enabled = sys.stdout.isatty() if live is None else live
        self.live = Live(self._table(), console=self.console, refresh_per_second=4) if self.live_enabled else None
        self.t0 = time.monotonic()

    def __enter__(self):
        if self.live:
            self.live.__enter__()
        return self

    def __exit__(self, *exc):
        if self.live:
            self.live.__exit__(*exc)

    def _table(self) -> Table:
        t = Table(title=f"CoPD run {self.run} — {self.header} — {time.monotonic() - getattr(self, 't0', 0):.0f}s",
                  title_justify="left")
        for col in ("branch", "cycle", "phase", "step", "reward", "overlap", "sym KL≥", "loss"):
            t.add_column(col, justify="right" if col not in ("branch", "phase") else "left")
        for b, r in self.rows.items():
            t.add_row(b, str(r.get("cycle", "")), r.get("phase", ""),
                      f"{r['step']}/{r['steps']}" if "step" in r else "",
                      _f(r.get("reward_mean")), _f(r.get("overlap")), _f(r.get("skl")), _f(r.get("loss")))
        return t

    def step(self, rec: dict) -> None:
        row = dict(rec)
        ov = [v for k, v in rec.items() if k.startswith("topk_overlap/")]
        kl = [v for k, v in rec.items() if k.startswith("topk_union_symmetric_kl/")]
        prev = self.rows.get(rec["branch"], {})
        row["overlap"] = sum(ov) / len(ov) if ov else prev.get("overlap")
        row["skl"] = sum(kl) / len(kl) if kl else prev.get("skl")
        self.rows[rec["branch"]] = row
        if self.live:
            self.live.update(self._table())
        elif rec["step"] == rec["steps"]:
            self.console.print(
                f"{rec['branch']:>10}  cycle {rec['cycle']}  {rec['phase']:<3}  step {rec['step']}/{rec['steps']}  "
                f"reward {_f(rec.get('reward_mean'))}  overlap {_f(row['overlap'])}  symKL(top-k union) {_f(row['skl'])}"
            )

    def event(self, msg: str) -> None:
        if "StageStarted" in msg or "Merg" in msg or "Succeeded" in msg or "Failed" in msg:
            self.header = msg.split(": ", 1)[-1]
        if self.live:
            self.live.console.print(msg)
            self.live.update(self._table())
        else:
            self.console.print(msg)


def _f(x) -> str:
    return "" if x is None else f"{x:.3f}"
