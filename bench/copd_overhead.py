"""CoPD's cost beyond the training itself: CoPD vs mixed RLVR at the same updates and samples.

Both methods come from the comparison harness (`experiments/compare`), not copies of it:

- CoPD: the comparison's CoPDRun manifest (`methods.manifest`: K branches = domains, C cycles of
  S_RL RL + S_OPD OPD steps, mesh, linear merge) executed by `copd run`'s executor,
  `copd_runtime.local.runner.LocalRun` (decide → stages with checkpoints → in-process hub →
  diagnose → merge).
- mixed RLVR: `methods.run_mixed`, one policy, B = K·C·(S_RL + S_OPD) GRPO steps on batches from
  every domain.

Same optimizer updates (B each) and the same sampled responses per update: OPD samples
`opd.samplesPerPrompt` = `rl.groupSize` responses for each of `rl.batchSize` prompts, as a GRPO
step does (the response lengths are the models' own; both totals are printed). Evaluation is
not CoPD's work nor RLVR's: `run_mixed`'s final evaluation is timed and left out.

The machine may be shared: the two methods run alternately (`--repeats` pairs, the order
flipped every pair), each with a fresh run storage, one torch thread; the ratio is taken per
pair and the median reported with its range.

Pieces of the CoPD run's time (seconds, from the executor's own actions; the step functions are
wrapped with a timer, nothing else is changed):
- `train_s`:  the optimizer steps (sampling, π_old, the update; RL and OPD), hub scoring excluded;
- `hub_s`:    teacher scoring inside OPD steps (`InProcessHub.score`) plus loading the teachers;
- `phase_s`:  stage starts and ends (load the branch's weights and optimizer, checkpoint) and the
              executor's loop (gather, decide, status writes);
- `diagnose_s`, `merge_s`.
mixed RLVR: `train_s` (its steps), `eval_s` (excluded).

Every piece is measured in wall and in CPU seconds (this process, all threads; `pieces_cpu`). Also:
`cpu_time_ratio` (CPU time: far less sensitive to other load on the machine than wall time) and
`copd_cpu_over_own_training` (the CoPD run's CPU time over its own `train_s` CPU time, both from the
same run: what the hub, phase changes, diagnose and merge add, independent of how fast mixed RLVR's
steps are; mixed batches draw from every domain at once, so their prompts and responses pad
differently from one domain's).

Prints one JSON line last: {"copd_vs_mixed_wall_ratio", "ratio_min", "ratio_max", "cpu_time_ratio",
"copd_cpu_over_own_training", "copd_s", "mixed_s", "pieces": {...}, "updates", "tokens_copd",
"tokens_mixed", ...}. Goal: ratio ≤ 1.25.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `experiments` is not installed: the repo root

from copd_core.cycle import Phase, RunBranchStage, RunDiagnose, RunMerge
from copd_core.spec import DiagnosticsSpec, OPDSpec, RLSpec
from copd_runtime.hub import InProcessHub
from copd_runtime.local.runner import LocalRun, read_metrics
from copd_runtime.recipes import stage as stage_module
from experiments.compare import methods
from experiments.compare.context import Ctx
from experiments.compare.spec import BudgetSpec, CompareSpec, cycle_schedule


class Clock:
    """Wall and CPU seconds (this process, all threads) per named piece."""

    def __init__(self):
        self.wall: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)

    @contextmanager
    def time(self, name: str):
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.wall[name] += time.perf_counter() - t0
            self.cpu[name] += time.process_time() - c0


@contextmanager
def timed_steps(clock: Clock, module, *names: str):
    """Instrumentation only: `module.<name>` (the step functions a stage or mixed RLVR calls) timed."""
    saved = {n: getattr(module, n) for n in names}

    def wrap(fn):
        def step(*a, **kw):
            with clock.time("steps"):
                return fn(*a, **kw)
        return step

    for n, fn in saved.items():
        setattr(module, n, wrap(fn))
    try:
        yield
    finally:
        for n, fn in saved.items():
            setattr(module, n, fn)


class TimedHub(InProcessHub):
    def __init__(self, *a, clock: Clock, **kw):
        super().__init__(*a, **kw)
        self.clock = clock

    def score(self, *a, **kw):
        with self.clock.time("hub_score"):
            return super().score(*a, **kw)


class TimedRun(LocalRun):
    """LocalRun as `copd run` runs it; only the time of each action is recorded."""

    def __init__(self, *a, **kw):
        super().__init__(*a, on_event=lambda s: None, **kw)
        self.clock = Clock()

    def _hub_for(self, cycle: int):
        with self.clock.time("hub_load"):
            plain = super()._hub_for(cycle)
        hub = TimedHub(plain.teacher_dirs, plain.temperature, plain.kind, plain.placement, clock=self.clock)
        hub._teachers = plain._teachers  # the teachers loaded (frozen) by LocalRun
        return hub

    def act(self, status, actions) -> None:
        for a in actions:
            name = ("diagnose" if isinstance(a, RunDiagnose) else "merge" if isinstance(a, RunMerge)
                    else "stages" if isinstance(a, RunBranchStage) else "other")
            with self.clock.time(name):
                super().act(status, [a])


class TimedCtx(Ctx):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.clock = Clock()

    def evaluate(self, policy):
        with self.clock.time("eval"):
            return super().evaluate(policy)


def _pieces(total: float, t: dict[str, float]) -> dict[str, float]:
    return {
        "train_s": t["steps"] - t["hub_score"],
        "hub_s": t["hub_score"] + t["hub_load"],
        "hub_score_s": t["hub_score"],
        "hub_load_s": t["hub_load"],
        "phase_s": total - t["steps"] - t["hub_load"] - t["diagnose"] - t["merge"],
        "diagnose_s": t["diagnose"],
        "merge_s": t["merge"],
    }


def run_copd(ctx: Ctx, seed: int) -> dict:
    b = ctx.spec.budget
    rl, opd = cycle_schedule(b.steps_per_cycle, b.rl_to_opd)
    storage = methods._fresh(methods.run_storage(ctx, "copd", seed))
    run = TimedRun(methods.manifest(ctx, "copd", seed, b.cycles, rl, opd), storage)
    with timed_steps(run.clock, stage_module, "grpo_step", "opd_step"), run.clock.time("total"):
        status = run.run()
    if status.phase != Phase.SUCCEEDED:
        raise RuntimeError(f"CoPD run ended {status.phase}: {status.message}")
    recs = read_metrics(storage / "metrics.jsonl")
    c = run.clock
    return {"wall_s": c.wall["total"], "cpu_s": c.cpu["total"],
            "pieces": _pieces(c.wall["total"], c.wall), "pieces_cpu": _pieces(c.cpu["total"], c.cpu),
            "updates": len(recs), "tokens": sum(int(r["tokens"]) for r in recs),
            "rl_updates": sum(r["phase"] == "RL" for r in recs), "opd_updates": sum(r["phase"] == "OPD" for r in recs)}


def run_mixed(ctx: TimedCtx, seed: int) -> dict:
    ctx.clock = c = Clock()
    with timed_steps(c, methods, "grpo_step"), c.time("total"):
        res = methods.run_mixed(ctx, seed)["mixed_rlvr"]
    return {"wall_s": c.wall["total"] - c.wall["eval"], "cpu_s": c.cpu["total"] - c.cpu["eval"],
            "eval_s": c.wall["eval"], "steps_cpu_s": c.cpu["steps"], "updates": res["updates"],
            "tokens": res.get("sampled_tokens")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cycles", type=int, default=2)
    ap.add_argument("--steps-per-cycle", type=int, default=20, help="T = S_RL + S_OPD per branch per cycle")
    ap.add_argument("--rl-to-opd", type=float, default=1.5)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3, help="pairs (CoPD, mixed), order flipped every pair")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--output", type=Path, default=None, help="run storage (default: a temporary directory)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)

    rl = RLSpec(group_size=a.group_size, batch_size=a.batch_size, learning_rate=5e-4,
                max_new_tokens=a.max_new_tokens, temperature=1.0)
    spec = CompareSpec(
        domains=["arith", "reverse", "maxbox"], seeds=[0], methods=["copd", "mixed_rlvr"], ratios=[],
        budget=BudgetSpec(cycles=a.cycles, steps_per_cycle=a.steps_per_cycle, rl_to_opd=a.rl_to_opd),
        rl=rl, opd=OPDSpec(beta=1.0, topology="mesh", samples_per_prompt=a.group_size, batch_size=a.batch_size),
        diagnostics=DiagnosticsSpec(top_k=8, probe_prompts=16), eval_size=8, pilot=None,
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = a.output or Path(tmp)
        ctx = TimedCtx(spec, root / "storage")
        # the runs read the base the context already resolved (no per-run copy of a builtin)
        base = ctx.storage / "base-models" / spec.base_model.removeprefix("builtin://")
        if base.is_dir():
            ctx.spec = ctx.spec.model_copy(update={"base_model": str(base)})
        pairs = []
        for i in range(a.repeats):
            order = ("copd", "mixed") if i % 2 == 0 else ("mixed", "copd")
            got = {}
            for m in order:
                got[m] = run_copd(ctx, 0) if m == "copd" else run_mixed(ctx, 0)
                print(json.dumps({"pair": i, "method": m, **got[m]}), file=sys.stderr, flush=True)
            pairs.append(got)

    ratios = [p["copd"]["wall_s"] / p["mixed"]["wall_s"] for p in pairs]
    cpu_ratios = [p["copd"]["cpu_s"] / p["mixed"]["cpu_s"] for p in pairs]
    own = [p["copd"]["cpu_s"] / p["copd"]["pieces_cpu"]["train_s"] for p in pairs]
    order = sorted(range(len(pairs)), key=lambda i: cpu_ratios[i])  # the pair of median CPU-time ratio
    mid = pairs[order[len(order) // 2]]
    copd, mixed = mid["copd"], mid["mixed"]
    b = spec.budget
    responses = len(spec.domains) * b.cycles * b.steps_per_cycle * a.batch_size * a.group_size
    print(json.dumps({
        "copd_vs_mixed_wall_ratio": round(statistics.median(ratios), 3),
        "ratio_min": round(min(ratios), 3), "ratio_max": round(max(ratios), 3),
        "ratios": [round(r, 3) for r in ratios],
        "cpu_time_ratio": round(statistics.median(cpu_ratios), 3), "cpu_time_ratios": [round(r, 3) for r in cpu_ratios],
        "copd_cpu_over_own_training": round(statistics.median(own), 3),
        "copd_cpu_over_own_training_range": [round(min(own), 3), round(max(own), 3)],
        "copd_s": round(copd["wall_s"], 2), "mixed_s": round(mixed["wall_s"], 2),
        "copd_cpu_s": round(copd["cpu_s"], 2), "mixed_cpu_s": round(mixed["cpu_s"], 2),
        "pieces": {k: round(v, 2) for k, v in copd["pieces"].items()},
        "pieces_cpu": {k: round(v, 2) for k, v in copd["pieces_cpu"].items()},
        "mixed_steps_cpu_s": round(mixed["steps_cpu_s"], 2),
        "mixed_eval_s_excluded": round(mixed["eval_s"], 2),
        "updates": {"copd": copd["updates"], "mixed": mixed["updates"], "copd_rl": copd["rl_updates"],
                    "copd_opd": copd["opd_updates"]},
        "responses_each": responses, "tokens_copd": copd["tokens"], "tokens_mixed": mixed["tokens"],
        "branches": len(spec.domains), "cycles": b.cycles, "steps_per_cycle": b.steps_per_cycle,
        "threads": a.threads, "repeats": a.repeats,
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
