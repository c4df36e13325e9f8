"""Pure: which finished Jobs may go, once what they reported is in the run's persisted status.

A stage/diagnose/merge Job reports through its pod's termination message (observe.py). The
reconcile folds each report into the CoPDRun's status (and the Branch's) in the same pass that
reads it; once the run's status has moved past a Job, nothing will read that Job again. Such a
finished Job gets `ttlSecondsAfterFinished` (kube-controller-manager's TTL controller then deletes
it and, by propagation, its pods), so terminated pods do not pile up towards the pod GC threshold
(`--terminated-pod-gc-threshold`, 12,500 by default), past which pod GC could delete a pod whose
report has not been read yet. The Jobs observe() still reads (the current stage's, the current
cycle's diagnose, the merge) are never touched, whatever their state: a suspended or blocked run
reads them again once it goes on.

The TTL is set here, after the status write, never at creation: a Job cannot vanish before the
operator has read and persisted its report, however long the operator was away.
"""

from __future__ import annotations

from copd_core.cycle import TERMINAL, RunStatus, Stage
from copd_operator.logic.naming import RunIdentity, diagnose_job_name, merge_job_name, stage_job_name
from copd_operator.logic.observe import FAILED, SUCCEEDED, Snapshot, attempt_of, job_outcome
from copd_operator.logic.plan import Patch


def jobs_still_read(run: RunIdentity, branches: list[str], status: RunStatus) -> set[str]:
    """Names of the Jobs whose reports a reconcile of a run with this status may still need."""
    if status.phase in TERMINAL:
        return set()
    names = {merge_job_name(run)}
    if status.cycle:
        names.add(diagnose_job_name(run, status.cycle))
    if status.stage in (Stage.RL, Stage.OPD):
        names |= {stage_job_name(run, b, status.cycle, status.stage.value, attempt_of(status, b)) for b in branches}
    return names


def finished_job_cleanup(run: RunIdentity, branches: list[str], status: RunStatus, snap: Snapshot,
                         ttl_s: int) -> list[Patch]:
    """A `ttlSecondsAfterFinished` patch for every finished Job of the run that nothing reads any more.
    `status` must be the one already written (persisted), not a decision still to write."""
    keep = jobs_still_read(run, branches, status)
    ops = []
    for name, job in sorted(snap.jobs.items()):
        if name in keep or (job.get("spec") or {}).get("ttlSecondsAfterFinished") is not None:
            continue
        o = job_outcome(job, [])
        if o is not None and o.state in (SUCCEEDED, FAILED):
            ops.append(Patch("Job", name, {"spec": {"ttlSecondsAfterFinished": ttl_s}}))
    return ops
