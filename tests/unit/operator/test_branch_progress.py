"""A trainer's live status.progress: the operator keeps it, folds it into step/reward, ignores other stages'."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from copd_operator import reconcile as rec
from copd_operator.crd import branch_crd
from copd_operator.logic import observe as ob
from copd_operator.logic.naming import branch_cr_name, stage_job_name
from copd_operator.logic.plan import Patch, branch_statuses, plan, replacing

from copd_core.cycle import BranchStatus, Observed, Phase, RunStatus, Stage, decide
from copd_core.metrics import CoPDMetrics
from tests.unit.operator.builders_test_helpers import CFG, DEMO, JobB, SnapB, example_doc, run_ref

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def progress(cycle=1, stage="RL", step=4, steps=6, reward=0.5, overlap=None) -> dict:
    return {"cycle": cycle, "stage": stage, "step": step, "steps": steps, "reward": reward,
            "topkOverlap": overlap, "updateTime": "2026-01-01T00:00:04Z"}


def running(stage=Stage.RL, cycle=1, done=()):
    run = run_ref()
    st = RunStatus(phase=Phase.RUNNING, cycle=cycle, stage=stage,
                   branches={b.name: BranchStatus(cycle=cycle, stage=stage.value, done=b.name in done,
                                                  step=run.spec.schedule.rl_steps_per_cycle if b.name in done else 0,
                                                  reward=0.25 if b.name in done else None)
                             for b in run.spec.branches})
    return run, st


def snap_with(run, statuses: dict[str, dict], jobs=()):
    sb = SnapB(run)
    for j in jobs:
        sb.job(j)
    snap = sb.obj()
    for name, status in statuses.items():
        snap.branches[name]["status"] = status
    return snap


def branch_patches(ops) -> dict[str, dict]:
    return {o.name: o.body["status"] for o in ops if isinstance(o, Patch) and o.kind == "Branch" and o.status}


def test_progress_of_the_current_stage_moves_step_and_reward_and_is_kept():
    run, st = running()
    old = {"phase": "Running", "cycle": 1, "stage": "RL", "step": 0, "steps": 6, "job": stage_job_name(DEMO, "arith", 1, "RL"),
           "observedGeneration": 1, "progress": progress(step=4, reward=0.5)}
    snap = snap_with(run, {"arith": old}, jobs=[JobB(stage_job_name(DEMO, "arith", 1, "RL")).active()])
    ops = plan(run, CFG, st, [], snap, NOW, 1)
    body = branch_patches(ops)[branch_cr_name(DEMO, "arith")]
    assert body["step"] == 4 and body["reward"] == 0.5 and body["phase"] == "Running"
    assert "progress" not in body  # a merge patch that neither rewrites nor nulls the trainer's key
    # once the operator's part is as wanted, nothing is written: the trainer's progress alone is no diff
    snap.branches["arith"]["status"] = {**body, "progress": progress(step=4, reward=0.5)}
    assert branch_cr_name(DEMO, "arith") not in branch_patches(plan(run, CFG, st, [], snap, NOW, 1))


def test_step_is_the_larger_of_progress_and_stage_report_and_the_report_reward_wins():
    run, st = running(done=("arith",))  # the stage reported all its steps, reward 0.25
    n = run.spec.schedule.rl_steps_per_cycle
    s = ob.branch_cr_status(st, "arith", n, ob.JobOutcome("Succeeded"), "j", 1,
                            progress=progress(step=n - 1, steps=n, reward=0.9))
    assert (s["step"], s["reward"], s["phase"]) == (n, 0.25, "Waiting")
    run, st = running()
    st.branches["arith"] = BranchStatus(cycle=1, stage="RL", step=3)  # e.g. a checkpointed, resumed stage
    assert ob.branch_cr_status(st, "arith", 6, None, None, 1, progress=progress(step=2))["step"] == 3
    assert ob.branch_cr_status(st, "arith", 6, None, None, 1, progress=progress(step=5))["step"] == 5
    assert ob.branch_cr_status(st, "arith", 6, None, None, 1, progress=progress(step=60))["step"] == 6  # capped
    no_reward = ob.branch_cr_status(st, "arith", 6, None, None, 1, progress=progress(step=5, reward=None))
    assert no_reward["step"] == 5 and "reward" not in no_reward  # absent, not made up


@pytest.mark.parametrize("stale", [
    progress(cycle=1, stage="RL", step=5),   # the previous stage of this cycle
    progress(cycle=0, stage="OPD", step=5),  # another cycle
    {"cycle": 1, "stage": "OPD", "step": "many"},  # malformed
    {"stage": "OPD"},                        # no cycle
])
def test_progress_of_another_stage_or_malformed_is_ignored_and_still_kept(stale):
    run, st = running(Stage.OPD)
    old = {"phase": "Pending", "cycle": 1, "stage": "OPD", "step": 0, "steps": 4, "observedGeneration": 1,
           "progress": stale}
    snap = snap_with(run, {"arith": old})
    body = branch_patches(plan(run, CFG, st, [], snap, NOW, 1)).get(branch_cr_name(DEMO, "arith"), {})
    assert body.get("step", 0) == 0 and "progress" not in body


def test_an_opd_progress_reports_reward_and_overlap_without_touching_the_decision():
    run, st = running(Stage.OPD)
    snap = snap_with(run, {"arith": {"progress": progress(stage="OPD", step=3, steps=4, reward=0.7,
                                                                  overlap={"reverse": 0.93})}})
    sts = branch_statuses(run, st, snap, 1)
    assert sts["arith"]["step"] == 3 and sts["arith"]["reward"] == 0.7 and sts["reverse"]["step"] == 0
    # the cycle decision reads only stage reports (termination messages): the run status is unchanged
    new, _ = decide(run.spec, st.model_copy(deep=True), ob.observe(run.spec, st, snap), NOW, 1)
    assert all(b.step == 0 and not b.done for b in new.branches.values())
    assert ob.observe(run.spec, st, snap) == Observed(branches={}, diagnose=None, merge=None, invalid_spec=None)


def test_replacing_keeps_what_it_is_told_to():
    assert replacing({"a": 1, "progress": {"step": 2}}, {"b": 1}) == {"b": 1, "a": None, "progress": None}
    assert replacing({"a": 1, "progress": {"step": 2}}, {"b": 1}, keep=frozenset({"progress"})) == \
        {"b": 1, "a": None}


def test_crd_status_schema_has_progress_and_the_step_column():
    version = branch_crd()["spec"]["versions"][0]
    props = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]["progress"]["properties"]
    assert {"cycle", "stage", "step", "steps", "reward", "topkOverlap", "updateTime"} <= set(props)
    assert props["topkOverlap"]["additionalProperties"] == {"type": "number"}
    assert {"name": "Step", "type": "integer", "jsonPath": ".status.step"} in version["additionalPrinterColumns"]
    assert version["subresources"] == {"status": {}}  # the trainer patches only the status subresource


def test_reconcile_writes_the_live_step_and_the_metrics_follow(monkeypatch):
    run = run_ref()
    doc = example_doc()
    run_status = RunStatus(phase=Phase.RUNNING, cycle=1, stage=Stage.RL, stage_start_time="2026-01-01T00:00:00Z",
                           branches={b.name: BranchStatus(cycle=1, stage="RL") for b in run.spec.branches})
    snap = snap_with(run, {"arith": {"phase": "Running", "progress": progress(step=4, reward=0.5)}},
                     jobs=[JobB(stage_job_name(DEMO, b.name, 1, "RL")).active() for b in run.spec.branches])
    snap.run = {"apiVersion": doc["apiVersion"], "kind": doc["kind"],
                "metadata": {"name": "demo", "namespace": "ns", "uid": "uid-run", "generation": 1},
                "spec": doc["spec"], "status": run_status.to_k8s()}
    applied = []
    monkeypatch.setattr(rec, "gather", lambda apis, ns, name, sa, **kw: snap)
    monkeypatch.setattr(rec, "write_run_status", lambda apis, r, body: None)
    monkeypatch.setattr(rec, "apply_ops", lambda apis, ns, ops: applied.extend(ops) or [])
    monkeypatch.setattr(rec, "create", lambda apis, ns, obj: None)
    metrics = CoPDMetrics()
    rec.Reconciler(None, CFG, metrics, clock=lambda: NOW).reconcile("ns", "demo")  # type: ignore[arg-type]
    body = branch_patches(applied)[branch_cr_name(DEMO, "arith")]
    assert body["step"] == 4 and "progress" not in body
    sample = lambda name, b: metrics.registry.get_sample_value(name, {"namespace": "ns", "run": "demo",  # noqa: E731
                                                                       "branch": b})
    assert sample("copd_branch_step", "arith") == 4.0 and sample("copd_branch_reward", "arith") == 0.5
    assert sample("copd_branch_step", "reverse") == 0.0 and sample("copd_branch_reward", "reverse") is None
    metrics.forget_run("ns", "demo")
    assert sample("copd_branch_step", "arith") is None
