"""Run one stage (RL or OPD) of one branch: the phase entry point both executors launch.

Resumes from the branch's newest complete checkpoint; checkpoints every
`every` steps and at the end of the stage; returns a report (what the cycle
decision needs: step, reward, done). Each step's seed is derived from
(run seed, branch, cycle, stage, step), so a resumed stage replays the same
samples it would have drawn.
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from copd_core.cycle import Stage, steps_of
from copd_core.seeding import step_seed
from copd_core.spec import CoPDRunSpec, RolloutEngine
from copd_runtime.checkpoint import (
    STAGE_ORDER,
    Counters,
    StorageAhead,
    fit_warning_for,
    latest_checkpoint,
    load_optimizer_and_rng,
    save_checkpoint,
)
from copd_runtime.data.datasets import load_dataset
from copd_runtime.data.examples import Dataset
from copd_runtime.model_uri import resolve_model_dir
from copd_runtime.models import distributed
from copd_runtime.models.compile import compile_blocks
from copd_runtime.models.device import Placement, placement
from copd_runtime.models.distributed import ZeroOptimizer
from copd_runtime.models.optim import make_optimizer
from copd_runtime.models.policy import load_policy
from copd_runtime.recipes.grpo import grpo_step
from copd_runtime.recipes.opd import opd_step

MetricSink = Callable[[dict], None]


def branch_datasets(spec: CoPDRunSpec, storage: Path) -> dict[str, Dataset]:
    return {
        b.name: load_dataset(b.name, b.dataset, b.reward, storage, spec.seed)
        for b in spec.branches
    }


def opd_peers(spec: CoPDRunSpec, student: str, datasets: dict[str, Dataset],
              teachers: Sequence[str] | None = None) -> dict[str, Dataset]:
    """Teacher name → the prompts `student` samples on for it (`CoPDRunSpec.opd_prompt_branches`):
    the teacher's own dataset, or for a hub-and-spoke spoke the union of every other branch's
    training prompts (drawn uniformly from the union), which the hub scores. `teachers`: only these
    (schedule.mode adaptive: the distilling directions); default every teacher of the topology."""
    out = {}
    for t in spec.teachers_of(student):
        if teachers is not None and t not in teachers:
            continue
        sources = [datasets[n] for n in spec.opd_prompt_branches(student, t)]
        out[t] = sources[0] if len(sources) == 1 else Dataset(
            domain=t, train=[ex for d in sources for ex in d.train], eval=[], reward=datasets[t].reward)
    return out


def stage_start_model(spec: CoPDRunSpec, storage: Path, branch: str, cycle: int, stage: str,
                      skipped: list[str] | None = None) -> Path:
    """The weights a branch had when (cycle, stage) began: its frozen teacher snapshot (the newest
    intact checkpoint before it; damaged ones are skipped and named in `skipped`)."""
    ck = latest_checkpoint(storage, branch, before=(cycle, stage), skipped=skipped)
    return ck[1] if ck else resolve_model_dir(spec.base_model.uri, storage)


def run_branch_stage(
    spec: CoPDRunSpec,
    storage: Path,
    branch: str,
    cycle: int,
    stage: Stage,
    hub=None,
    sink: MetricSink | None = None,
    run_name: str = "run",
    checkpoint_every: int = 0,
    datasets: dict[str, Dataset] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    place: Placement | None = None,
    steps: int | None = None,
    teachers: Sequence[str] | None = None,
) -> dict:
    """`steps`, `teachers`: this branch's work in the stage as the cycle decision planned it
    (`copd_core.consolidation.stage_work`; schedule.mode adaptive); default the schedule's steps and
    every teacher of the topology."""
    total = steps_of(spec, stage) if steps is None else steps
    if stage == Stage.OPD and teachers is not None and total > 0 and not teachers:
        raise ValueError(f"branch {branch}: an OPD stage of {total} steps with no teacher")
    datasets = datasets or branch_datasets(spec, storage)
    base = resolve_model_dir(spec.base_model.uri, storage)

    skipped: list[str] = []  # damaged checkpoints moved aside (checkpoint.latest_checkpoint)
    latest = latest_checkpoint(storage, branch, skipped=skipped)
    here = (cycle, stage.value)
    if latest and latest[0].key()[:2] > (cycle, STAGE_ORDER[stage.value]):
        raise StorageAhead(f"branch {branch}: its storage {latest[1].parent} holds checkpoint {latest[1].name}, "
                           f"from after the stage this run is at (cycle {cycle} {stage.value}): the storage went "
                           "further than the run (another run's storage, or another process writing to it); "
                           "give the run its own storage, or remove that branch's checkpoints")
    if latest and (latest[0].cycle, latest[0].stage) == here:
        start_dir, start_step = latest[1], latest[0].step
    else:
        start_dir, start_step = stage_start_model(spec, storage, branch, cycle, stage.value, skipped), 0
    resumed = {"resumed_from": start_dir.name if start_dir != base else "base model", "resumed_step": start_step}
    if skipped:
        resumed["skipped_checkpoints"] = skipped
    note = (f"skipped damaged checkpoint(s) {'; '.join(skipped)}; resumed from {resumed['resumed_from']} "
            f"(step {start_step})" if skipped else "")
    if start_step >= total:
        return {"cycle": cycle, "stage": stage.value, "step": total, "done": True, "reward": None,
                "message": note or "already complete", **resumed}

    place = place or placement(spec.trainer.precision)
    distributed.init(place)  # under torchrun: join the other ranks (a no-op in one process)
    policy = load_policy(start_dir, spec.base_model.kind, place)
    if spec.trainer.compile:
        compile_blocks(policy.model)
    if spec.rollout.engine == RolloutEngine.VLLM:  # sampling through a vLLM engine on this process's GPU
        from copd_runtime.vllm_engine import MAX_LOGPROBS, ColocatedEngine

        policy.generator = ColocatedEngine(start_dir, place, spec.rollout.gpu_memory_utilization,
                                           seed=spec.seed + place.rank,
                                           max_logprobs=max(MAX_LOGPROBS, spec.diagnostics.top_k))
    if distributed.world_size() > 1:
        optimizer = ZeroOptimizer(policy.model, spec.rl.learning_rate, spec.trainer.zero_stage,
                                  bf16=place.dtype == torch.bfloat16)
    else:
        optimizer = make_optimizer(policy.model, spec.rl.learning_rate)
    if start_dir != base and (start_dir / "state.json").exists():
        load_optimizer_and_rng(start_dir, optimizer)
        for g in optimizer.param_groups:
            g["lr"] = spec.rl.learning_rate

    # GRPO's reference policy for `rl.klCoef` > 0: the run's base model, frozen.
    reference = load_policy(base, spec.base_model.kind, place) if stage == Stage.RL and spec.rl.kl_coef > 0 else None

    rewards: list[float] = []
    warned: dict = {}  # "storage_warning": the planned checkpoints will not fit the volume (first checkpoint)

    def checkpoint(counters: Counters) -> None:
        path = save_checkpoint(storage, branch, policy, optimizer, counters)
        if not warned and distributed.rank() == 0:
            msg = fit_warning_for(path, len(spec.branches))
            warned["storage_warning"] = msg
            if msg:
                print(f"warning: {msg}", file=sys.stderr, flush=True)

    def extra() -> dict:
        return {k: v for k, v in warned.items() if v}

    step = start_step
    for step in range(start_step, total):
        if should_stop():
            checkpoint(Counters(cycle, stage.value, step, total))
            return {"cycle": cycle, "stage": stage.value, "step": step, "done": False,
                    "reward": _mean(rewards), "message": "stopped after a checkpoint", **resumed, **extra()}
        seed = step_seed(spec.seed, branch, cycle, stage.value, step)
        torch.manual_seed(seed)
        rng = random.Random(seed)
        t0 = time.perf_counter()
        if stage == Stage.RL:
            m = grpo_step(policy, optimizer, datasets[branch], spec.rl, rng, reference=reference)
        else:
            m = opd_step(policy, optimizer, opd_peers(spec, branch, datasets, teachers), hub, spec.beta_for(branch),
                         spec.rl, spec.opd, spec.diagnostics, rng,
                         verifiers={d.domain: d.reward for d in datasets.values()})
        rewards.append(m["reward_mean"])
        if sink:
            sink({"run": run_name, "branch": branch, "phase": stage.value, "cycle": cycle, "step": step + 1,
                  "steps": total, "seconds": round(time.perf_counter() - t0, 4), **m})
        done = step + 1 == total
        if done or (checkpoint_every and (step + 1) % checkpoint_every == 0):
            checkpoint(Counters(cycle, stage.value, step + 1, total))
    return {"cycle": cycle, "stage": stage.value, "step": total, "done": True, "reward": _mean(rewards),
            "message": note, **resumed, **extra()}


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None
