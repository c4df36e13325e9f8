"""Pure: a CoPDRun under Kueue (logic/queueing.py and its use in plan.py), pod labels/annotations."""

from dataclasses import replace
from datetime import UTC, datetime

import pytest
from copd_operator.logic.builders import build_hub_pod, build_stage_job
from copd_operator.logic.naming import hub_name, stage_job_name, workload_name
from copd_operator.logic.observe import Snapshot
from copd_operator.logic.plan import Create, Delete, Patch, plan
from copd_operator.logic.queueing import (
    KueueView,
    admitted,
    build_workload,
    current_step,
    queue_status,
    release_status,
)
from pydantic import ValidationError

from copd_core.cycle import Phase, RunBranchStage, RunStatus, Stage
from copd_core.spec import parse_manifest
from tests.unit.operator.builders_test_helpers import CFG, DEMO, example_doc, run_ref

NOW = datetime(2026, 1, 1, tzinfo=UTC)
SVC = replace(CFG, hub_address="service")
RUN = run_ref()
RL1 = RunStatus(phase=Phase.RUNNING, cycle=1, stage=Stage.RL)
OPD1 = RunStatus(phase=Phase.RUNNING, cycle=1, stage=Stage.OPD)
WL_RL1 = workload_name(DEMO, 1, "RL")


def wl(name: str, stage: str = "RL", cycle: int = 1, **conds: str) -> dict:
    return {"metadata": {"name": name, "resourceVersion": "7", "generation": 1,
                         "labels": {"copd.io/component": "workload", "copd.io/cycle": str(cycle),
                                    "copd.io/stage": stage}},
            "spec": {"active": True},
            "status": {"conditions": [{"type": t, "status": v, "reason": t, "message": f"{t} msg"}
                                      for t, v in conds.items()]}}


ADMITTED = {"QuotaReserved": "True", "Admitted": "True"}
EVICTED = {"QuotaReserved": "True", "Admitted": "True", "Evicted": "True"}


def snap(jobs=None, pods=None, workloads=None, queue_exists=True) -> Snapshot:
    branches = {b.name: {"metadata": {"name": f"br-{b.name}", "uid": f"uid-{b.name}"}, "spec": {}, "status": {}}
                for b in RUN.spec.branches}
    s = Snapshot(run={"metadata": {"name": "demo", "uid": "uid-run"}}, branches=branches, jobs=jobs or {},
                 pods=pods or [], pvc_exists=True, network_policies={"np": {}})
    s.kueue = KueueView("gpus", workloads or {}, local_queue_exists=queue_exists)
    return s


def rl_actions():
    return [RunBranchStage(b.name, 1, Stage.RL) for b in RUN.spec.branches]


def job(branch: str, suspend: bool, stage: str = "RL") -> dict:
    j = build_stage_job(RUN, CFG, branch, f"uid-{branch}", 1, stage)
    j["metadata"]["uid"] = f"uid-job-{branch}"
    j["spec"]["suspend"] = suspend
    return j


def test_queued_stage_gets_one_workload_and_suspended_jobs():
    ops = plan(RUN, CFG, RL1, rl_actions(), snap(), NOW, 1)
    creates = [op.obj for op in ops if isinstance(op, Create)]
    wls = [o for o in creates if o["kind"] == "Workload"]
    assert len(wls) == 1 and wls[0]["metadata"]["name"] == WL_RL1
    assert creates.index(wls[0]) < min(i for i, o in enumerate(creates) if o["kind"] == "Job")
    w = wls[0]["spec"]
    assert w["queueName"] == "gpus" and w["active"] is True
    assert [p["name"] for p in w["podSets"]] == ["arith", "reverse", "maxbox"]
    assert all(p["count"] == 1 for p in w["podSets"])
    c = w["podSets"][0]["template"]["spec"]["containers"][0]
    assert c["resources"]["requests"]["nvidia.com/gpu"] == "1"  # GPUs requested at their limit
    assert w["podSets"][0]["template"]["spec"]["nodeSelector"] == RUN.spec.trainer.node_selector
    jobs = [o for o in creates if o["kind"] == "Job"]
    assert len(jobs) == 3 and all(j["spec"]["suspend"] is True for j in jobs)


def test_opd_workload_has_the_hub_and_no_hub_pod_before_admission():
    w = build_workload(RUN, CFG, current_step(OPD1), KueueView("gpus", {}, priority=100,
                       priority_class_ref={"group": "kueue.x-k8s.io", "kind": "WorkloadPriorityClass",
                                           "name": "high"}))
    assert [p["name"] for p in w["spec"]["podSets"]] == ["arith", "reverse", "maxbox", "copd-hub"]
    assert w["spec"]["priority"] == 100 and w["spec"]["priorityClassRef"]["name"] == "high"
    acts = [RunBranchStage(b.name, 1, Stage.OPD) for b in RUN.spec.branches]
    ops = plan(RUN, CFG, OPD1, acts, snap(), NOW, 1)
    assert not any(isinstance(op, Create) and op.obj["kind"] == "Pod" for op in ops)
    # pod-ip mode: the hub's address needs the hub, so the OPD Jobs wait for admission too
    assert not any(isinstance(op, Create) and op.obj["kind"] == "Job" for op in ops)
    # service mode: the address is known without the hub: the suspended OPD Jobs carry it
    ops = plan(RUN, SVC, OPD1, acts, snap(), NOW, 1)
    assert not any(isinstance(op, Create) and op.obj["kind"] == "Pod" for op in ops)
    jobs = [op.obj for op in ops if isinstance(op, Create) and op.obj["kind"] == "Job"]
    assert len(jobs) == 3 and all("--hub-url" in j["spec"]["template"]["spec"]["containers"][0]["args"]
                                  for j in jobs)
    # admitted: the hub pod is created
    wname = workload_name(DEMO, 1, "OPD")
    ops = plan(RUN, CFG, OPD1, acts, snap(workloads={wname: wl(wname, "OPD", **ADMITTED)}), NOW, 1)
    assert any(isinstance(op, Create) and op.obj["kind"] == "Pod" for op in ops)


def test_admission_unsuspends_the_whole_stage_and_eviction_suspends_it():
    jobs = {stage_job_name(RUN, b.name, 1, "RL"): job(b.name, True) for b in RUN.spec.branches}
    ops = plan(RUN, CFG, RL1, rl_actions(), snap(jobs, workloads={WL_RL1: wl(WL_RL1)}), NOW, 1)
    assert not [op for op in ops if isinstance(op, Patch) and op.kind == "Job"], "unsuspended before admission"
    ops = plan(RUN, CFG, RL1, rl_actions(), snap(jobs, workloads={WL_RL1: wl(WL_RL1, **ADMITTED)}), NOW, 1)
    unsuspend = [op for op in ops if isinstance(op, Patch) and op.body == {"spec": {"suspend": False}}]
    assert len(unsuspend) == 3
    running = {n: {**j, "spec": {**j["spec"], "suspend": False}} for n, j in jobs.items()}
    pods = [{"metadata": {"name": f"{n}-x", "labels": j["spec"]["template"]["metadata"]["labels"]},
             "status": {"phase": "Running"}} for n, j in running.items()]
    ops = plan(RUN, CFG, RL1, rl_actions(), snap(running, pods, {WL_RL1: wl(WL_RL1, **EVICTED)}), NOW, 1)
    suspend = [op for op in ops if isinstance(op, Patch) and op.body == {"spec": {"suspend": True}}]
    assert len(suspend) == 3
    # pods still there: the quota is not released yet
    assert not [op for op in ops if isinstance(op, Patch) and op.kind == "Workload"]
    # pods gone: released, requeued
    gone = {n: {**j, "spec": {**j["spec"], "suspend": True}} for n, j in jobs.items()}
    ops = plan(RUN, CFG, RL1, rl_actions(), snap(gone, [], {WL_RL1: wl(WL_RL1, **EVICTED)}), NOW, 1)
    rel = [op for op in ops if isinstance(op, Patch) and op.kind == "Workload"]
    assert len(rel) == 1 and rel[0].status and rel[0].conflict_ok
    body = rel[0].body
    assert body["status"]["admission"] is None and body["metadata"]["resourceVersion"] == "7"
    conds = {c["type"]: c["status"] for c in body["status"]["conditions"]}
    assert conds["QuotaReserved"] == "False" and conds["Admitted"] == "False" and conds["Requeued"] == "True"


def test_past_stage_workload_is_finished_and_suspend_deactivates():
    old = workload_name(DEMO, 1, "RL")
    ops = plan(RUN, CFG, OPD1, [], snap(workloads={old: wl(old, **ADMITTED)}), NOW, 1)
    fin = [op for op in ops if isinstance(op, Patch) and op.kind == "Workload" and op.name == old]
    assert len(fin) == 1 and any(c["type"] == "Finished" and c["status"] == "True"
                                 for c in fin[0].body["status"]["conditions"])
    susp = run_ref(suspend=True)
    st = RunStatus(phase=Phase.SUSPENDED, cycle=1, stage=Stage.RL)
    ops = plan(susp, CFG, st, [], snap(workloads={old: wl(old, **ADMITTED)}), NOW, 1)
    assert [op.body for op in ops if isinstance(op, Patch) and op.kind == "Workload"] == \
        [{"spec": {"active": False}}]


def test_unqueued_run_is_unchanged():
    s = snap()
    s.kueue = None
    jobs = {stage_job_name(RUN, b.name, 1, "RL"): job(b.name, True) for b in RUN.spec.branches}
    s.jobs = jobs
    ops = plan(RUN, CFG, RL1, rl_actions(), s, NOW, 1)
    assert len([op for op in ops if isinstance(op, Patch) and op.body == {"spec": {"suspend": False}}]) == 3
    assert not [op for op in ops if isinstance(op, Create) and op.obj["kind"] == "Workload"]


def test_queue_status_and_conditions():
    view = KueueView("gpus", {}, local_queue_exists=False)
    st, events = queue_status(view, RUN, RL1, NOW, 1)
    assert st.queue.state == "QueueNotFound" and st.queue.name == "gpus"
    q = next(c for c in st.conditions if c.type == "Queued")
    assert (q.status, q.reason) == ("True", "LocalQueueNotFound") and "'gpus' not found" in q.message
    assert events and events[0].reason == "LocalQueueNotFound"
    st2, events2 = queue_status(view, RUN, st, NOW, 1)
    assert not events2, "an Event per change, not per reconcile"
    view = KueueView("gpus", {WL_RL1: wl(WL_RL1, QuotaReserved="False")})
    st, _ = queue_status(view, RUN, RL1, NOW, 1)
    assert st.queue.state == "Queued" and st.queue.workload == WL_RL1
    view = KueueView("gpus", {WL_RL1: wl(WL_RL1, **ADMITTED)})
    st, _ = queue_status(view, RUN, RL1, NOW, 1)
    assert st.queue.state == "Admitted"
    assert next(c for c in st.conditions if c.type == "Admitted").status == "True"
    view = KueueView("gpus", {WL_RL1: wl(WL_RL1, **EVICTED)})
    st, ev = queue_status(view, RUN, st, NOW, 1)
    assert st.queue.state == "Queued" and ev[0].reason == "Evicted" and ev[0].type == "Warning"
    assert not admitted(view.workloads[WL_RL1])
    body = release_status(view.workloads[WL_RL1], NOW)
    assert next(c for c in body["status"]["conditions"] if c["type"] == "Requeued")["reason"] == "Evicted"


def test_pod_labels_and_annotations_reach_every_pod_and_cannot_override():
    run = run_ref(trainer={**example_doc()["spec"]["trainer"],
                           "podLabels": {"cost-centre": "ml-42", "example.com/team": "a"},
                           "podAnnotations": {"sidecar.istio.io/inject": "false"}})
    for pod in (build_stage_job(run, CFG, "arith", "u", 1, "RL")["spec"]["template"],
                build_hub_pod(run, CFG, 1)):
        md = pod["metadata"]
        assert md["labels"]["cost-centre"] == "ml-42" and md["labels"]["copd.io/run"] == "demo"
        assert md["annotations"] == {"sidecar.istio.io/inject": "false"}
    assert hub_name(run, 1)


@pytest.mark.parametrize("field, value, msg", [
    ("podLabels", {"copd.io/run": "x"}, "reserved"),
    ("podLabels", {"kueue.x-k8s.io/queue-name": "q"}, "reserved"),
    ("podAnnotations", {"batch.kubernetes.io/job-name": "x"}, "reserved"),
    ("podLabels", {"bad key!": "x"}, "not a valid key"),
    ("podLabels", {"ok": "not valid!"}, "not a valid label value"),
    ("podLabels", {"a" * 64: "x"}, "not a valid key"),
])
def test_bad_pod_labels_are_refused(field, value, msg):
    doc = example_doc()
    doc["spec"]["trainer"][field] = value
    with pytest.raises((ValidationError, ValueError), match=msg):
        parse_manifest(doc)


def test_operator_keys_win_even_if_validation_were_bypassed():
    run = run_ref()
    object.__setattr__(run.spec.trainer, "pod_labels", {"copd.io/run": "evil"})
    md = build_stage_job(run, CFG, "arith", "u", 1, "RL")["spec"]["template"]["metadata"]
    assert md["labels"]["copd.io/run"] == "demo"
    assert Delete  # the plan's ops types are importable next to Patch/Create
