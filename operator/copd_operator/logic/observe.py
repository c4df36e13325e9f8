"""Pure: what the gathered children say, as `copd_core.cycle.Observed` and Branch statuses.

How results come back: every entry point (`copd stage|diagnose|merge`) writes a
one-line JSON report to /dev/termination-log; the kubelet (or the process node)
copies it into the pod's `containerStatuses[].state.terminated.message`. The
operator reads it from the Job's pod: the decisions need no trainer API access,
and a report survives an operator restart for as long as the pod exists.

Live progress is extra, never decisive: a stage's trainer patches `status.progress`
of its Branch while it runs (a projected token, a Role allowing `patch` on
`branches/status`). `branch_cr_status` folds a progress of the branch's current
(cycle, stage) into the Branch's `step` (the larger of it and the stage report's)
and, until the stage reports, `reward`; the cycle decision only ever uses reports.

A Job that succeeded with an empty or unparsable message (KWOK's fake pods,
or a report lost with its pod) counts as "done, nothing measured": a stage is
done with its full step count, a diagnose has no diagnostics (readiness false,
then the merge follows spec.merge.whenNotReady), a merge is at its default path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from copd_core.conditions import R_CLAIM_NOT_FOUND, R_INVALID_INPUT, R_PRIORITY_CLASS_NOT_FOUND
from copd_core.cycle import (
    TERMINAL,
    BranchReport,
    DiagnoseReport,
    MergeReport,
    Observed,
    Phase,
    RunStatus,
    Stage,
    steps_of,
)
from copd_core.readiness import DirectionDiagnostic
from copd_core.spec import CoPDRunSpec
from copd_operator.api import BranchCRStatus, BranchProgress
from copd_operator.logic.builders import EXIT_BAD_INPUT, merged_path

from . import naming

PENDING, RUNNING, SUCCEEDED, FAILED, SUSPENDED = "Pending", "Running", "Succeeded", "Failed", "Suspended"


@dataclass(frozen=True)
class JobOutcome:
    state: str  # Pending | Running | Succeeded | Failed | Suspended
    report: dict | None = None  # the parsed termination message of the pod that decided it
    message: str = ""


@dataclass
class Snapshot:
    """Everything one reconcile read from the cluster about one run (gather.py fills it)."""

    run: dict
    branches: dict[str, dict] = field(default_factory=dict)  # branch name -> Branch object
    jobs: dict[str, dict] = field(default_factory=dict)  # job name -> Job
    pods: list[dict] = field(default_factory=list)  # pods labelled with the run
    services: dict[str, dict] = field(default_factory=dict)
    pvc_exists: bool = False
    pvc: dict | None = None  # the claim the operator made for this run (none with spec.storage.claimName)
    network_policies: dict[str, dict] = field(default_factory=dict)  # the run's, by name
    claim_missing: str | None = None  # a spec.storage.claimName that does not exist
    priority_class_missing: str | None = None
    trainer_sa_exists: bool = True
    kueue: Any = None  # queueing.KueueView of a queued run (label kueue.x-k8s.io/queue-name), else None

    def pods_of_job(self, job: str) -> list[dict]:
        return [p for p in self.pods if (p["metadata"].get("labels") or {}).get("job-name") == job
                or (p["metadata"].get("labels") or {}).get("batch.kubernetes.io/job-name") == job]

    def pod(self, name: str) -> dict | None:
        return next((p for p in self.pods if p["metadata"]["name"] == name), None)


def _terminated(pod: dict) -> dict | None:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        term = (cs.get("state") or {}).get("terminated")
        if term:
            return term
    return None


def parse_report(message: str | None) -> dict | None:
    """The last line of a termination message that is a JSON object, else None."""
    for line in reversed((message or "").strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                return None
            return obj if isinstance(obj, dict) else None
    return None


def _condition(obj: dict, type_: str) -> bool:
    return any(c.get("type") == type_ and c.get("status") == "True"
               for c in (obj.get("status") or {}).get("conditions") or [])


def job_outcome(job: dict | None, pods: list[dict]) -> JobOutcome | None:
    if job is None:
        return None
    st = job.get("status") or {}
    finished = sorted((p for p in pods if _terminated(p)),
                      key=lambda p: _terminated(p).get("finishedAt") or "")
    if _condition(job, "Complete") or _condition(job, "SuccessCriteriaMet") or st.get("succeeded", 0) > 0:
        ok = [p for p in finished if _terminated(p).get("exitCode") == 0]
        # a multi-pod stage: only the pod of global rank 0 writes a report
        ok = [p for p in ok if parse_report(_terminated(p).get("message"))] or ok
        msg = _terminated(ok[-1]).get("message", "") if ok else ""
        return JobOutcome(SUCCEEDED, parse_report(msg), msg)
    if _condition(job, "Failed") or _condition(job, "FailureTarget"):
        msg = _terminated(finished[-1]).get("message", "") if finished else ""
        reasons = [c.get("message", "") for c in st.get("conditions") or [] if c.get("type") == "Failed"]
        rep = parse_report(msg)
        text = (rep or {}).get("message") or msg.strip()[-500:] or "; ".join(reasons) or "job failed"
        return JobOutcome(FAILED, rep, text)
    if (job.get("spec") or {}).get("suspend"):
        return JobOutcome(SUSPENDED)
    return JobOutcome(RUNNING if st.get("active", 0) > 0 else PENDING)


def branch_report(spec: CoPDRunSpec, cycle: int, stage: Stage, outcome: JobOutcome | None,
                  steps: int | None = None) -> BranchReport | None:
    """`steps`: the branch's planned steps in the stage (`steps_of` with the run's status), the step a
    report without one is taken to have reached."""
    if outcome is None:
        return None
    rep = outcome.report or {}
    if outcome.state == FAILED or rep.get("failed"):
        # a reason from the trainer (e.g. InvalidInput) means retrying cannot help; none: replace the attempt
        return BranchReport(cycle, stage, failed=True, message=outcome.message or rep.get("message", ""),
                            reason=rep.get("reason"))
    if outcome.state == SUCCEEDED:
        return BranchReport(cycle, stage, step=int(rep.get("step", steps_of(spec, stage) if steps is None else steps)),
                            reward=rep.get("reward"), done=bool(rep.get("done", True)),
                            message=rep.get("message", "") if outcome.report else "no report (empty message)",
                            storage_warning=rep.get("storage_warning"))
    return BranchReport(cycle, stage)


def diagnose_report(cycle: int, outcome: JobOutcome | None) -> DiagnoseReport | None:
    if outcome is None or outcome.state not in (SUCCEEDED, FAILED):
        return None
    if outcome.state == FAILED:
        return DiagnoseReport(cycle, failed=True, message=outcome.message, reason=(outcome.report or {}).get("reason"))
    report = outcome.report or {}
    # compact rows [student, teacher, overlap, symmetric KL(, mass overlap)] (`copd diagnose`; for large
    # meshes only each student's extremes, which is all the readiness test needs), or the older list of dicts
    diags = tuple(DirectionDiagnostic(cycle, r[0], r[1], float(r[2]), float(r[3]),
                                      float(r[4]) if len(r) > 4 and r[4] is not None else None)
                  for r in report.get("directions") or [])
    diags += tuple(DirectionDiagnostic(int(r["cycle"]), r["student"], r["teacher"], float(r["topk_overlap"]),
                                       float(r["symmetric_kl"]),
                                       float(r["mass_overlap"]) if r.get("mass_overlap") is not None else None)
                   for r in report.get("diagnostics") or [])
    return DiagnoseReport(cycle, diags)


def merge_report(outcome: JobOutcome | None, default_path: str) -> MergeReport | None:
    if outcome is None or outcome.state not in (SUCCEEDED, FAILED):
        return None
    if outcome.state == FAILED:
        return MergeReport(failed=True, message=outcome.message, reason=(outcome.report or {}).get("reason"))
    # the path inside the run's storage as pods see it (a node may report its own local path)
    return MergeReport(done=True, path=default_path)


def blocked(snap: Snapshot) -> tuple[str, str] | None:
    """What the run waits on (reason, message): objects the spec names that do not exist yet. Transient:
    the run continues once they are created, never fails for them."""
    problems = []
    if snap.claim_missing:
        problems.append((R_CLAIM_NOT_FOUND,
                         f"storage.claimName: PersistentVolumeClaim {snap.claim_missing!r} not found"))
    if snap.priority_class_missing:
        problems.append((R_PRIORITY_CLASS_NOT_FOUND,
                         f"trainer.priorityClassName: PriorityClass {snap.priority_class_missing!r} not found"))
    return (problems[0][0], "; ".join(m for _, m in problems)) if problems else None


def hub_invalid_input(status: RunStatus, snap: Snapshot, run) -> str | None:
    """The current OPD hub refused its input (`copd hub` exits 2 with an InvalidInput report): the message.
    Its pod restarts (restartPolicy Always) but cannot get further, so the run fails instead of crash-looping."""
    if status.phase != Phase.RUNNING or status.stage != Stage.OPD:
        return None
    pod = snap.pod(naming.hub_name(run, status.cycle))
    for cs in ((pod or {}).get("status") or {}).get("containerStatuses") or []:
        for st in (cs.get("state") or {}, cs.get("lastState") or {}):
            term = st.get("terminated") or {}
            rep = parse_report(term.get("message"))
            if term.get("exitCode") == EXIT_BAD_INPUT and rep and rep.get("reason") == R_INVALID_INPUT:
                return f"hub (cycle {status.cycle}): {rep.get('message') or 'invalid input'}"
    return None


def attempt_of(status: RunStatus, branch: str) -> int:
    """The stage attempt of a branch whose Job counts now (spec.failurePolicy: replacements get new Jobs)."""
    b = status.branches.get(branch)
    return b.attempt if b is not None else 0


def observe(spec: CoPDRunSpec, status: RunStatus, snap: Snapshot) -> Observed:
    run = naming.RunKey.of(snap.run)
    branches: dict[str, BranchReport] = {}
    if status.phase == Phase.RUNNING and status.stage in (Stage.RL, Stage.OPD):
        for b in spec.branches:
            job = naming.stage_job_name(run, b.name, status.cycle, status.stage.value, attempt_of(status, b.name))
            rep = branch_report(spec, status.cycle, status.stage,
                                job_outcome(snap.jobs.get(job), snap.pods_of_job(job)),
                                steps=steps_of(spec, status.stage, status, b.name))
            if rep is not None:
                branches[b.name] = rep
    diag = None
    if status.cycle:
        job = naming.diagnose_job_name(run, status.cycle, status.diagnose_attempt or 0)
        diag = diagnose_report(status.cycle, job_outcome(snap.jobs.get(job), snap.pods_of_job(job)))
    merge = None
    if status.phase == Phase.MERGING:
        job = naming.merge_job_name(run, status.merge_attempt or 0)
        merge = merge_report(job_outcome(snap.jobs.get(job), snap.pods_of_job(job)), merged_path(spec))
    return Observed(branches=branches, diagnose=diag, merge=merge, blocked=blocked(snap),
                    invalid_input=hub_invalid_input(status, snap, run))


def live_progress(progress: dict | None, cycle: int, stage: str | None) -> BranchProgress | None:
    """A trainer's `status.progress` when it is about (cycle, stage); None for another stage's or a malformed one."""
    if not progress or not stage:
        return None
    try:
        p = BranchProgress.model_validate(progress)
    except ValidationError:
        return None
    return p if (p.cycle, p.stage) == (cycle, stage) else None


def branch_cr_status(status: RunStatus, name: str, steps: int, outcome: JobOutcome | None, job: str | None,
                     generation: int, progress: dict | None = None) -> dict[str, Any]:
    """The Branch object's status: the run's view of the branch plus its trainer Job's state, with the
    trainer's live `progress` (the Branch's own, as read) folded into step and reward. The result has no
    `progress`: that key belongs to the trainer, and the writer (plan.py) leaves it as it is."""
    b = status.branches.get(name)
    step, reward = (b.step, b.reward) if b else (0, None)
    live = live_progress(progress, b.cycle, b.stage) if b else None
    if live is not None:
        step = max(step, min(live.step, steps) if steps else live.step)
        if not b.done and live.reward is not None:
            reward = live.reward  # the stage's mean replaces it when the stage reports
    if status.phase in TERMINAL:
        phase = status.phase.value
    elif status.phase == Phase.SUSPENDED:
        phase = SUSPENDED
    elif b is not None and b.done or status.stage == Stage.DIAGNOSE or status.phase == Phase.MERGING:
        phase = "Waiting"
    elif outcome is not None and outcome.state in (RUNNING, FAILED, SUCCEEDED):
        phase = RUNNING if outcome.state == SUCCEEDED else outcome.state
    else:
        phase = PENDING
    out = BranchCRStatus(
        phase=phase, cycle=b.cycle if b else 0, stage=b.stage if b else None, step=step,
        steps=steps, reward=reward, done=b.done if b else False,
        message=(b.message if b else "") or (outcome.message if outcome and outcome.state == FAILED else ""),
        job=job, observed_generation=generation,
    )
    return out.to_k8s()
