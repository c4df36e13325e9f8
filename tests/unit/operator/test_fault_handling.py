"""Faults, operator side: the Job failure policy and deadlines, replacement attempts, a replaced hub,
InvalidInput reports, unknown spec fields, reconcile errors as conditions/events, per-key backoff."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

import pytest
from copd_operator import reconcile as rec
from copd_operator.control.workqueue import WorkQueue
from copd_operator.logic import observe as ob
from copd_operator.logic.builders import build_diagnose_job, build_stage_job
from copd_operator.logic.lenient import parse_lenient
from copd_operator.logic.naming import hub_name, stage_job_name
from copd_operator.logic.plan import Create, plan
from kubernetes.client.rest import ApiException

from copd_core.cycle import BranchStatus, Phase, RunBranchStage, RunStatus, Stage
from copd_core.metrics import CoPDMetrics
from copd_core.spec import SpecError
from tests.unit.operator.builders_test_helpers import CFG, DEMO, JobB, SnapB, example_doc, run_ref

NOW = datetime(2026, 1, 1, tzinfo=UTC)
INVALID = json.dumps({"failed": True, "reason": "InvalidInput", "field": "spec.branches[0].dataset.path",
                      "message": "spec.branches[0].dataset.path: /copd/x.jsonl: no such file"})


def _kinds(ops):
    return [(type(op).__name__, (op.obj["kind"] if isinstance(op, Create) else op.kind),
             (op.obj["metadata"]["name"] if isinstance(op, Create) else op.name)) for op in ops]


# -- builders ---------------------------------------------------------------------------


def test_jobs_fail_at_once_on_bad_input_and_ignore_disruptions():
    job = build_stage_job(run_ref(), CFG, "arith", "uid-b", 1, "RL")
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert {"action": "FailJob", "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [2, 3]}} \
        in rules
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]} in rules
    assert "activeDeadlineSeconds" not in job["spec"]


@pytest.mark.parametrize("deadlines, stage, want", [
    ({"rl": 3600}, "RL", 3600),
    ({"rl": 3600}, "OPD", None),
    ({"opd": 900}, "OPD", 900),
])
def test_stage_deadline_comes_from_the_spec(deadlines, stage, want):
    run = run_ref(failurePolicy={"stageDeadlineSeconds": deadlines})
    assert build_stage_job(run, CFG, "arith", "uid-b", 1, stage)["spec"].get("activeDeadlineSeconds") == want


def test_diagnose_deadline_comes_from_the_spec():
    run = run_ref(failurePolicy={"stageDeadlineSeconds": {"diagnose": 600}})
    assert build_diagnose_job(run, CFG, 1)["spec"]["activeDeadlineSeconds"] == 600


def test_a_replacement_attempt_has_its_own_job_name():
    run = run_ref()
    names = {build_stage_job(run, CFG, "arith", "uid-b", 1, "RL", attempt=a)["metadata"]["name"] for a in (0, 1, 2)}
    assert len(names) == 3 and stage_job_name(DEMO, "arith", 1, "RL", 0) in names
    assert all(len(n) <= 57 for n in names)


# -- observe ----------------------------------------------------------------------------


@pytest.mark.parametrize("job, reason", [
    (JobB("j").failed(INVALID, exit_code=2), "InvalidInput"),
    (JobB("j").failed("Traceback ... CUDA out of memory"), None),
])
def test_a_failed_stage_carries_the_trainers_reason(job, reason):
    rep = ob.branch_report(run_ref().spec, 1, Stage.RL, ob.job_outcome(job.job, job.pods))
    assert rep.failed and rep.reason == reason


def test_diagnose_and_merge_failures_carry_the_reason():
    j = JobB("d").failed(INVALID, exit_code=2)
    assert ob.diagnose_report(1, ob.job_outcome(j.job, j.pods)).reason == "InvalidInput"
    assert ob.merge_report(ob.job_outcome(j.job, j.pods), "/copd/merged").reason == "InvalidInput"


def _rl(attempt=0, retry_time=None):
    run = run_ref()
    st = RunStatus(phase=Phase.RUNNING, cycle=1, stage=Stage.RL,
                   branches={b.name: BranchStatus(cycle=1, stage="RL") for b in run.spec.branches})
    st.branches["arith"] = BranchStatus(cycle=1, stage="RL", attempt=attempt, retry_time=retry_time)
    return run, st


def test_observe_reads_the_job_of_the_current_attempt():
    run, st = _rl(attempt=1)
    first = JobB(stage_job_name(DEMO, "arith", 1, "RL")).failed("boom")
    second = JobB(stage_job_name(DEMO, "arith", 1, "RL", 1)).succeeded(json.dumps({"step": 9, "done": True}))
    got = ob.observe(run.spec, st, SnapB(run).job(first).job(second).obj())
    assert got.branches["arith"].done and not got.branches["arith"].failed


# -- plan -------------------------------------------------------------------------------


def test_plan_creates_the_replacement_attempt_job():
    run, st = _rl(attempt=1)
    ops = plan(run, CFG, st, [RunBranchStage("arith", 1, Stage.RL, 1)], SnapB(run).obj(), NOW, 1)
    assert ("Create", "Job", stage_job_name(DEMO, "arith", 1, "RL", 1)) in _kinds(ops)


def _opd():
    run = run_ref()
    st = RunStatus(phase=Phase.RUNNING, cycle=1, stage=Stage.OPD,
                   branches={b.name: BranchStatus(cycle=1, stage="OPD") for b in run.spec.branches})
    return run, st


def _hub(phase="Running", deleting=False):
    md = {"name": hub_name(DEMO, 1), "labels": {"copd.io/component": "hub"}}
    if deleting:
        md["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {"metadata": md, "status": {"phase": phase, "podIP": "127.0.0.1"}}


@pytest.mark.parametrize("pod, deleted, created, url_known", [
    (None, False, True, False),
    (_hub(), False, False, True),
    (_hub("Failed"), True, False, False),  # evicted: delete it; created again once gone
    (_hub("Succeeded"), True, False, False),
    (_hub(deleting=True), False, False, False),  # already going: wait for it
])
def test_a_dead_hub_is_replaced(pod, deleted, created, url_known):
    run, st = _opd()
    snap = SnapB(run)
    if pod:
        snap.pod(pod)
    acts = [RunBranchStage(b.name, 1, Stage.OPD) for b in run.spec.branches]
    kinds = _kinds(plan(run, CFG, st, acts, snap.obj(), NOW, 1))
    hub = hub_name(DEMO, 1)
    assert (("Delete", "Pod", hub) in kinds) is deleted
    assert (("Create", "Pod", hub) in kinds) is created
    assert any(k[:2] == ("Create", "Job") for k in kinds) is url_known  # pod-ip mode: jobs need an address


def test_hub_pod_gets_its_own_ip_to_publish():
    from copd_operator.logic.builders import build_hub_pod

    env = build_hub_pod(run_ref(), CFG, 1)["spec"]["containers"][0]["env"]
    assert {"name": "COPD_POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}} in env


# -- unknown fields ---------------------------------------------------------------------


def _doc(**extra):
    d = example_doc()
    for path, v in extra.items():
        node = d["spec"]
        *head, last = path.split("__")
        for k in head:
            node = node[int(k)] if k.isdigit() else node[k]
        node[last] = v
    return d


@pytest.mark.parametrize("doc, dropped", [
    (_doc(), ()),
    (_doc(futureKnob=3), ("spec.futureKnob",)),
    (_doc(rl__newThing={"a": 1}, branches__1__dataset__shards=2),
     ("spec.branches[1].dataset.shards", "spec.rl.newThing")),
])
def test_unknown_fields_are_dropped_and_named(doc, dropped):
    m, got = parse_lenient(doc)
    assert sorted(got) == sorted(dropped) and m.spec.branches[0].name == "arith"


def test_other_problems_still_fail_alongside_unknown_fields():
    with pytest.raises(SpecError, match="groupSize"):
        parse_lenient(_doc(futureKnob=1, rl__groupSize=1))


# -- reconcile: events after the status write; errors as a condition + event --------------


class FakeCluster:
    def __init__(self, monkeypatch, snap, apply_error=None):
        self.snap, self.writes, self.events, self.cond_patches = snap, [], [], []
        self.apply_error = apply_error
        monkeypatch.setattr(rec, "gather", lambda *a, **kw: self.snap)
        monkeypatch.setattr(rec, "write_run_status", lambda apis, run, body: self.writes.append(body))
        monkeypatch.setattr(rec, "apply_ops", self._apply)
        monkeypatch.setattr(rec, "create", lambda apis, ns, obj: self.events.append(obj))
        monkeypatch.setattr(rec, "patch_run_conditions", lambda apis, ns, name, c: self.cond_patches.append(c))

    def _apply(self, apis, ns, ops):
        if self.apply_error is not None:
            raise self.apply_error
        return []

    def reconciler(self):
        return rec.Reconciler(None, CFG, CoPDMetrics(), clock=lambda: NOW)  # type: ignore[arg-type]

    def reasons(self):
        return [e["reason"] for e in self.events]


def _snap(spec=None, status=None):
    run = run_ref()
    snap = SnapB(run).obj()
    doc = example_doc()
    snap.run = {"apiVersion": doc["apiVersion"], "kind": doc["kind"],
                "metadata": {"name": DEMO.name, "namespace": "ns", "uid": DEMO.uid, "generation": 1},
                "spec": spec or doc["spec"], "status": status or {}}
    return snap


def _quota():
    e = ApiException(status=403, reason="Forbidden")
    e.body = json.dumps({"message": 'jobs "x" is forbidden: exceeded quota: q, requested: count/jobs.batch=1'})
    return e


@pytest.mark.parametrize("err, reason", [
    (_quota(), "QuotaExceeded"),
    (ApiException(status=422, reason="Unprocessable Entity"), "CreateRejected"),
    (ApiException(status=500, reason="Internal"), "ApiError"),
    (KeyError("x"), "InternalError"),
])
def test_an_error_while_acting_becomes_a_condition_and_an_event_and_transition_events_are_kept(
        monkeypatch, err, reason):
    c = FakeCluster(monkeypatch, _snap(), apply_error=err)
    with pytest.raises(type(err)):
        c.reconciler().reconcile("ns", "demo")
    assert c.writes and c.writes[0]["phase"] == "Running"
    assert "StageStarted" in c.reasons() and c.reasons()[-1] == reason  # the transition's event was not lost
    cond = {x["type"]: x for x in c.cond_patches[-1]}["ReconcileError"]
    assert cond["status"] == "True" and cond["reason"] == reason


def test_the_same_error_again_writes_nothing_and_success_clears_it(monkeypatch):
    status = {"phase": "Running", "cycle": 1, "stage": "RL", "stageStartTime": "2026-01-01T00:00:00Z",
              "conditions": [{"type": "ReconcileError", "status": "True", "reason": "QuotaExceeded",
                              "message": rec.error_condition(_quota())[1], "lastTransitionTime": "2026-01-01T00:00:00Z"}]}
    c = FakeCluster(monkeypatch, _snap(status=status), apply_error=_quota())
    with pytest.raises(ApiException):
        c.reconciler().reconcile("ns", "demo")
    assert c.cond_patches == [] and "QuotaExceeded" not in c.reasons()
    c.apply_error = None
    c.reconciler().reconcile("ns", "demo")
    cond = {x["type"]: x for x in c.cond_patches[-1]}["ReconcileError"]
    assert cond["status"] == "False" and cond["reason"] == "Reconciled" and c.reasons()[-1] == "Reconciled"


def test_unknown_fields_reach_the_status_as_a_warning(monkeypatch):
    spec = dict(example_doc()["spec"], futureKnob=True)
    c = FakeCluster(monkeypatch, _snap(spec=spec))
    c.reconciler().reconcile("ns", "demo")
    w = c.writes[-1]
    assert w["phase"] == "Running"
    cond = {x["type"]: x for x in w["conditions"]}["SpecWarning"]
    assert cond["reason"] == "UnknownFields" and "spec.futureKnob" in cond["message"]
    assert "UnknownFields" in c.reasons()


def test_a_branch_in_backoff_brings_the_run_back_when_it_may_start(monkeypatch):
    status = {"phase": "Running", "cycle": 1, "stage": "RL", "stageStartTime": "2026-01-01T00:00:00Z",
              "branches": {"arith": {"cycle": 1, "stage": "RL", "attempt": 1, "retryTime": "2026-01-01T00:00:20Z"}}}
    c = FakeCluster(monkeypatch, _snap(status=status))
    out = c.reconciler().reconcile("ns", "demo")
    assert out.requeue_after_s == pytest.approx(20.5)


# -- the work queue: per-key exponential backoff -----------------------------------------


def test_per_key_backoff_doubles_caps_and_resets():
    q = WorkQueue()
    k = ("ns", "r")
    assert [q.retry_after(k, 1.0, 5.0) for _ in range(5)] == [1, 2, 4, 5, 5]
    q.add(k)  # a resync while backing off: waits for the backoff
    assert q.get(timeout=0.05) is None
    q.succeeded(k)
    q.add(k)
    assert q.get(timeout=0.05) == k


def test_a_key_comes_back_after_its_backoff():
    q = WorkQueue()
    k = ("ns", "r")
    q.retry_after(k, 0.1, 1.0)
    t = time.monotonic()
    q.add(k)
    assert q.get(timeout=2) == k and time.monotonic() - t >= 0.09


# -- events that cannot be posted now are posted later; status writes outlast metadata-only 409s ----------


def test_events_that_fail_every_try_are_sent_at_the_next_reconcile(monkeypatch):
    c = FakeCluster(monkeypatch, _snap())
    monkeypatch.setattr(rec, "EVENT_RETRY_S", 0.0)
    down = {"on": True}

    def create(apis, ns, obj):
        if down["on"]:
            raise ApiException(status=503, reason="Service Unavailable")
        c.events.append(obj)
    monkeypatch.setattr(rec, "create", create)
    r = c.reconciler()
    r.reconcile("ns", "demo")  # Pending -> Running: the status is written, its events cannot be posted
    assert c.writes and c.events == [] and [e["reason"] for e in r.unsent[("ns", "demo")]] == ["StageStarted"]
    c.snap.run["status"] = c.writes[-1]
    r.reconcile("ns", "demo")  # still down: kept, not duplicated
    assert len(r.unsent[("ns", "demo")]) == 1
    down["on"] = False
    r.reconcile("ns", "demo")
    assert "StageStarted" in c.reasons() and ("ns", "demo") not in r.unsent
    names = [e["metadata"]["name"] for e in c.events if e["reason"] == "StageStarted"]
    assert len(names) == 1  # the same Event, under its first name


def _conflict():
    return ApiException(status=409, reason="Conflict")


@pytest.mark.parametrize("other_writer_changed, writes, conflict", [
    ({"metadata": {"annotations": {"x": "1"}, "resourceVersion": "9"}}, 2, False),  # labels/annotations only
    ({"status": {"phase": "Running", "foreign": 1}}, 1, True),  # the status we decided from is gone
    ({"metadata": {"generation": 2}}, 1, True),  # the spec changed
])
def test_a_status_write_retries_a_409_only_when_spec_and_status_are_as_read(monkeypatch, other_writer_changed,
                                                                            writes, conflict):
    c = FakeCluster(monkeypatch, _snap())
    tries = []

    def write(apis, run, body):
        tries.append(run["metadata"].get("resourceVersion"))
        if len(tries) == 1:
            raise _conflict()
        c.writes.append(body)
    monkeypatch.setattr(rec, "write_run_status", write)
    fresh = json.loads(json.dumps(c.snap.run))
    for k, v in other_writer_changed.items():
        fresh[k] = {**(fresh.get(k) or {}), **v}
    monkeypatch.setattr(rec, "read_run", lambda apis, ns, name: fresh)
    if conflict:
        with pytest.raises(rec.Conflict):
            c.reconciler().reconcile("ns", "demo")
        assert len(tries) == writes and not c.writes and c.events == []  # nothing acted on a stale decision
    else:
        c.reconciler().reconcile("ns", "demo")
        assert len(tries) == writes and tries[-1] == "9" and c.writes[-1]["phase"] == "Running"
        assert "StageStarted" in c.reasons()


# -- a hub that refuses its input fails the run (no crash loop) -----------------------------------


@pytest.mark.parametrize("where, exit_code, fails", [
    ("lastState", 2, True),  # restarted after refusing: the first refusal is enough
    ("state", 2, True),
    ("lastState", 1, False),  # a crash: the pod restarts / is replaced, the run goes on
])
def test_a_hub_refusing_its_input_fails_the_run_with_invalid_input(where, exit_code, fails):
    from copd_operator.logic.builders import build_hub_pod

    from copd_core.cycle import decide

    assert "--report-file" in build_hub_pod(run_ref(), CFG, 1)["spec"]["containers"][0]["args"]
    run, st = _opd()
    pod = _hub()
    pod["status"]["containerStatuses"] = [{"name": "trainer", where: {"terminated": {
        "exitCode": exit_code, "message": INVALID if exit_code == 2 else "Traceback ..."}}}]
    snap = SnapB(run)
    snap.pod(pod)
    obs = ob.observe(run.spec, st, snap.obj())
    new, _ = decide(run.spec, st, obs, NOW, 1)
    assert (new.phase == Phase.FAILED) is fails
    if fails:
        failed = {c.type: c for c in new.conditions}["Failed"]
        assert failed.reason == "InvalidInput" and "spec.branches[0].dataset.path" in failed.message
        assert failed.message.startswith("hub (cycle 1)")


def test_a_replacement_diagnose_or_merge_attempt_has_its_own_job_and_is_observed():
    from copd_operator.logic.naming import diagnose_job_name, merge_job_name

    from copd_core.cycle import RunDiagnose, RunMerge

    run = run_ref()
    st = RunStatus(phase=Phase.RUNNING, cycle=1, stage=Stage.DIAGNOSE, diagnose_attempt=1, restarts=1)
    kinds = _kinds(plan(run, CFG, st, [RunDiagnose(1, attempt=1)], SnapB(run).obj(), NOW, 1))
    assert ("Create", "Job", diagnose_job_name(DEMO, 1, 1)) in kinds and diagnose_job_name(DEMO, 1, 1) != \
        diagnose_job_name(DEMO, 1)
    # the failed first attempt is not looked at any more: only attempt 1's Job decides
    snap = SnapB(run).job(JobB(diagnose_job_name(DEMO, 1)).failed("boom")).obj()
    assert ob.observe(run.spec, st, snap).diagnose is None
    mst = RunStatus(phase=Phase.MERGING, cycle=1, merge_attempt=2, restarts=2)
    kinds = _kinds(plan(run, CFG, mst, [RunMerge(True, attempt=2)], SnapB(run).obj(), NOW, 1))
    assert ("Create", "Job", merge_job_name(DEMO, 2)) in kinds
    assert all(len(n) <= 57 for n in (diagnose_job_name(DEMO, 99, 9), merge_job_name(DEMO, 9)))
