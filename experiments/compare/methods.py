"""The methods of the comparison, one implementation each.

Every method starts from the same base model, sees the same domains and spends
the same number of optimizer updates (see `docs/science.md`, "Budget"). With K
domains, C cycles and T = S_RL + S_OPD updates per branch per cycle, the budget
is B = K·C·T.

The CoPD arms and the RL-only experts run through the runtime's own code, the
code `copd run` runs: each (method, seed) builds a CoPDRun manifest and hands it
to `copd_runtime.local.runner.LocalRun` (`decide` → `run_branch_stage` with
checkpoints → `InProcessHub` → `diagnose` → `merge_dirs`), in its own storage
`<output>/storage/<method>/seed-<s>/`:

- `experts`        CoPDRun with C cycles × (T RL, 0 OPD); scored as "expert k on domain k".
- `experts_merged` the same run's merge (linear average, no OPD).
- `copd`           CoPDRun with C cycles × (S_RL, S_OPD), mesh, linear merge.
- `copd@r`         the same with S_RL:S_OPD ≈ r (`cycle_schedule`) at the same per-branch total C·T.
- `copd_oneshot`   CoPDRun with 1 cycle × (C·S_RL RL, C·S_OPD mutual OPD).
- `copd_adaptive`  `copd` with schedule.mode adaptive (`adaptive` thresholds of the comparison spec): per
                   cycle, a direction distils only while its measured alignment asks for it; a branch
                   with no distilling direction spends the cycle's OPD steps on RL (same C·T per branch).

Two arms a CoPDRun spec cannot express drive the same stage function,
`run_branch_stage`, directly (same checkpoints, hub, diagnose and merge code):

- `copd_oneway`    only branch 0 distils (from the others, frozen at the start of its OPD
                   stage); the others never distil and spend their OPD slots on RL: their RL
                   stage is T steps, paused with a checkpoint after S_RL steps (the suspend
                   path) while branch 0 distils, then resumed.
- `static_opd`     K experts run CoPD's RL stages without the OPD stages (C·S_RL RL steps
                   each), then ONE student (the base model) distils from all K finished
                   experts for K·C·S_OPD steps (hub-and-spoke with the student as the hub).

`mixed_rlvr` is one policy trained in memory with the runtime's `grpo_step`: B steps
on batches drawn from the union of the domains, each response scored by its own
domain's verifier (`reward_fn`).

Step seeds are the runtime's: (seed, branch, cycle, stage, step). Methods that share
a prefix draw the same samples: `experts` and `copd` in cycle 1's first S_RL steps,
the non-distilling branches of `copd_oneway` and `experts` throughout.
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
import statistics
from pathlib import Path

from copd_core.cycle import Phase, RunDiagnose, Stage
from copd_core.spec import (
    API_GROUP,
    API_VERSION,
    BaseModelSpec,
    BranchSpec,
    CoPDRunManifest,
    CoPDRunSpec,
    MergeReadinessSpec,
    ObjectMeta,
    RewardSpec,
    ScheduleSpec,
)
from copd_runtime.checkpoint import latest_checkpoint
from copd_runtime.data.examples import Dataset
from copd_runtime.data.rewards import score
from copd_runtime.hub import InProcessHub
from copd_runtime.local.runner import LocalRun, read_metrics
from copd_runtime.recipes.diagnose import diagnose
from copd_runtime.recipes.evaluate import accuracy
from copd_runtime.recipes.grpo import grpo_step
from copd_runtime.recipes.merge import merge_dirs
from copd_runtime.recipes.stage import branch_datasets, run_branch_stage, stage_start_model
from experiments.compare.context import Ctx, dataset_spec, reward_spec, seeded
from experiments.compare.spec import CompareSpec, cycle_schedule, ratio_name

STUDENT = "student"  # static OPD's student branch


# ---------------------------------------------------------------------------
# CoPDRun manifests and their storage


def run_storage(ctx: Ctx, method: str, seed: int) -> Path:
    return ctx.storage / method / f"seed-{seed}"


def _fresh(path: Path) -> Path:
    """A job restarts from scratch: its result file is written only once it has finished."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def manifest(ctx: Ctx, method: str, seed: int, cycles: int, rl_steps: int, opd_steps: int,
             student: bool = False, adaptive: bool = False) -> CoPDRunManifest:
    """The CoPDRun of one (method, seed): the comparison's recipe, branches = domains.

    `mergeReadiness.minCycles` = `cycles`: readiness is tested only after the last cycle,
    so that every method spends its whole budget (an early merge would spend fewer
    updates); whether the branches were ready then is recorded (`merge_ready`).
    `student` adds static OPD's student branch as the hub of a hub-and-spoke topology.
    `adaptive`: schedule.mode adaptive with the comparison's `adaptive` thresholds.
    """
    s = ctx.spec
    branches = [BranchSpec(name=d, dataset=dataset_spec(ctx.storage, d), reward=reward_spec(d)) for d in s.domains]
    opd = s.opd
    if student:  # its own dataset is never used: it only distils
        branches.append(BranchSpec(name=STUDENT, dataset=dataset_spec(ctx.storage, s.domains[0])))
        opd = opd.model_copy(update={"topology": "hub-and-spoke", "hub": STUDENT})
    spec = CoPDRunSpec(
        base_model=BaseModelSpec(uri=s.base_uri()),
        branches=branches,
        schedule=ScheduleSpec(cycles=cycles, rl_steps_per_cycle=rl_steps, opd_steps_per_cycle=opd_steps,
                              mode="adaptive" if adaptive else "fixed", adaptive=s.adaptive),
        rl=s.rl, opd=opd, diagnostics=s.diagnostics,
        merge_readiness=MergeReadinessSpec(min_cycles=cycles),
        seed=seed,
    )
    name = re.sub(r"[^a-z0-9-]+", "-", f"{method}-seed-{seed}".lower()).strip("-")[:53]
    return CoPDRunManifest(apiVersion=f"{API_GROUP}/{API_VERSION}", kind="CoPDRun",
                           metadata=ObjectMeta(name=name, namespace="compare"), spec=spec)


def _own_eval(ctx: Ctx, storage: Path, cycle: int, model_dirs: dict[str, Path]) -> None:
    """Observation only: each branch's own-domain accuracy at the end of a cycle (alignment plot)."""
    from copd_runtime.models.policy import load_policy

    mnt = ctx.spec.rl.max_new_tokens
    own = {b: round(accuracy(load_policy(d), ctx.data[b], mnt), 4) for b, d in model_dirs.items() if b in ctx.data}
    p = storage / "own_eval" / f"cycle-{cycle:03d}.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(own))


class ComparedRun(LocalRun):
    """`copd run`'s executor, unchanged, plus one observation after each Diagnose action:
    every branch's own-domain accuracy on the comparison's eval set. Training is untouched."""

    def __init__(self, ctx: Ctx, manifest: CoPDRunManifest, storage: Path):
        super().__init__(manifest, storage, on_event=self._log)
        self.ctx = ctx

    def _log(self, message: str) -> None:
        with open(self.out / "events.log", "a") as f:
            f.write(message + "\n")

    def act(self, status, actions) -> None:
        super().act(status, actions)
        for a in actions:
            if isinstance(a, RunDiagnose):
                _own_eval(self.ctx, self.out, a.cycle, self.final_model_dirs())


def run_copdrun(ctx: Ctx, method: str, seed: int, cycles: int, rl_steps: int, opd_steps: int,
                adaptive: bool = False) -> dict:
    """Run one CoPDRun through LocalRun; return the branches' and the merged model's scores and records."""
    st = _fresh(run_storage(ctx, method, seed))
    run = ComparedRun(ctx, manifest(ctx, method, seed, cycles, rl_steps, opd_steps, adaptive=adaptive), st)
    status = run.run()
    if status.phase != Phase.SUCCEEDED:
        raise RuntimeError(f"{method} seed {seed}: CoPDRun ended {status.phase}: see {st / 'events.log'}")
    br_eval = {b: ctx.evaluate_dir(d) for b, d in run.final_model_dirs().items()}
    return {
        "eval": ctx.evaluate_dir(st / "merged"), "branches": br_eval, "cycles": cycle_records(ctx, st),
        "schedule": [[rl_steps, opd_steps]] * cycles, "merge_ready": status.merge_ready,
        **({"adaptive_plan": adaptive_plan(st, ctx.spec.domains)} if adaptive else {}),
        "executor": "LocalRun", "storage": str(st.relative_to(ctx.storage.parent)), **totals(ctx, st),
    }


# ---------------------------------------------------------------------------
# Records read back from a run's storage


def totals(ctx: Ctx, storage: Path) -> dict:
    """Updates and sampled responses, counted from the steps the run recorded (metrics.jsonl)."""
    s = ctx.spec
    recs = read_metrics(storage / "metrics.jsonl")
    rl = sum(r["phase"] == "RL" for r in recs)
    opd = sum(r["phase"] == "OPD" for r in recs)
    return {"updates": rl + opd, "rl_updates": rl, "opd_updates": opd,
            "skipped_updates": int(sum(r.get("skipped", 0.0) for r in recs)),
            "rollouts": rl * s.rl.batch_size * s.rl.group_size
            + opd * (s.opd.batch_size or s.rl.batch_size) * s.opd.samples_per_prompt}


def adaptive_plan(storage: Path, branches: list[str]) -> list[dict]:
    """Per cycle, what the adaptive schedule had each branch do, read back from the steps it ran: RL and
    OPD steps, and the teachers it distilled from (the OPD records name them)."""
    recs = read_metrics(storage / "metrics.jsonl")
    out = []
    for c in sorted({r["cycle"] for r in recs}):
        row = {}
        for b in branches:
            mine = [r for r in recs if r["branch"] == b and r["cycle"] == c]
            opd = [r for r in mine if r["phase"] == "OPD"]
            row[b] = {"rl": sum(r["phase"] == "RL" for r in mine), "opd": len(opd),
                      "teachers": sorted({k.split("/", 1)[1] for r in opd for k in r if k.startswith("mass_overlap/")})}
        out.append({"cycle": c, "branches": row,
                    "directions_distilling": sum(len(v["teachers"]) for v in row.values())})
    return out


def cycle_records(ctx: Ctx, storage: Path) -> list[dict]:
    """Per cycle: the Diagnose stage's directions, each branch's own-domain score and mean RL reward.
    Cycle 0 is the common base (every branch = the base: overlap 1, symmetric KL 0)."""
    recs = read_metrics(storage / "metrics.jsonl")
    domains = ctx.spec.domains
    out = [{"cycle": 0,
            "directions": [{"student": a, "teacher": b, "topk_overlap": 1.0, "symmetric_kl": 0.0}
                           for a in domains for b in domains if a != b],
            "branches": {b: {"own_eval": ctx.base_eval[b], "rl_reward": None, "rl_steps": 0, "opd_steps": 0}
                         for b in domains}}]
    for p in sorted((storage / "diagnostics").glob("cycle-*.json")):
        c = int(p.stem.removeprefix("cycle-"))
        own = json.loads((storage / "own_eval" / p.name).read_text())
        dirs = [{k: r[k] for k in ("student", "teacher", "topk_overlap", "symmetric_kl", "mass_overlap") if k in r}
                for r in json.loads(p.read_text())]
        br = {}
        for b in domains:
            mine = [r for r in recs if r["branch"] == b and r["cycle"] <= c]
            rl = [r["reward_mean"] for r in mine if r["phase"] == "RL" and r["cycle"] == c]
            br[b] = {"own_eval": own[b], "rl_reward": statistics.fmean(rl) if rl else None,
                     "rl_steps": sum(r["phase"] == "RL" for r in mine),
                     "opd_steps": sum(r["phase"] == "OPD" for r in mine)}
        out.append({"cycle": c, "directions": dirs, "branches": br})
    return out


def _sink(storage: Path):
    def write(record: dict) -> None:
        with open(storage / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
    return write


def _pause_after(n: int):
    """`should_stop` for `run_branch_stage`: stop (with a checkpoint) after `n` steps of this call."""
    calls = itertools.count()
    return lambda: next(calls) >= n


def _frozen_hub(spec: CoPDRunSpec, storage: Path, teachers: list[str], cycle: int) -> InProcessHub:
    """Teachers as they were when the student's OPD stage began, loaded now (as LocalRun does)."""
    hub = InProcessHub({t: stage_start_model(spec, storage, t, cycle, "OPD") for t in teachers},
                       spec.rl.temperature, spec.base_model.kind)
    for t in teachers:
        hub.teacher(t)
    return hub


def _latest_dirs(storage: Path, names: list[str]) -> dict[str, Path]:
    return {b: latest_checkpoint(storage, b)[1] for b in names}


# ---------------------------------------------------------------------------
# Methods. Each returns {method_name: result}; a result has "eval" {domain: score},
# "updates", "rl_updates", "opd_updates", "rollouts" and optionally "branches" / "cycles".


def run_experts(ctx: Ctx, seed: int) -> dict[str, dict]:
    b = ctx.spec.budget
    r = run_copdrun(ctx, "experts", seed, b.cycles, b.steps_per_cycle, 0)
    experts = {d: r["branches"][d][d] for d in ctx.spec.domains}
    return {
        "experts": {**r, "eval": experts, "note": "expert k scored on domain k (K separate models, oracle routing)"},
        "experts_merged": {**r, "cycles": None, "note": "the experts run's merge: linear average, no OPD"},
    }


def run_copd(ctx: Ctx, seed: int, ratio: float, name: str) -> dict[str, dict]:
    b = ctx.spec.budget
    rl, opd = cycle_schedule(b.steps_per_cycle, ratio)
    return {name: run_copdrun(ctx, name, seed, b.cycles, rl, opd)}


def run_copd_adaptive(ctx: Ctx, seed: int) -> dict[str, dict]:
    """`copd` (S_RL:S_OPD = rlToOpd, C cycles) with schedule.mode adaptive: the same CoPDRun executor,
    `decide` choosing each cycle's distilling directions from the Diagnose stage's mass overlaps."""
    b = ctx.spec.budget
    rl, opd = cycle_schedule(b.steps_per_cycle, b.rl_to_opd)
    return {"copd_adaptive": run_copdrun(ctx, "copd_adaptive", seed, b.cycles, rl, opd, adaptive=True)}


def run_copd_oneshot(ctx: Ctx, seed: int) -> dict[str, dict]:
    b = ctx.spec.budget
    rl, opd = cycle_schedule(b.steps_per_cycle, b.rl_to_opd)
    return {"copd_oneshot": run_copdrun(ctx, "copd_oneshot", seed, 1, b.cycles * rl, b.cycles * opd)}


def run_copd_oneway(ctx: Ctx, seed: int) -> dict[str, dict]:
    """One-way OPD: not expressible as a CoPDRun (every branch of a run is a student in OPD), so
    this drives the runtime's `run_branch_stage`, `diagnose` and `merge_dirs` directly."""
    s, name = ctx.spec, "copd_oneway"
    C, T = s.budget.cycles, s.budget.steps_per_cycle
    rl, opd = cycle_schedule(T, s.budget.rl_to_opd)
    st = _fresh(run_storage(ctx, name, seed))
    distils = manifest(ctx, name, seed, C, rl, opd).spec  # branch 0: S_RL RL, then S_OPD OPD from its peers
    rl_only = manifest(ctx, name, seed, C, T, 0).spec  # the others: one RL stage of T steps per cycle
    student, others = s.domains[0], s.domains[1:]
    datasets = branch_datasets(distils, st)
    kw = {"sink": _sink(st), "run_name": name, "datasets": datasets}
    for c in range(1, C + 1):
        run_branch_stage(distils, st, student, c, Stage.RL, **kw)
        for b in others:  # RL, paused with a checkpoint after S_RL steps
            run_branch_stage(rl_only, st, b, c, Stage.RL, should_stop=_pause_after(rl), **kw)
        hub = _frozen_hub(distils, st, others, c)
        run_branch_stage(distils, st, student, c, Stage.OPD, hub=hub, **kw)
        for b in others:  # resumed from that checkpoint: the OPD slot spent on RL
            run_branch_stage(rl_only, st, b, c, Stage.RL, **kw)
        dirs = _latest_dirs(st, s.domains)
        rows = diagnose(distils, dirs, datasets, c)
        (st / "diagnostics").mkdir(exist_ok=True)
        (st / "diagnostics" / f"cycle-{c:03d}.json").write_text(json.dumps([r.as_dict() for r in rows]))
        _own_eval(ctx, st, c, dirs)
    dirs = _latest_dirs(st, s.domains)
    merge_dirs([dirs[d] for d in s.domains], [1.0] * len(s.domains), st / "merged")
    return {name: {"eval": ctx.evaluate_dir(st / "merged"), "branches": {b: ctx.evaluate_dir(d) for b, d in dirs.items()},
                   "cycles": cycle_records(ctx, st), "schedule": [[rl, opd]] * C, "executor": "run_branch_stage",
                   "storage": str(st.relative_to(ctx.storage.parent)), **totals(ctx, st)}}


def run_static_opd(ctx: Ctx, seed: int) -> dict[str, dict]:
    """Static (multi-teacher) OPD through `run_branch_stage`: experts = CoPD's RL stages without its
    OPD stages; then the base model, as the hub of a hub-and-spoke spec, distils from all of them."""
    s, name = ctx.spec, "static_opd"
    C, T, K = s.budget.cycles, s.budget.steps_per_cycle, len(s.domains)
    rl, opd = cycle_schedule(T, s.budget.rl_to_opd)
    st = _fresh(run_storage(ctx, name, seed))
    experts = manifest(ctx, name, seed, C, rl, 0).spec
    datasets = branch_datasets(experts, st)
    kw = {"sink": _sink(st), "run_name": name, "datasets": datasets}
    for c in range(1, C + 1):
        for d in s.domains:
            run_branch_stage(experts, st, d, c, Stage.RL, **kw)
    distil = manifest(ctx, name, seed, 1, 0, K * C * opd, student=True).spec
    hub = InProcessHub(_latest_dirs(st, s.domains), s.rl.temperature, distil.base_model.kind)
    run_branch_stage(distil, st, STUDENT, 1, Stage.OPD, hub=hub, **kw)
    diag = [r for r in read_metrics(st / "metrics.jsonl") if r["branch"] == STUDENT]
    keys = sorted({k for r in diag for k in r if "/" in k})
    return {name: {"eval": ctx.evaluate_dir(latest_checkpoint(st, STUDENT)[1]),
                   "branches": {d: ctx.evaluate_dir(p) for d, p in _latest_dirs(st, s.domains).items()},
                   "opd_diag": {k: statistics.fmean(r[k] for r in diag if k in r) for k in keys},
                   "executor": "run_branch_stage", "storage": str(st.relative_to(ctx.storage.parent)),
                   **totals(ctx, st), "note": "student = base model; multi-teacher OPD"}}


def run_mixed(ctx: Ctx, seed: int) -> dict[str, dict]:
    """One policy, B steps of the runtime's `grpo_step` on batches from all domains, each response
    scored by its own domain's verifier."""
    s = ctx.spec
    pool = Dataset(domain="mixed", train=[ex for d in s.domains for ex in ctx.data[d].train], eval=[],
                   reward=RewardSpec())
    verifier = {d: ctx.data[d].reward for d in s.domains}

    def reward_fn(text: str, ex) -> float:
        return score(text, ex.answer, verifier[ex.domain])

    b = ctx.branch("mixed")
    n = len(s.domains) * s.budget.cycles * s.budget.steps_per_cycle
    skipped, tokens = 0.0, 0
    for i in range(n):
        m = grpo_step(b.policy, b.optimizer, pool, s.rl, seeded(seed, "RL", "mixed", i), reward_fn)
        skipped += m["skipped"]
        tokens += m["tokens"]
    return {"mixed_rlvr": {"eval": ctx.evaluate(b.policy), "updates": n, "rl_updates": n, "opd_updates": 0,
                           "skipped_updates": int(skipped), "rollouts": n * s.rl.batch_size * s.rl.group_size,
                           "sampled_tokens": tokens, "executor": "grpo_step"}}


def job_list(spec: CompareSpec) -> list[tuple[str, int]]:
    jobs = []
    for seed in spec.seeds:
        for m in spec.methods:
            if m == "experts_merged" and "experts" in spec.methods:
                continue  # produced by the experts job
            jobs.append((m, seed))
        for r in spec.ratios:
            jobs.append((ratio_name(r), seed))
    return jobs


def run_job(ctx: Ctx, method: str, seed: int) -> dict[str, dict]:
    s = ctx.spec
    if method in ("experts", "experts_merged"):
        out = run_experts(ctx, seed)
        return {k: v for k, v in out.items() if k in s.methods or k == method}
    if method == "mixed_rlvr":
        return run_mixed(ctx, seed)
    if method == "static_opd":
        return run_static_opd(ctx, seed)
    if method == "copd":
        return run_copd(ctx, seed, s.budget.rl_to_opd, "copd")
    if method == "copd_oneway":
        return run_copd_oneway(ctx, seed)
    if method == "copd_oneshot":
        return run_copd_oneshot(ctx, seed)
    if method == "copd_adaptive":
        return run_copd_adaptive(ctx, seed)
    if method.startswith("copd@"):
        return run_copd(ctx, seed, float(method[5:]), method)
    raise ValueError(f"unknown method {method!r}")
