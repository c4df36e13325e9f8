"""Pure: a CoPDRun under Kueue (the run is labelled `kueue.x-k8s.io/queue-name: <LocalQueue>`).

The operator is the run's Kueue job integration, as Kueue's own integrations are for Jobs and JobSets:

    one Workload per stage           <run>-c<cycle>-<stage>-<h> (RL, OPD, Diagnose, Merge), owned by the run,
                                     one podSet per branch (RL/OPD) plus `copd-hub` for OPD, one for a
                                     Diagnose or Merge Job; queueName from the label, priority from the
                                     label kueue.x-k8s.io/priority-class (a WorkloadPriorityClass) or else
                                     spec.trainer.priorityClassName
    admission -> the stage runs      the stage's Jobs are created suspended and unsuspended only while the
                                     Workload is admitted (quota reserved, admitted, not evicted); the hub
                                     pod exists only then. All of a stage's pods start together or none do
    eviction (preemption, a stopped  the stage's Jobs are suspended (their pods go: a suspend is not a
    queue, deactivation)             failure, so no restart budget is spent) and the hub pod deleted; once
                                     none of the stage's pods is left, the operator clears the Workload's
                                     quota reservation (QuotaReserved False, Requeued True: what Kueue's
                                     job integrations do) and Kueue queues it again. Re-admitted, the same
                                     Jobs resume, and each trainer resumes from its newest checkpoint
    spec.suspend                     the Workload is deactivated (spec.active false), reactivated on resume
    the stage is over                the Workload gets Finished True: Kueue releases its quota

The operator never un-does a Kueue decision: it starts pods only for an admitted Workload and never
writes admission itself. Runs without the label are untouched by all of this.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from copd_core.conditions import iso, set_condition
from copd_core.cycle import TERMINAL, Event, Phase, QueueStatus, RunStatus, Stage
from copd_operator.logic.builders import (
    OperatorConfig,
    RunRef,
    build_diagnose_job,
    build_hub_pod,
    build_merge_job,
    build_stage_job,
    labels,
)
from copd_operator.logic.naming import (
    KUEUE_GROUP,
    KUEUE_VERSION,
    LABEL_COMPONENT,
    LABEL_CYCLE,
    LABEL_STAGE,
    QUEUE_LABEL,
    workload_name,
)

MERGE = "Merge"
HUB_POD_SET = "copd-hub"
GPU = "nvidia.com/gpu"

COND_QUEUED = "Queued"
COND_ADMITTED = "Admitted"
R_WAITING_FOR_QUOTA = "WaitingForQuota"
R_LOCAL_QUEUE_NOT_FOUND = "LocalQueueNotFound"
R_KUEUE_NOT_INSTALLED = "KueueNotInstalled"
R_ADMITTED = "Admitted"
R_EVICTED = "Evicted"
R_NO_STAGE = "NoStage"

QUEUED, ADMITTED, QUEUE_NOT_FOUND, IDLE = "Queued", "Admitted", "QueueNotFound", "Idle"


@dataclass(frozen=True)
class Step:
    """The stage whose pods need quota now."""

    cycle: int
    stage: str  # RL | OPD | Diagnose | Merge


@dataclass(frozen=True)
class KueueView:
    """What gather read for a queued run."""

    queue: str
    workloads: dict[str, dict]  # name -> Workload, owned by the run
    local_queue_exists: bool = True
    kueue_installed: bool = True
    priority: int | None = None
    priority_class_ref: dict | None = None  # {group, kind, name}


def queue_of(run_obj: dict) -> str | None:
    """The LocalQueue a run asks for (Kueue's label convention), else None: the run is not queued."""
    q = ((run_obj.get("metadata") or {}).get("labels") or {}).get(QUEUE_LABEL)
    return q or None


def current_step(status: RunStatus) -> Step | None:
    if status.phase == Phase.RUNNING and status.stage in (Stage.RL, Stage.OPD, Stage.DIAGNOSE):
        return Step(status.cycle, status.stage.value)
    if status.phase == Phase.MERGING:
        return Step(status.cycle, MERGE)
    return None


# ---------------------------------------------------------------------------
# Workload state


def _cond(wl: dict | None, type_: str) -> dict | None:
    return next((c for c in ((wl or {}).get("status") or {}).get("conditions") or [] if c.get("type") == type_),
                None)


def _true(wl: dict | None, type_: str) -> bool:
    c = _cond(wl, type_)
    return c is not None and c.get("status") == "True"


def holds_quota(wl: dict | None) -> bool:
    return _true(wl, "QuotaReserved")


def evicted(wl: dict | None) -> bool:
    return _true(wl, "Evicted")


def finished(wl: dict | None) -> bool:
    return _true(wl, "Finished")


def admitted(wl: dict | None) -> bool:
    """Kueue admitted it and has not taken that back: its pods may run."""
    return holds_quota(wl) and _true(wl, "Admitted") and not evicted(wl) and not finished(wl)


def _with_condition(conds: list[dict], type_: str, status: str, reason: str, message: str, now: datetime,
                    generation: int) -> list[dict]:
    out, found = [], False
    for c in conds:
        if c.get("type") != type_:
            out.append(c)
            continue
        found = True
        ltt = c.get("lastTransitionTime") if c.get("status") == status else iso(now)
        out.append({**c, "status": status, "reason": reason, "message": message[:32768],
                    "lastTransitionTime": ltt, "observedGeneration": generation})
    if not found:
        out.append({"type": type_, "status": status, "reason": reason, "message": message[:32768],
                    "lastTransitionTime": iso(now), "observedGeneration": generation})
    return out


def release_status(wl: dict, now: datetime) -> dict:
    """The status patch that gives an evicted Workload's quota back once its pods are gone (what Kueue's
    job integrations do): QuotaReserved False, Admitted False, Requeued True, no admission. Guarded by the
    resourceVersion read: a concurrent change by Kueue makes it a 409 and the next reconcile looks again."""
    ev = _cond(wl, "Evicted") or {}
    gen = int(wl["metadata"].get("generation", 0))
    msg = ev.get("message") or "evicted"
    conds = list((wl.get("status") or {}).get("conditions") or [])
    conds = _with_condition(conds, "QuotaReserved", "False", "Pending", msg, now, gen)
    if _cond(wl, "Admitted") is not None:
        conds = _with_condition(conds, "Admitted", "False", "NoReservation", "The workload has no reservation",
                                now, gen)
    conds = _with_condition(conds, "Requeued", "True", ev.get("reason") or "Evicted", msg, now, gen)
    return {"metadata": {"resourceVersion": wl["metadata"]["resourceVersion"]},
            "status": {"admission": None, "conditions": conds}}


def finish_status(wl: dict, now: datetime, reason: str, message: str) -> dict:
    """Finished True: Kueue releases the Workload's quota (the stage is over)."""
    gen = int(wl["metadata"].get("generation", 0))
    conds = _with_condition(list((wl.get("status") or {}).get("conditions") or []), "Finished", "True", reason,
                            message, now, gen)
    return {"metadata": {"resourceVersion": wl["metadata"]["resourceVersion"]}, "status": {"conditions": conds}}


# ---------------------------------------------------------------------------
# The Workload of a stage


def _pod_set(name: str, template: dict, count: int = 1) -> dict:
    """What Kueue needs of a pod: its resources (GPUs as requests too: extended resources are requested at
    their limit) and what decides where it may run (node selector, tolerations, priority class)."""
    spec = template["spec"]
    containers = []
    for c in spec["containers"]:
        res = c.get("resources") or {}
        requests = dict(res.get("requests") or {})
        for k, v in (res.get("limits") or {}).items():
            requests.setdefault(k, v)
        containers.append({"name": c["name"], "image": c["image"],
                           "resources": {"requests": requests, "limits": dict(res.get("limits") or {})}})
    pod = {"restartPolicy": spec.get("restartPolicy", "Never"), "containers": containers}
    for k in ("nodeSelector", "tolerations", "priorityClassName"):
        if spec.get(k):
            pod[k] = spec[k]
    md = {"labels": dict((template.get("metadata") or {}).get("labels") or {})}
    return {"name": name, "count": count, "template": {"metadata": md, "spec": pod}}


def pod_set_names(run: RunRef) -> dict[str, str]:
    """Branch -> podSet name: the branch's name (a DNS label), or `branch-<i>` for every branch if one of
    them is called like the hub's podSet."""
    names = [b.name for b in run.spec.branches]
    if HUB_POD_SET in names:
        return {n: f"branch-{i}" for i, n in enumerate(names)}
    return {n: n for n in names}


def build_workload(run: RunRef, cfg: OperatorConfig, step: Step, view: KueueView) -> dict:
    spec = run.spec
    if step.stage in (Stage.RL.value, Stage.OPD.value):
        names = pod_set_names(run)
        pod_sets = []
        for b in spec.branches:  # a multi-node stage (trainer.nodes > 1) is an Indexed Job: nodes pods
            job = build_stage_job(run, cfg, b.name, "", step.cycle, step.stage)
            pod_sets.append(_pod_set(names[b.name], job["spec"]["template"], int(job["spec"].get("parallelism", 1))))
        if step.stage == Stage.OPD.value:
            pod_sets.append(_pod_set(HUB_POD_SET, build_hub_pod(run, cfg, step.cycle)))
    elif step.stage == Stage.DIAGNOSE.value:
        pod_sets = [_pod_set("diagnose", build_diagnose_job(run, cfg, step.cycle)["spec"]["template"])]
    else:
        pod_sets = [_pod_set("merge", build_merge_job(run, cfg)["spec"]["template"])]
    wl_spec: dict = {"queueName": view.queue, "podSets": pod_sets, "active": not spec.suspend}
    if view.priority is not None:
        wl_spec["priority"] = view.priority
    if view.priority_class_ref is not None:
        wl_spec["priorityClassRef"] = view.priority_class_ref
    return {
        "apiVersion": f"{KUEUE_GROUP}/{KUEUE_VERSION}", "kind": "Workload",
        "metadata": {"name": workload_name(run, step.cycle, step.stage), "namespace": run.namespace,
                     "labels": labels(run.name, "workload", cycle=step.cycle, stage=step.stage),
                     "ownerReferences": [run.owner]},
        "spec": wl_spec,
    }


# ---------------------------------------------------------------------------
# Pods of a stage


def step_of_labels(lab: dict) -> Step | None:
    comp = lab.get(LABEL_COMPONENT)
    try:
        cycle = int(lab.get(LABEL_CYCLE, "0"))
    except ValueError:
        return None
    if comp in ("trainer", "workload") and lab.get(LABEL_STAGE):
        return Step(cycle, lab[LABEL_STAGE])
    if comp == "hub":
        return Step(cycle, Stage.OPD.value)
    if comp == "diagnose":
        return Step(cycle, Stage.DIAGNOSE.value)
    if comp == "merge":
        return Step(0, MERGE)
    return None


def _same(a: Step | None, b: Step) -> bool:
    # the merge Job's labels carry no cycle: a merge is a merge
    return a is not None and a.stage == b.stage and (a.cycle == b.cycle or b.stage == MERGE)


def pods_alive(pods: list[dict], step: Step) -> list[str]:
    """Names of the stage's pods that may still hold resources (not ended)."""
    out = []
    for p in pods:
        if not _same(step_of_labels(p["metadata"].get("labels") or {}), step):
            continue
        if (p.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            continue
        out.append(p["metadata"]["name"])
    return out


def job_in_step(job: dict, step: Step) -> bool:
    return _same(step_of_labels(job["metadata"].get("labels") or {}), step)


# ---------------------------------------------------------------------------
# What the plan does with Workloads, and the gate on the stage's pods


@dataclass(frozen=True)
class Gate:
    """May the current stage's pods run? Always for a run that is not queued."""

    queued: bool
    open: bool
    step: Step | None = None


OPEN = Gate(queued=False, open=True)


def gate(view: KueueView | None, status: RunStatus, suspend: bool, run: RunRef) -> Gate:
    if view is None:
        return OPEN
    step = current_step(status)
    if step is None:
        return Gate(True, False, None)
    wl = view.workloads.get(workload_name(run, step.cycle, step.stage))
    return Gate(True, admitted(wl) and not suspend, step)


@dataclass(frozen=True)
class WorkloadOp:
    kind: str  # create | patch | status
    name: str
    body: dict


def workload_ops(run: RunRef, cfg: OperatorConfig, view: KueueView, status: RunStatus, pods: list[dict],
                 now: datetime) -> list[WorkloadOp]:
    spec = run.spec
    step = current_step(status)
    ops: list[WorkloadOp] = []
    current = workload_name(run, step.cycle, step.stage) if step is not None else None
    if step is not None and current not in view.workloads and status.phase not in TERMINAL:
        ops.append(WorkloadOp("create", current, build_workload(run, cfg, step, view)))
    for name, wl in sorted(view.workloads.items()):
        if finished(wl):
            continue
        wl_step = step_of_labels(wl["metadata"].get("labels") or {})
        active = (wl.get("spec") or {}).get("active", True)
        if name == current or status.phase == Phase.SUSPENDED:
            want_active = not spec.suspend
            if active != want_active:
                ops.append(WorkloadOp("patch", name, {"spec": {"active": want_active}}))
            if evicted(wl) and holds_quota(wl) and wl_step is not None and not pods_alive(pods, wl_step):
                ops.append(WorkloadOp("status", name, release_status(wl, now)))
        else:  # a stage that is over (or the run ended): its quota goes back to the queue
            reason = "Failed" if status.phase == Phase.FAILED else "Succeeded"
            ops.append(WorkloadOp("status", name, finish_status(
                wl, now, reason, f"the run moved on (phase {status.phase.value})")))
    return ops


# ---------------------------------------------------------------------------
# The run's status


def queue_status(view: KueueView, run: RunRef, status: RunStatus, now: datetime, gen: int) \
        -> tuple[RunStatus, list[Event]]:
    """status.queue, conditions Queued and Admitted, and an Event when admission changes."""
    step = current_step(status)
    wl_name = workload_name(run, step.cycle, step.stage) if step is not None else None
    wl = view.workloads.get(wl_name) if wl_name else None
    if step is None:
        state, reason, msg = IDLE, R_NO_STAGE, "no stage needs quota now"
    elif not view.kueue_installed:
        state, reason, msg = QUEUED, R_KUEUE_NOT_INSTALLED, \
            "the run is labelled kueue.x-k8s.io/queue-name but Kueue's Workload API is not served here"
    elif not view.local_queue_exists:
        state, reason, msg = QUEUE_NOT_FOUND, R_LOCAL_QUEUE_NOT_FOUND, \
            f"LocalQueue {view.queue!r} not found in namespace {run.namespace}: the run waits until it exists"
    elif admitted(wl) and not run.spec.suspend:
        state, reason, msg = ADMITTED, R_ADMITTED, f"{step.stage} of cycle {step.cycle} admitted by Kueue"
    elif wl is not None and evicted(wl):
        ev = _cond(wl, "Evicted") or {}
        state, reason = QUEUED, R_EVICTED
        msg = f"{step.stage} of cycle {step.cycle} evicted ({ev.get('reason')}: {ev.get('message', '')}); " \
              "it waits for quota and resumes from its newest checkpoint"
    else:
        qr = _cond(wl, "QuotaReserved") or {}
        state, reason = QUEUED, R_WAITING_FOR_QUOTA
        msg = f"{step.stage} of cycle {step.cycle} waits for quota in LocalQueue {view.queue!r}" + \
            (f": {qr['message']}" if qr.get("message") else "")
    s = status.model_copy(deep=True)
    old = status.queue.state if status.queue is not None else None
    s.queue = QueueStatus(name=view.queue, state=state, workload=wl_name, message=msg[:1024])
    conds = set_condition(s.conditions, COND_QUEUED, "True" if state in (QUEUED, QUEUE_NOT_FOUND) else "False",
                          reason, msg[:1024], now, gen)
    conds = set_condition(conds, COND_ADMITTED, "True" if state == ADMITTED else "False", reason, msg[:1024],
                          now, gen)
    s.conditions = conds
    events = []
    if old != state and state != IDLE:
        kind = "Warning" if reason in (R_EVICTED, R_LOCAL_QUEUE_NOT_FOUND, R_KUEUE_NOT_INSTALLED) else "Normal"
        events.append(Event(kind, reason, msg[:1024]))
    return s, events
