"""`copd compare`: CoPD against its baselines and ablations at one optimizer-step budget.

Every method starts from the same base model, sees the same domains and spends
the same number of optimizer updates (see `docs/science.md`, "Budget"). With K
domains, C cycles and T = S_RL + S_OPD updates per branch per cycle, the budget
is B = K·C·T:

- `experts`        K RL-only branches, C·T RL steps each; scored as "expert k on domain k".
- `experts_merged` the same experts, linearly averaged (0 extra steps): merge without OPD.
- `mixed_rlvr`     one policy, B GRPO steps on batches drawn from all domains.
- `static_opd`     K experts with C·S_RL RL steps each (CoPD's RL total), then ONE student
                   (the base model) distils from all K finished experts for K·C·S_OPD steps.
- `copd`           K branches, C cycles of (S_RL RL, S_OPD mutual OPD, mesh), linear merge.
- `copd_oneway`    branch 0 distils from the others; the others never distil (their OPD
                   slots become RL steps), merged.
- `copd_oneshot`   C·S_RL RL steps, then one mutual OPD phase of C·S_OPD steps, merged.
- `copd@r`         CoPD with S_RL:S_OPD = r at the same per-branch total C·T.

Jobs are (method, seed); each writes `runs/<method>/seed-<s>.json`, so an
interrupted comparison continues where it stopped. Step seeds are derived from
(seed, phase, branch, step index) and not from the method, so methods that share
a prefix (e.g. the first RL stage of `experts` and `copd`) draw the same samples.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from pathlib import Path
from typing import Literal

import torch
import yaml
from pydantic import Field, model_validator

from copd_core.seeding import step_seed
from copd_core.spec import DiagnosticsSpec, OPDSpec, RLSpec, TruncationRule, _Model
from copd_runtime.data.datasets import load_dataset
from copd_runtime.data.examples import Dataset
from copd_runtime.data.rewards import score
from copd_runtime.hub import InProcessHub
from copd_runtime.maths.losses import group_advantages_P_G
from copd_runtime.model_uri import resolve_model_dir
from copd_runtime.models.policy import Policy, load_policy
from copd_runtime.recipes.diagnose import measure_direction
from copd_runtime.recipes.evaluate import accuracy
from copd_runtime.recipes.grpo import grpo_step, policy_update
from copd_runtime.recipes.merge import linear_merge
from copd_runtime.recipes.opd import opd_step
from copd_runtime.rollout import sample

BASE_METHODS = ("experts", "experts_merged", "mixed_rlvr", "static_opd", "copd", "copd_oneway", "copd_oneshot")


# ---------------------------------------------------------------------------
# Spec


class BudgetSpec(_Model):
    cycles: int = Field(4, ge=1, le=100, description="C: RL→OPD cycles of CoPD.")
    steps_per_cycle: int = Field(15, ge=2, le=10_000, description="T = S_RL + S_OPD per branch per cycle.")
    rl_to_opd: float = Field(1.5, gt=0.0, le=100.0, description="S_RL : S_OPD of `copd` (paper default 1.5).")


class PilotSpec(_Model):
    domains: list[str] = Field(default_factory=lambda: ["arith", "reverse", "maxbox"])
    teacher_steps: list[int] = Field(default_factory=lambda: [0, 10, 20, 40, 80, 120],
                                     description="RL steps of the teacher checkpoints from the common start.")
    opd_steps: int = Field(15, ge=1, description="Fixed OPD budget the student spends on each teacher.")
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])


class CompareSpec(_Model):
    base_model: str = "builtin://tiny-qwen3"
    domains: list[str] = Field(default_factory=lambda: ["arith", "reverse", "maxbox"], min_length=2)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    budget: BudgetSpec = Field(default_factory=BudgetSpec)
    methods: list[str] = Field(default_factory=lambda: list(BASE_METHODS))
    ratios: list[float] = Field(default_factory=lambda: [0.5, 1.0, 1.5, 3.0],
                                description="S_RL:S_OPD ablation; one `copd@r` method per ratio.")
    rl: RLSpec = Field(default_factory=lambda: RLSpec(learning_rate=5e-4, max_new_tokens=12))
    opd: OPDSpec = Field(default_factory=OPDSpec)
    diagnostics: DiagnosticsSpec = Field(default_factory=DiagnosticsSpec)
    eval_size: int = Field(200, ge=8, description="Held-out examples per domain.")
    data_seed: int = Field(0, ge=0, description="Seed of the datasets (the same for every method and seed).")
    static_opd_student: Literal["base", "mixed"] = Field(
        "base", description="Student of static OPD (only `base`, the common start, is implemented).")
    pilot: PilotSpec | None = Field(default_factory=PilotSpec)

    @model_validator(mode="after")
    def _check(self) -> CompareSpec:
        unknown = [m for m in self.methods if m not in BASE_METHODS]
        if unknown:
            raise ValueError(f"methods: unknown {unknown}; known {list(BASE_METHODS)} (ratios via `ratios`)")
        if self.static_opd_student != "base":
            raise ValueError("staticOpdStudent: only `base` is implemented")
        return self

    def method_names(self) -> list[str]:
        return list(self.methods) + [ratio_name(r) for r in self.ratios]


def ratio_name(r: float) -> str:
    return f"copd@{r:g}"


def load_compare_spec(path: str | Path) -> CompareSpec:
    doc = yaml.safe_load(Path(path).read_text())
    if isinstance(doc, dict) and "spec" in doc:
        doc = doc["spec"]
    return CompareSpec.model_validate(doc)


def split_steps(total: int, ratio: float, cycles: int) -> list[tuple[int, int]]:
    """Per-cycle (S_RL, S_OPD) for `cycles` cycles of `total` steps per branch, RL:OPD = ratio.

    Totals are exact (RL total = round(C·T·r/(1+r))); per-cycle counts are spread by
    cumulative rounding, so e.g. 45 RL steps over 4 cycles go 11, 11, 12, 11.
    """
    per_branch = total * cycles
    rl_total = math.floor(per_branch * ratio / (1 + ratio) + 0.5)

    def cum(x: float) -> int:
        return math.floor(x + 0.5)

    out = []
    for c in range(cycles):
        rl = cum(rl_total * (c + 1) / cycles) - cum(rl_total * c / cycles)
        out.append((rl, total - rl))
    return out


# ---------------------------------------------------------------------------
# Building blocks


class MemoryHub(InProcessHub):
    """The in-process hub, serving frozen in-memory snapshots instead of directories."""

    def __init__(self, teachers: dict[str, Policy], temperature: float):
        super().__init__({n: Path(f"<memory:{n}>") for n in teachers}, temperature)
        for name, p in teachers.items():
            snap = copy.deepcopy(p)
            snap.model.requires_grad_(False)
            snap.model.eval()
            self._teachers[name] = snap


class Branch:
    def __init__(self, name: str, base: Policy, lr: float):
        self.name = name
        self.policy = copy.deepcopy(base)
        self.optimizer = torch.optim.AdamW(self.policy.model.parameters(), lr=lr, weight_decay=0.0)
        self.rl_steps = self.opd_steps = self.rollouts = 0
        self.rewards: list[tuple[str, float]] = []  # (phase, reward_mean) per step
        self.opd_diag: list[dict] = []


class Ctx:
    """Everything a job needs: spec, base policy, datasets. Built once per process."""

    def __init__(self, spec: CompareSpec, storage: Path):
        self.spec = spec
        self.base = load_policy(resolve_model_dir(spec.base_model, storage))
        from copd_core.spec import DatasetSpec

        self.data: dict[str, Dataset] = {
            d: load_dataset(d, DatasetSpec(builtin=d), None, storage, spec.data_seed, eval_size=spec.eval_size)
            for d in spec.domains
        }
        self._base_eval: dict[str, float] | None = None

    def branch(self, name: str) -> Branch:
        return Branch(name, self.base, self.spec.rl.learning_rate)

    def evaluate(self, policy: Policy) -> dict[str, float]:
        return {d: round(accuracy(policy, ds, self.spec.rl.max_new_tokens), 4) for d, ds in self.data.items()}

    @property
    def base_eval(self) -> dict[str, float]:
        if self._base_eval is None:
            self._base_eval = self.evaluate(self.base)
        return self._base_eval


def _seed(seed: int, *parts) -> random.Random:
    s = step_seed(seed, *parts)
    torch.manual_seed(s)
    return random.Random(s)


def do_rl(ctx: Ctx, b: Branch, n: int, seed: int, data: Dataset | None = None) -> None:
    data = data or ctx.data[b.name]
    for _ in range(n):
        rng = _seed(seed, "RL", b.name, b.rl_steps)
        m = grpo_step(b.policy, b.optimizer, data, ctx.spec.rl, rng)
        b.rl_steps += 1
        b.rollouts += ctx.spec.rl.batch_size * ctx.spec.rl.group_size
        b.rewards.append(("RL", m["reward_mean"]))


def do_opd(ctx: Ctx, b: Branch, teachers: list[str], hub, n: int, seed: int) -> None:
    s = ctx.spec
    peers = {t: ctx.data[t] for t in teachers}
    for _ in range(n):
        rng = _seed(seed, "OPD", b.name, b.opd_steps)
        m = opd_step(b.policy, b.optimizer, peers, hub, s.opd.beta, s.rl, s.opd, s.diagnostics, rng)
        b.opd_steps += 1
        b.rollouts += (s.opd.batch_size or s.rl.batch_size) * s.opd.samples_per_prompt
        b.rewards.append(("OPD", m["reward_mean"]))
        b.opd_diag.append({k: v for k, v in m.items() if "/" in k})


def mixed_grpo_step(policy: Policy, optimizer, datasets: list[Dataset], rl: RLSpec, rng: random.Random) -> dict:
    """`grpo_step` on a batch drawn from the union of domains, each example scored by its own verifier."""
    reward_of = {ds.domain: ds.reward for ds in datasets}
    pool = [ex for ds in datasets for ex in ds.train]
    prompts = rng.sample(pool, min(rl.batch_size, len(pool)))
    group = [ex for ex in prompts for _ in range(rl.group_size)]
    rollout = sample(policy, group, rl.max_new_tokens, rl.temperature)
    r = torch.tensor([score(t, ex.answer, reward_of[ex.domain]) for t, ex in zip(rollout.responses, rollout.examples)])
    if rl.truncation == TruncationRule.ZERO_REWARD:
        r = torch.where(rollout.truncated, torch.zeros_like(r), r)
    r = r.view(len(prompts), rl.group_size)
    loss_mask = rollout.response_mask.clone()
    if rl.truncation == TruncationRule.MASK:
        loss_mask[rollout.truncated] = 0.0
    adv = group_advantages_P_G(r).reshape(-1).unsqueeze(1) * loss_mask
    stats = policy_update(policy, optimizer, rollout, adv, loss_mask, rl)
    return {"reward_mean": r.mean().item(), **stats}


def merged_policy(ctx: Ctx, branches: list[Branch]) -> Policy:
    states = [b.policy.model.state_dict() for b in branches]
    merged = linear_merge(states, [1.0] * len(states))
    p = copy.deepcopy(ctx.base)
    p.model.load_state_dict(merged)
    return p


def cycle_record(ctx: Ctx, branches: list[Branch], cycle: int, seed: int, since: dict[str, int]) -> dict:
    """Alignment of every (student, teacher) pair on the teacher's probe set, own-domain score, reward."""
    s = ctx.spec
    dirs = []
    for st in branches:
        for te in branches:
            if st is te:
                continue
            probe = ctx.data[te.name].eval[: s.diagnostics.probe_prompts]
            ov, kl = measure_direction(st.policy, te.policy, probe, s.diagnostics.top_k, s.rl.max_new_tokens,
                                       s.rl.temperature, step_seed(seed, "probe", st.name, te.name, cycle))
            dirs.append({"student": st.name, "teacher": te.name, "topk_overlap": ov, "symmetric_kl": kl})
    br = {}
    for b in branches:
        rl = [r for ph, r in b.rewards[since.get(b.name, 0):] if ph == "RL"]
        br[b.name] = {
            "own_eval": round(accuracy(b.policy, ctx.data[b.name], s.rl.max_new_tokens), 4),
            "rl_reward": sum(rl) / len(rl) if rl else None,
            "rl_steps": b.rl_steps, "opd_steps": b.opd_steps,
        }
        since[b.name] = len(b.rewards)
    return {"cycle": cycle, "directions": dirs, "branches": br}


# ---------------------------------------------------------------------------
# Methods. Each returns {method_name: result}; a result has "eval" {domain: score},
# "updates", "rollouts" and optionally "branches" / "cycles".


def _totals(branches: list[Branch]) -> dict:
    return {"updates": sum(b.rl_steps + b.opd_steps for b in branches),
            "rl_updates": sum(b.rl_steps for b in branches), "opd_updates": sum(b.opd_steps for b in branches),
            "rollouts": sum(b.rollouts for b in branches)}


def run_experts(ctx: Ctx, seed: int) -> dict[str, dict]:
    s = ctx.spec
    per_cycle = s.budget.steps_per_cycle
    branches = [ctx.branch(d) for d in s.domains]
    since: dict[str, int] = {}
    cycles = [cycle_record(ctx, branches, 0, seed, since)]
    for c in range(1, s.budget.cycles + 1):
        for b in branches:
            do_rl(ctx, b, per_cycle, seed)
        cycles.append(cycle_record(ctx, branches, c, seed, since))
    br_eval = {b.name: ctx.evaluate(b.policy) for b in branches}
    tot = _totals(branches)
    merged = ctx.evaluate(merged_policy(ctx, branches))
    return {
        "experts": {"eval": {d: br_eval[d][d] for d in s.domains}, "branches": br_eval, "cycles": cycles, **tot,
                    "note": "expert k scored on domain k (K separate models, oracle routing)"},
        "experts_merged": {"eval": merged, "branches": br_eval, **tot,
                           "note": "linear average of the experts, no OPD"},
    }


def run_mixed(ctx: Ctx, seed: int) -> dict[str, dict]:
    s = ctx.spec
    b = ctx.branch("mixed")
    n = len(s.domains) * s.budget.cycles * s.budget.steps_per_cycle
    ds = list(ctx.data.values())
    for i in range(n):
        rng = _seed(seed, "RL", "mixed", i)
        mixed_grpo_step(b.policy, b.optimizer, ds, s.rl, rng)
        b.rl_steps += 1
        b.rollouts += s.rl.batch_size * s.rl.group_size
    return {"mixed_rlvr": {"eval": ctx.evaluate(b.policy), **_totals([b])}}


def run_static_opd(ctx: Ctx, seed: int) -> dict[str, dict]:
    s = ctx.spec
    sched = split_steps(s.budget.steps_per_cycle, s.budget.rl_to_opd, s.budget.cycles)
    rl_total, opd_total = sum(r for r, _ in sched), sum(o for _, o in sched)
    experts = [ctx.branch(d) for d in s.domains]
    for b in experts:
        do_rl(ctx, b, rl_total, seed)
    student = ctx.branch("student")
    hub = MemoryHub({b.name: b.policy for b in experts}, s.rl.temperature)
    do_opd(ctx, student, list(s.domains), hub, opd_total * len(s.domains), seed)
    br_eval = {b.name: ctx.evaluate(b.policy) for b in experts}
    diag = _mean_diag(student.opd_diag)
    return {"static_opd": {"eval": ctx.evaluate(student.policy), "branches": br_eval, "opd_diag": diag,
                           **_totals([*experts, student]), "note": "student = base model; multi-teacher OPD"}}


def _mean_diag(rows: list[dict]) -> dict:
    keys = sorted({k for r in rows for k in r})
    return {k: sum(r[k] for r in rows if k in r) / max(1, sum(k in r for r in rows)) for k in keys}


def run_copd(ctx: Ctx, seed: int, ratio: float, mode: str = "mutual", name: str = "copd") -> dict[str, dict]:
    """mode: mutual (CoPD), oneway (only branch 0 distils), oneshot (all RL, then one OPD phase)."""
    s = ctx.spec
    sched = split_steps(s.budget.steps_per_cycle, ratio, s.budget.cycles)
    if mode == "oneshot":
        sched = [(sum(r for r, _ in sched), sum(o for _, o in sched))]
    branches = [ctx.branch(d) for d in s.domains]
    since: dict[str, int] = {}
    cycles = [cycle_record(ctx, branches, 0, seed, since)]
    for c, (n_rl, n_opd) in enumerate(sched, 1):
        for b in branches:
            do_rl(ctx, b, n_rl, seed)
        hub = MemoryHub({b.name: b.policy for b in branches}, s.rl.temperature)  # frozen at OPD start
        for i, b in enumerate(branches):
            if mode == "oneway" and i > 0:
                do_rl(ctx, b, n_opd, seed)  # never a student: spends its OPD slot on RL
            else:
                do_opd(ctx, b, [t.name for t in branches if t is not b], hub, n_opd, seed)
        cycles.append(cycle_record(ctx, branches, c, seed, since))
    br_eval = {b.name: ctx.evaluate(b.policy) for b in branches}
    return {name: {"eval": ctx.evaluate(merged_policy(ctx, branches)), "branches": br_eval, "cycles": cycles,
                   "schedule": sched, **_totals(branches)}}


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
        return run_copd(ctx, seed, s.budget.rl_to_opd)
    if method == "copd_oneway":
        return run_copd(ctx, seed, s.budget.rl_to_opd, "oneway", method)
    if method == "copd_oneshot":
        return run_copd(ctx, seed, s.budget.rl_to_opd, "oneshot", method)
    if method.startswith("copd@"):
        return run_copd(ctx, seed, float(method[5:]), "mutual", method)
    raise ValueError(f"unknown method {method!r}")


# ---------------------------------------------------------------------------
# Driver

_CTX: Ctx | None = None


def _worker_init(spec_json: str, storage: str, threads: int) -> None:
    global _CTX
    torch.set_num_threads(threads)
    _CTX = Ctx(CompareSpec.model_validate_json(spec_json), Path(storage))


def _worker_run(kind: str, args: tuple) -> tuple[str, tuple, dict, float]:
    t0 = time.perf_counter()
    if kind == "method":
        res = run_job(_CTX, *args)
    else:
        from experiments.compare.pilot import run_pilot_one

        res = run_pilot_one(_CTX, *args)
    return kind, args, res, time.perf_counter() - t0


def run_comparison(spec: CompareSpec, out: Path, jobs: int = 1, log=print, pilot: bool = True,
                   threads: int = 1) -> dict:
    """Run every (method, seed) job not already on disk, then aggregate and plot.

    `threads` is torch's intra-op threads per worker. Keep 1: the model is ~100k
    parameters and on a shared 2-core machine 2 threads made a GRPO step ~10× slower.
    """
    from experiments.compare.pilot import pilot_jobs
    from experiments.compare.report import write_report

    out = Path(out).resolve()
    (out / "runs").mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(spec.model_dump_json(by_alias=True, indent=2))
    storage = out / "storage"
    resolve_model_dir(spec.base_model, storage)  # build the builtin base once, before any worker
    t0 = time.monotonic()

    todo: list[tuple[str, tuple]] = []
    for m, seed in job_list(spec):
        if not (out / "runs" / m / f"seed-{seed}.json").exists():
            todo.append(("method", (m, seed)))
    if pilot and spec.pilot is not None:
        for args in pilot_jobs(spec.pilot):
            if not _pilot_path(out, *args).exists():
                todo.append(("pilot", args))
    log(f"compare: {len(todo)} jobs to run ({jobs} worker(s))")

    def save(kind: str, args: tuple, res: dict, secs: float) -> None:
        if kind == "method":
            for name, r in res.items():
                p = out / "runs" / name / f"seed-{args[1]}.json"
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_text(json.dumps({"method": name, "seed": args[1], "seconds": round(secs, 1), **r}))
        else:
            p = _pilot_path(out, *args)
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(json.dumps({**res, "seconds": round(secs, 1)}))
        log(f"  done {kind} {args} in {secs:.1f}s ({time.monotonic() - t0:.0f}s total)")

    spec_json = spec.model_dump_json()
    if jobs <= 1:
        _worker_init(spec_json, str(storage), threads)
        for kind, args in todo:
            save(*_worker_run(kind, args))
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                                 initargs=(spec_json, str(storage), threads)) as ex:
            futs = [ex.submit(_worker_run, kind, args) for kind, args in todo]
            for f in as_completed(futs):
                save(*f.result())
    wall = time.monotonic() - t0
    return write_report(spec, out, wall_seconds=wall)


def _pilot_path(out: Path, domain: str, seed: int) -> Path:
    return out / "runs" / "pilot" / f"{domain}-seed-{seed}.json"


def base_eval(spec: CompareSpec, out: Path) -> dict[str, float]:
    ctx = _CTX if _CTX is not None and _CTX.spec == spec else Ctx(spec, Path(out) / "storage")
    return ctx.base_eval


def main(spec_path: Path, output: Path, jobs: int = 1, pilot: bool = True) -> dict:
    """Entry point of `copd compare`: run, then print the table."""
    spec = load_compare_spec(spec_path)
    doc = run_comparison(spec, output, jobs=jobs, pilot=pilot)
    print((Path(output) / "comparison.md").read_text())
    return doc
