"""The pure cycle decision: table-driven, no I/O, no clock."""

from datetime import UTC, datetime, timedelta

import pytest
import yaml

from copd_core.cycle import (
    BranchReport,
    BranchStatus,
    DiagnoseReport,
    Event,
    MergeReport,
    Observed,
    Phase,
    RunBranchStage,
    RunDiagnose,
    RunMerge,
    RunStatus,
    Stage,
    StopWork,
    decide,
    fail_run,
    next_wakeup_s,
)
from copd_core.readiness import DirectionDiagnostic
from copd_core.spec import parse_manifest

T0 = datetime(2026, 1, 1, tzinfo=UTC)


class SpecBuilder:
    def __init__(self):
        self.doc = {
            "apiVersion": "copd.io/v1alpha1", "kind": "CoPDRun", "metadata": {"name": "t"},
            "spec": {"baseModel": {"uri": "builtin://tiny-qwen3"},
                     "branches": [{"name": "a", "dataset": {"builtin": "arith"}},
                                  {"name": "b", "dataset": {"builtin": "reverse"}}],
                     "schedule": {"cycles": 2, "rlStepsPerCycle": 3, "opdStepsPerCycle": 2},
                     "mergeReadiness": {"minCycles": 1, "minTopkOverlap": 0.9, "maxSymmetricKl": 0.5}},
        }

    def set(self, section, **kw):
        self.doc["spec"].setdefault(section, {}).update(kw)
        return self

    def suspend(self, v=True):
        self.doc["spec"]["suspend"] = v
        return self

    def obj(self):
        return parse_manifest(yaml.safe_load(yaml.safe_dump(self.doc))).spec


def done(cycle, stage, *names):
    return Observed(branches={n: BranchReport(cycle, stage, step=3, reward=0.5, done=True) for n in names})


def diag(cycle, overlap, kl=0.1):
    return Observed(diagnose=DiagnoseReport(cycle, (DirectionDiagnostic(cycle, "a", "b", overlap, kl),
                                                     DirectionDiagnostic(cycle, "b", "a", overlap, kl))))


def step(spec, status, observed=Observed(), minutes=1):
    return decide(spec, status, observed, T0 + timedelta(minutes=minutes), generation=3)


def work(actions):
    return [a for a in actions if not isinstance(a, Event)]


def test_pending_starts_cycle_one_rl_for_every_branch():
    s, acts = step(SpecBuilder().obj(), RunStatus())
    assert (s.phase, s.cycle, s.stage) == (Phase.RUNNING, 1, Stage.RL)
    assert work(acts) == [RunBranchStage("a", 1, Stage.RL), RunBranchStage("b", 1, Stage.RL)]
    assert s.start_time and s.observed_generation == 3
    assert {c.type: c.status for c in s.conditions} == {"Ready": "True", "Progressing": "True",
                                                        "MergeReady": "False"}


def test_barrier_waits_for_every_branch():
    spec = SpecBuilder().obj()
    s, _ = step(spec, RunStatus())
    s, acts = step(spec, s, done(1, Stage.RL, "a"))
    assert s.stage == Stage.RL and s.branches["a"].done and not s.branches["b"].done
    assert work(acts) == [RunBranchStage("b", 1, Stage.RL)]
    s, acts = step(spec, s, done(1, Stage.RL, "a", "b"))
    assert s.stage == Stage.OPD
    assert work(acts) == [RunBranchStage("a", 1, Stage.OPD), RunBranchStage("b", 1, Stage.OPD)]


def test_stale_report_is_ignored():
    spec = SpecBuilder().obj()
    s, _ = step(spec, RunStatus())
    s, _ = step(spec, s, done(1, Stage.RL, "a", "b"))
    s, acts = step(spec, s, done(1, Stage.RL, "a", "b"))  # RL reports while in OPD
    assert s.stage == Stage.OPD and not any(b.done for b in s.branches.values())


def test_decide_is_idempotent_without_new_observations():
    spec = SpecBuilder().obj()
    s, _ = step(spec, RunStatus())
    s2, acts = step(spec, s)
    s3, acts3 = step(spec, s2)
    assert s2 == s3 and work(acts) == work(acts3)
    assert not [a for a in acts3 if isinstance(a, Event)]


def _to_diagnose(spec, cycle=1, s=None):
    s = s or step(spec, RunStatus())[0]
    s, _ = step(spec, s, done(cycle, Stage.RL, "a", "b"))
    s, acts = step(spec, s, done(cycle, Stage.OPD, "a", "b"))
    assert s.stage == Stage.DIAGNOSE and work(acts) == [RunDiagnose(cycle)]
    return s


def test_aligned_branches_merge_early():
    spec = SpecBuilder().obj()
    s = _to_diagnose(spec)
    s, acts = step(spec, s, diag(1, 0.95))
    assert s.phase == Phase.MERGING and s.merge_ready and work(acts) == [RunMerge(ready=True)]
    assert s.min_topk_overlap == 0.95 and s.max_symmetric_kl == 0.1
    s, acts = step(spec, s, Observed(merge=MergeReport(done=True, path="/m")))
    assert s.phase == Phase.SUCCEEDED and s.merged_model == "/m" and s.completion_time
    assert {c.type: c.status for c in s.conditions}["Succeeded"] == "True"
    assert StopWork("Merged") in acts


def test_without_min_cycles_an_aligned_run_still_trains_every_cycle():
    """minCycles defaults to schedule.cycles: readiness at cycle 1 does not cut the schedule short."""
    b = SpecBuilder()
    del b.doc["spec"]["mergeReadiness"]["minCycles"]
    spec = b.obj()
    s = _to_diagnose(spec)
    s, acts = step(spec, s, diag(1, 0.99, kl=0.01))
    assert (s.phase, s.cycle, s.stage) == (Phase.RUNNING, 2, Stage.RL) and not s.merge_ready
    assert {c.type: c.reason for c in s.conditions}["MergeReady"] == "BeforeMinCycles"
    s = _to_diagnose(spec, 2, s)
    s, acts = step(spec, s, diag(2, 0.99, kl=0.01))
    assert s.phase == Phase.MERGING and s.merge_ready and work(acts) == [RunMerge(ready=True)]


def test_not_aligned_goes_to_next_cycle_then_merges_with_warning():
    spec = SpecBuilder().obj()
    s = _to_diagnose(spec)
    s, acts = step(spec, s, diag(1, 0.5))
    assert (s.phase, s.cycle, s.stage) == (Phase.RUNNING, 2, Stage.RL)
    s = _to_diagnose(spec, 2, s)
    s, acts = step(spec, s, diag(2, 0.5))
    assert s.phase == Phase.MERGING and not s.merge_ready
    assert work(acts) == [RunMerge(ready=False)]
    assert any(isinstance(a, Event) and a.type == "Warning" and a.reason == "MergingWithoutReadiness" for a in acts)


def test_not_aligned_fails_when_policy_says_so():
    spec = SpecBuilder().set("schedule", cycles=1).set("merge", whenNotReady="fail").obj()
    s = _to_diagnose(spec)
    s, acts = step(spec, s, diag(1, 0.5))
    assert s.phase == Phase.FAILED
    cond = {c.type: c for c in s.conditions}["Failed"]
    assert cond.status == "True" and cond.reason == "NotAligned" and "TopKOverlapLow" not in cond.message


@pytest.mark.parametrize("observed, reason", [
    (Observed(branches={"a": BranchReport(1, Stage.RL, failed=True, message="OOM")}), "BranchFailed"),
    (Observed(invalid_spec="dataset /x.jsonl not found"), "InvalidSpec"),
    (Observed(branches={"a": BranchReport(1, Stage.RL, failed=True, reason="InvalidInput",
                                          message="spec.branches[0].dataset.path: /x.jsonl: no such file")}),
     "InvalidInput"),
])
def test_failures_become_failed_condition(observed, reason):
    spec = SpecBuilder().set("failurePolicy", maxRestarts=0).obj()
    s, _ = step(spec, RunStatus())
    s, acts = step(spec, s, observed)
    assert s.phase == Phase.FAILED
    assert {c.type: c.reason for c in s.conditions}["Failed"] == reason
    s2, acts2 = step(spec, s, Observed())
    assert s2.phase == Phase.FAILED and acts2 == []  # terminal stays terminal


def test_zero_opd_steps_skips_the_stage():
    spec = SpecBuilder().set("schedule", opdStepsPerCycle=0).obj()
    s, _ = step(spec, RunStatus())
    s, acts = step(spec, s, done(1, Stage.RL, "a", "b"))
    assert s.stage == Stage.DIAGNOSE


def test_suspend_and_resume_keep_the_stage():
    b = SpecBuilder()
    spec = b.obj()
    s, _ = step(spec, RunStatus())
    s, _ = step(spec, s, done(1, Stage.RL, "a"))
    s, acts = step(b.suspend(True).obj(), s)
    assert s.phase == Phase.SUSPENDED and work(acts) == [StopWork("Suspended")]
    s, acts = step(b.suspend(False).obj(), s)
    assert (s.phase, s.stage) == (Phase.RUNNING, Stage.RL)
    assert s.branches["a"].done and work(acts) == [RunBranchStage("b", 1, Stage.RL)]


def test_transition_events_carry_durations():
    spec = SpecBuilder().obj()
    s, _ = step(spec, RunStatus(), minutes=0)
    s, acts = step(spec, s, done(1, Stage.RL, "a", "b"), minutes=5)
    ev = [a for a in acts if isinstance(a, Event)][0]
    assert (ev.ended, ev.started, ev.duration_s) == ("RL", "OPD", 300.0)


# -- fail_run: the failure decision for executors that cannot call decide (no parsable spec) ----------------

_RUNNING_RL = RunStatus(phase=Phase.RUNNING, cycle=1, stage=Stage.RL, stage_start_time="2025-12-31T23:58:00Z",
                        branches={"a": BranchStatus(cycle=1, stage="RL", step=2)})

FAIL_RUN_CASES = [
    # (what, status before, reason, expected event (ended, duration_s) or None when it stays as it is)
    ("pending", RunStatus(), "InvalidSpec", ("Pending", None)),
    ("running RL for 2 min", _RUNNING_RL, "InvalidSpec", ("RL", 120.0)),
    ("suspended", RunStatus(phase=Phase.SUSPENDED, cycle=1, stage=Stage.OPD), "InvalidSpec", ("Suspended", None)),
    ("merging", RunStatus(phase=Phase.MERGING, cycle=2), "InvalidSpec", ("Merging", None)),
    ("any reason", RunStatus(), "BranchFailed", ("Pending", None)),
    ("succeeded stays succeeded", RunStatus(phase=Phase.SUCCEEDED, cycle=2), "InvalidSpec", None),
    ("failed stays failed", RunStatus(phase=Phase.FAILED, cycle=1), "InvalidSpec", None),
]


@pytest.mark.parametrize("what,before,reason,event", FAIL_RUN_CASES, ids=[c[0] for c in FAIL_RUN_CASES])
def test_fail_run(what, before, reason, event):
    s, acts = fail_run(before, reason, "spec.branches: not a list", T0, 7)
    assert s.observed_generation == 7
    assert before.observed_generation == 0  # the input is not changed
    if event is None:
        assert acts == [] and s.model_dump(exclude={"observed_generation"}) == \
            before.model_dump(exclude={"observed_generation"})
        return
    assert (s.phase, s.stage, s.completion_time, s.cycle) == (Phase.FAILED, None, "2026-01-01T00:00:00Z", before.cycle)
    assert s.branches == before.branches
    conds = {c.type: (c.status, c.reason, c.message, c.observed_generation) for c in s.conditions}
    assert conds["Failed"] == ("True", reason, "spec.branches: not a list", 7)
    assert conds["Progressing"] == ("False", reason, "spec.branches: not a list", 7)
    assert acts == [Event("Warning", reason, "spec.branches: not a list", ended=event[0], duration_s=event[1],
                          started="Failed"), StopWork(reason)]


def test_fail_run_is_what_decide_does_for_an_invalid_spec():
    spec = SpecBuilder().obj()
    s, _ = step(spec, RunStatus())
    assert decide(spec, s, Observed(invalid_spec="no dataset"), T0, 3) == fail_run(s, "InvalidSpec", "no dataset", T0, 3)


@pytest.mark.parametrize("edit, during, then", [
    ({"opdStepsPerCycle": 0}, Stage.OPD, Stage.DIAGNOSE),   # the current stage vanished from the schedule
    ({"rlStepsPerCycle": 0}, Stage.RL, Stage.OPD),
    ({"rlStepsPerCycle": 0}, Stage.OPD, Stage.DIAGNOSE),   # an earlier stage vanished
    ({"opdStepsPerCycle": 0}, Stage.RL, Stage.DIAGNOSE),   # a later one vanished: skipped
])
def test_schedule_edited_mid_stage_moves_on(edit, during, then):
    spec = SpecBuilder().obj()
    s, _ = step(spec, RunStatus())
    while s.stage != during:
        s, _ = step(spec, s, done(s.cycle, s.stage, "a", "b"))
    edited = SpecBuilder().set("schedule", **edit).obj()
    s, acts = step(edited, s, done(s.cycle, during, "a", "b"))
    assert s.phase == Phase.RUNNING and s.stage == then, (s.phase, s.stage)


# ---------------------------------------------------------------------------
# failurePolicy: a run-level restart budget with exponential backoff


def failed(name, cycle=1, stage=Stage.RL, reason=None):
    return Observed(branches={name: BranchReport(cycle, stage, failed=True, message="OOM", reason=reason)})


def at(spec, status, observed=Observed(), seconds=0):
    return decide(spec, status, observed, T0 + timedelta(minutes=1, seconds=seconds), generation=3)


@pytest.mark.parametrize("max_restarts, failures, phase, restarts", [
    (3, 1, Phase.RUNNING, 1),
    (3, 3, Phase.RUNNING, 3),
    (3, 4, Phase.FAILED, 3),
    (0, 1, Phase.FAILED, 0),
])
def test_branch_failures_restart_within_the_budget(max_restarts, failures, phase, restarts):
    spec = SpecBuilder().set("failurePolicy", maxRestarts=max_restarts, backoffSeconds=10).obj()
    s, _ = step(spec, RunStatus())
    t = 0
    for _ in range(failures):
        s, acts = at(spec, s, failed("a"), seconds=t)
        t += 10_000  # past any backoff
    assert s.phase == phase and s.restarts == restarts
    if phase == Phase.FAILED:
        assert {c.type: c.reason for c in s.conditions}["Failed"] == "BranchFailed"
    else:
        assert s.branches["a"].attempt == restarts
        assert any(isinstance(a, Event) and a.reason == "BranchRestarted" for a in acts)


def test_restart_waits_for_exponential_backoff_then_asks_for_the_next_attempt():
    spec = SpecBuilder().set("failurePolicy", maxRestarts=5, backoffSeconds=10, maxBackoffSeconds=30).obj()
    s, _ = step(spec, RunStatus())
    s, acts = at(spec, s, failed("a"), seconds=0)
    assert s.branches["a"].retry_time == "2026-01-01T00:01:10Z"
    assert RunBranchStage("a", 1, Stage.RL, 1) not in acts and RunBranchStage("b", 1, Stage.RL, 0) in acts
    assert next_wakeup_s(s, T0 + timedelta(minutes=1)) == 10
    s, acts = at(spec, s, seconds=10)
    assert RunBranchStage("a", 1, Stage.RL, 1) in acts
    waits = []
    for i in range(1, 4):  # restarts 2..4: 20, 30 (capped), 30
        s, _ = at(spec, s, failed("a"), seconds=1000 * i)
        waits.append(next_wakeup_s(s, T0 + timedelta(minutes=1, seconds=1000 * i)))
    assert waits == [20, 30, 30]


def test_invalid_input_is_not_restarted():
    spec = SpecBuilder().set("failurePolicy", maxRestarts=3).obj()
    s, _ = step(spec, RunStatus())
    s, _ = at(spec, s, failed("a", reason="InvalidInput"))
    assert s.phase == Phase.FAILED and s.restarts == 0
    assert {c.type: c.reason for c in s.conditions}["Failed"] == "InvalidInput"


def test_a_restarted_branch_that_finishes_moves_the_stage_on():
    spec = SpecBuilder().obj()
    s, _ = step(spec, RunStatus())
    s, _ = at(spec, s, failed("a"))
    s, _ = at(spec, s, done(1, Stage.RL, "a", "b"), seconds=100)
    assert s.stage == Stage.OPD and s.branches["a"].attempt == 0 and s.branches["a"].retry_time is None


@pytest.mark.parametrize("observed, reason, reports", [
    (Observed(diagnose=DiagnoseReport(1, failed=True, reason="InvalidInput", message="x")), "InvalidInput", True),
    (Observed(diagnose=DiagnoseReport(1, failed=True, message="x")), "DiagnoseFailed", True),
])
def test_diagnose_failure_reason_passes_through(observed, reason, reports):
    spec = SpecBuilder().set("failurePolicy", maxRestarts=0).obj()
    s = _to_diagnose(spec)
    s, _ = step(spec, s, observed)
    assert s.phase == Phase.FAILED and {c.type: c.reason for c in s.conditions}["Failed"] == reason


def test_a_failed_diagnose_is_replaced_from_the_run_budget_then_fails():
    """Diagnose (and merge) Jobs share the run's restart budget with branch stages: a failure without a
    reason gets a new attempt (its own Job) while the budget lasts; with a reason it fails at once."""
    spec = SpecBuilder().set("failurePolicy", maxRestarts=2).obj()
    s = _to_diagnose(spec)
    boom = Observed(diagnose=DiagnoseReport(1, failed=True, message="OOMKilled"))
    s, acts = step(spec, s, boom)
    assert s.phase == Phase.RUNNING and s.stage == Stage.DIAGNOSE and s.restarts == 1 and s.diagnose_attempt == 1
    assert work(acts) == [RunDiagnose(1, attempt=1)]
    assert [a.reason for a in acts if isinstance(a, Event)] == ["DiagnoseRestarted"]
    s, acts = step(spec, s, Observed())  # the new attempt's Job has not reported yet
    assert work(acts) == [RunDiagnose(1, attempt=1)]
    s, _ = step(spec, s, boom)
    assert s.restarts == 2 and s.diagnose_attempt == 2
    s, _ = step(spec, s, boom)
    failed = {c.type: c for c in s.conditions}["Failed"]
    assert s.phase == Phase.FAILED and failed.reason == "DiagnoseFailed" and "restart budget 2 spent" in failed.message


def test_the_next_cycles_diagnose_starts_at_its_first_attempt():
    spec = SpecBuilder().set("failurePolicy", maxRestarts=3).obj()
    s = _to_diagnose(spec)
    s, _ = step(spec, s, Observed(diagnose=DiagnoseReport(1, failed=True, message="x")))
    s, _ = step(spec, s, diag(1, 0.5))  # attempt 1 reports: not aligned, next cycle
    assert (s.cycle, s.stage, s.diagnose_attempt) == (2, Stage.RL, None)
    s = _to_diagnose(spec, 2, s)  # asserts RunDiagnose(2) with attempt 0


def test_a_failed_merge_is_replaced_from_the_run_budget():
    spec = SpecBuilder().set("failurePolicy", maxRestarts=1).obj()
    s, _ = step(spec, _to_diagnose(spec), diag(1, 0.95))
    assert s.phase == Phase.MERGING
    s, acts = step(spec, s, Observed(merge=MergeReport(failed=True, message="killed")))
    assert s.phase == Phase.MERGING and s.merge_attempt == 1 and work(acts) == [RunMerge(ready=True, attempt=1)]
    assert [a.reason for a in acts if isinstance(a, Event)] == ["MergeRestarted"]
    s, _ = step(spec, s, Observed(merge=MergeReport(failed=True, reason="StorageFull", message="full")))
    assert s.phase == Phase.FAILED and {c.type: c.reason for c in s.conditions}["Failed"] == "StorageFull"
    assert s.restarts == 1


# ---------------------------------------------------------------------------
# transient: waiting on something outside the run; unknown fields


def test_blocked_run_waits_with_a_condition_then_continues():
    spec = SpecBuilder().obj()
    blocked = Observed(blocked=("ClaimNotFound", "storage.claimName: PersistentVolumeClaim 'x' not found"))
    s, acts = step(spec, RunStatus(), blocked)
    assert s.phase == Phase.PENDING and work(acts) == []
    assert [a.reason for a in acts if isinstance(a, Event)] == ["ClaimNotFound"]
    cond = {c.type: c for c in s.conditions}["Blocked"]
    assert cond.status == "True" and cond.reason == "ClaimNotFound"
    s, acts = step(spec, s, blocked, minutes=2)
    assert acts == []  # no repeated event
    s, acts = step(spec, s, Observed(), minutes=3)
    assert s.phase == Phase.RUNNING and {c.type: c.status for c in s.conditions}["Blocked"] == "False"
    assert any(isinstance(a, Event) and a.reason == "Unblocked" for a in acts)


def test_unknown_fields_are_reported_not_fatal():
    spec = SpecBuilder().obj()
    s, acts = step(spec, RunStatus(), Observed(unknown_fields=("spec.futureKnob",)))
    assert s.phase == Phase.RUNNING
    cond = {c.type: c for c in s.conditions}["SpecWarning"]
    assert cond.status == "True" and cond.reason == "UnknownFields" and "spec.futureKnob" in cond.message
    assert any(isinstance(a, Event) and a.reason == "UnknownFields" for a in acts)
    s, acts = step(spec, s, Observed(unknown_fields=("spec.futureKnob",)), minutes=2)
    assert not any(isinstance(a, Event) and a.reason == "UnknownFields" for a in acts)


def test_a_done_branch_keeps_its_persisted_report_when_the_stage_is_read_again():
    """A report is persisted into status in the reconcile that reads it; a later read of the same stage (the
    pod gone, an empty termination message: "done, nothing measured") must not overwrite it."""
    spec = SpecBuilder().obj()
    s, _ = step(spec, RunStatus())
    first = BranchReport(1, Stage.RL, step=3, reward=0.75, done=True, message="rl: 3 steps, reward 0.75")
    s, _ = step(spec, s, Observed(branches={"a": first}))
    assert s.branches["a"].message == "rl: 3 steps, reward 0.75"
    again = BranchReport(1, Stage.RL, step=3, done=True, message="no report (empty message)")
    s, acts = step(spec, s, Observed(branches={"a": again}), minutes=2)
    a = s.branches["a"]
    assert (a.done, a.step, a.reward, a.message) == (True, 3, 0.75, "rl: 3 steps, reward 0.75")
    assert s.stage == Stage.RL and work(acts) == [RunBranchStage("b", 1, Stage.RL)]
