"""Pure: turn one decision (new status + actions) and the snapshot into operations on children.

Level-based: the plan depends only on (spec, new status, actions, snapshot), so a
restarted operator, or the same reconcile run twice, plans the same idempotent
operations. Creates of existing names are skipped here and tolerated (409) by act.

    children wanted                    when
    PVC <run>-storage                  no spec.storage.claimName, until the run ends; its owner references
                                       follow spec.storage.retainPolicy (Delete: the run; Retain: none)
    NetworkPolicy <run>-hub            --network-policy (default), until the run ends
    Branch <run>-<b>  (spec, status)   created until the run ends, then kept in step; spec = (cycle, stage)
                                       the run wants (a new Branch's status comes with the next reconcile);
                                       status.progress is the trainer's: merged, never replaced
    Job <run>-<b>-c<c>-<stage>         RunBranchStage, once its Branch exists (the Job's owner is the
                                       Branch's uid) and, for OPD, once the hub's address is known
    Pod/Service <run>-hub-c<c>         phase Running, stage OPD
    Job <run>-diagnose-c<c>            RunDiagnose
    Job <run>-merge                    RunMerge
    unfinished Jobs                    suspended while Suspended, deleted once Succeeded/Failed
    Workload <run>-c<c>-<stage>        queued runs only (label kueue.x-k8s.io/queue-name): one per stage,
                                       logic/queueing.py; the stage's Jobs run and its hub pod exists only
                                       while Kueue admits it (the gate), never otherwise
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from copd_core.conditions import iso
from copd_core.consolidation import adaptive, stage_work
from copd_core.cycle import (
    TERMINAL,
    Event,
    Phase,
    RunBranchStage,
    RunDiagnose,
    RunMerge,
    RunStatus,
    Stage,
    steps_of,
)
from copd_operator.logic.builders import (
    OperatorConfig,
    RunRef,
    build_branch,
    build_diagnose_job,
    build_event,
    build_hub_network_policy,
    build_hub_pod,
    build_hub_service,
    build_merge_job,
    build_pvc,
    build_rendezvous_service,
    build_stage_job,
    hub_url,
    labels,
    pvc_owner_refs,
)
from copd_operator.logic.naming import (
    LABEL_COMPONENT,
    branch_cr_name,
    diagnose_job_name,
    hub_name,
    merge_job_name,
    stage_job_name,
)
from copd_operator.logic.observe import FAILED, SUCCEEDED, Snapshot, attempt_of, branch_cr_status, job_outcome
from copd_operator.logic.queueing import gate, job_in_step, workload_ops


@dataclass(frozen=True)
class Create:
    obj: dict


@dataclass(frozen=True)
class Patch:
    kind: str
    name: str
    body: dict
    status: bool = False  # the status subresource
    conflict_ok: bool = False  # a 409 (the object changed since it was read) is left to the next reconcile


@dataclass(frozen=True)
class Delete:
    kind: str
    name: str


Op = Create | Patch | Delete


# Keys of a Branch's status that its stage's trainer writes (copd_runtime/progress_report.py):
# the operator's status patch neither compares nor nulls them.
TRAINER_OWNED = frozenset({"progress"})


def replacing(old: dict | None, new: dict, keep: frozenset[str] = frozenset()) -> dict:
    """A JSON merge patch that makes `old` equal `new` at the top level (absent keys -> null),
    except for the keys in `keep`, which it leaves as they are."""
    body = dict(new)
    for k in old or {}:
        if k not in new and k not in keep:
            body[k] = None
    return body


def _operator_owned(status: dict | None) -> dict:
    return {k: v for k, v in (status or {}).items() if k not in TRAINER_OWNED}


def build_trainer_service_account(run: RunRef, cfg: OperatorConfig) -> dict:
    # Shared by every run of the namespace, so no owner: it outlives any one run.
    return {"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": cfg.trainer_service_account, "namespace": run.namespace,
                         "labels": {k: v for k, v in labels(run.name, "trainer").items() if k != "copd.io/run"}},
            "automountServiceAccountToken": False}


def current_hub(status: RunStatus) -> int | None:
    """The cycle whose hub should be serving, if any."""
    if status.phase == Phase.RUNNING and status.stage == Stage.OPD:
        return status.cycle
    return None


def hub_gone(pod: dict) -> bool:
    """A hub pod that will never serve again: evicted/failed/ended (a pod's restartPolicy cannot bring it
    back) or being deleted. The planner replaces it; trainers retry and re-resolve its address."""
    return bool(pod["metadata"].get("deletionTimestamp")) or \
        (pod.get("status") or {}).get("phase") in ("Failed", "Succeeded")


def _stage_now(status: RunStatus) -> str | None:
    """The RL/OPD stage whose trainer Jobs should be running, if any."""
    return status.stage.value if status.phase == Phase.RUNNING and status.stage in (Stage.RL, Stage.OPD) else None


def branch_statuses(run: RunRef, status: RunStatus, snap: Snapshot, generation: int) -> dict[str, dict]:
    """The status each existing Branch object should have, by branch: the run's view, its stage Job's
    state and its trainer's live progress folded in (without `progress` itself, the trainer's key)."""
    spec = run.spec
    stage_now = _stage_now(status)
    out = {}
    for b in spec.branches:
        cr = snap.branches.get(b.name)
        if cr is None:
            continue
        job = stage_job_name(run, b.name, status.cycle, stage_now, attempt_of(status, b.name)) if stage_now else None
        outcome = job_outcome(snap.jobs.get(job), snap.pods_of_job(job)) if job else None
        out[b.name] = branch_cr_status(status, b.name, steps_of(spec, Stage(stage_now), status, b.name) if stage_now else 0,
                                       outcome, job if job in snap.jobs else None, generation,
                                       progress=(cr.get("status") or {}).get("progress"))
    return out


def _finished(job: dict) -> bool:
    o = job_outcome(job, [])
    return o is not None and o.state in (SUCCEEDED, FAILED)


def plan(run: RunRef, cfg: OperatorConfig, status: RunStatus, actions: list, snap: Snapshot,
         now: datetime, generation: int) -> list[Op]:
    spec = run.spec
    ops: list[Op] = []
    # queued runs: the current stage's pods may run only while Kueue admits its Workload
    g = gate(snap.kueue, status, spec.suspend, run)

    # -- storage and the trainer identity -------------------------------------------
    if spec.storage.claim_name is None and not snap.pvc_exists and status.phase not in TERMINAL:
        ops.append(Create(build_pvc(run)))
    if spec.storage.claim_name is None and snap.pvc is not None:
        owners = pvc_owner_refs(run)  # retainPolicy may change while the run lives: the claim follows
        if (snap.pvc["metadata"].get("ownerReferences") or []) != owners:
            ops.append(Patch("PersistentVolumeClaim", snap.pvc["metadata"]["name"],
                             {"metadata": {"ownerReferences": owners or None}}))
    if cfg.network_policy and not snap.network_policies and status.phase not in TERMINAL:
        ops.append(Create(build_hub_network_policy(run)))  # before any hub pod exists
    if not snap.trainer_sa_exists:
        ops.append(Create(build_trainer_service_account(run, cfg)))

    # -- the hub of the current OPD stage --------------------------------------------
    hub_cycle = current_hub(status)
    url = None
    if hub_cycle is not None and not g.open:
        hub_cycle = None  # not admitted (yet, or any more): no hub pod; one that exists is deleted below
    if hub_cycle is not None:
        hub = hub_name(run, hub_cycle)
        pod = snap.pod(hub)
        if pod is not None and hub_gone(pod):  # evicted, failed or being deleted: replace it
            if not pod["metadata"].get("deletionTimestamp"):
                ops.append(Delete("Pod", hub))
            pod = None  # created again once the old one has gone (its deletion is a pod event)
        elif pod is None:
            ops.append(Create(build_hub_pod(run, cfg, hub_cycle)))
        if cfg.hub_address == "service" and hub not in snap.services:
            ops.append(Create(build_hub_service(run, cfg, hub_cycle)))
        url = hub_url(run, cfg, hub_cycle, ((pod or {}).get("status") or {}).get("podIP"))
    wanted_hub = hub_name(run, hub_cycle) if hub_cycle is not None else None
    for p in snap.pods:
        labels_ = p["metadata"].get("labels") or {}
        if labels_.get(LABEL_COMPONENT) == "hub" and p["metadata"]["name"] != wanted_hub \
                and not p["metadata"].get("deletionTimestamp"):
            ops.append(Delete("Pod", p["metadata"]["name"]))
    wanted_svc = hub_name(run, current_hub(status)) if current_hub(status) is not None else None
    if wanted_svc is not None and wanted_svc != wanted_hub and cfg.hub_address == "service" \
            and wanted_svc not in snap.services:
        ops.append(Create(build_hub_service(run, cfg, current_hub(status))))  # the address trainers will use
    if url is None and wanted_svc is not None and cfg.hub_address == "service":
        url = hub_url(run, cfg, current_hub(status), None)  # known before the hub exists (queued, not admitted)
    for svc in snap.services:
        if svc != wanted_svc:
            ops.append(Delete("Service", svc))

    # -- Branch objects --------------------------------------------------------------
    stage_now = _stage_now(status)
    statuses = branch_statuses(run, status, snap, generation)
    for b in spec.branches:
        cr = snap.branches.get(b.name)
        branch = build_branch(run, b.name, status.cycle, stage_now, url if stage_now == "OPD" else None)
        if cr is None:
            if status.phase not in TERMINAL:
                ops.append(Create(branch))  # its stage Job waits for the next reconcile (the uid)
            continue
        want = branch["spec"]
        if cr.get("spec") != want:
            ops.append(Patch("Branch", cr["metadata"]["name"], {"spec": replacing(cr.get("spec"), want)}))
        st, old = statuses[b.name], _operator_owned(cr.get("status"))
        if old != st:  # a merge patch: the trainer's progress stays as the trainer wrote it
            ops.append(Patch("Branch", cr["metadata"]["name"], {"status": replacing(old, st)}, status=True))

    # -- work the decision asked for ---------------------------------------------------
    events = []
    for a in actions:
        if isinstance(a, RunBranchStage):
            job = stage_job_name(run, a.branch, a.cycle, a.stage.value, a.attempt)
            existing = snap.jobs.get(job)
            if existing is not None:
                if (existing.get("spec") or {}).get("suspend") and not spec.suspend and g.open:
                    ops.append(Patch("Job", job, {"spec": {"suspend": False}}))
                continue
            cr = snap.branches.get(a.branch)
            if cr is None or (a.stage == Stage.OPD and url is None):
                continue  # next reconcile: the Branch (created above) / the hub's address is not known yet
            if spec.trainer.nodes > 1:  # pods of a multi-pod stage meet through it (kept for the branch's life)
                ops.append(Create(build_rendezvous_service(run, a.branch, cr["metadata"]["uid"])))
            # schedule.mode adaptive: the branch's steps (and OPD teachers) this cycle, from the cycle decision
            work = stage_work(spec, status.consolidation, a.branch, a.stage.value) if adaptive(spec) else None
            ops.append(Create(build_stage_job(run, cfg, a.branch, cr["metadata"]["uid"], a.cycle, a.stage.value,
                                              hub_url=url if a.stage == Stage.OPD else None, attempt=a.attempt,
                                              suspend=spec.suspend or not g.open, work=work)))
        elif isinstance(a, RunDiagnose):
            job = diagnose_job_name(run, a.cycle, a.attempt)
            if job not in snap.jobs:
                ops.append(Create(build_diagnose_job(run, cfg, a.cycle, a.attempt, suspend=not g.open)))
            elif (snap.jobs[job].get("spec") or {}).get("suspend") and g.open:
                ops.append(Patch("Job", job, {"spec": {"suspend": False}}))
        elif isinstance(a, RunMerge):
            job = merge_job_name(run, a.attempt)
            if job not in snap.jobs:
                ops.append(Create(build_merge_job(run, cfg, a.attempt, suspend=not g.open)))
            elif (snap.jobs[job].get("spec") or {}).get("suspend") and g.open:
                ops.append(Patch("Job", job, {"spec": {"suspend": False}}))
        elif isinstance(a, Event):
            suffix = f"{int(now.timestamp() * 1000):x}{len(events)}"
            events.append(Create(build_event(run, a.type, a.reason, a.message, iso(now), suffix)))
        # StopWork: its effect is the level-based rule below, so a restart cannot lose it

    # -- suspended: pause unfinished Jobs (their pods go; trainers resume from checkpoints) --
    # -- ended: delete unfinished Jobs ------------------------------------------------
    for job_name, job in snap.jobs.items():
        if _finished(job):
            continue
        if status.phase == Phase.SUSPENDED and not (job.get("spec") or {}).get("suspend"):
            ops.append(Patch("Job", job_name, {"spec": {"suspend": True}}))
        elif status.phase in TERMINAL:
            ops.append(Delete("Job", job_name))
        elif g.queued and not g.open and not (job.get("spec") or {}).get("suspend") \
                and (g.step is None or job_in_step(job, g.step)):
            ops.append(Patch("Job", job_name, {"spec": {"suspend": True}}))  # Kueue took the admission back

    # -- queued runs: the Workloads (after the Jobs: an evicted stage's quota goes back once its pods are gone) --
    if snap.kueue is not None:
        for w in workload_ops(run, cfg, snap.kueue, status, snap.pods, now):
            if w.kind == "create":
                ops.insert(0, Create(w.body))  # before the stage's (suspended) Jobs
            else:
                ops.append(Patch("Workload", w.name, w.body, status=w.kind == "status", conflict_ok=True))
    return ops + events


__all__ = ["Create", "Patch", "Delete", "Op", "plan", "replacing", "branch_statuses", "branch_cr_name",
           "TRAINER_OWNED"]
