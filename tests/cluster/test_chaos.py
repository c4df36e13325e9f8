"""More faults on the real control plane, each ending in `FAULT <name>: recovered in X s, lost <what>`.

Fast ones (KWOK, a minute or so) run in the default suite: a status-write conflict storm from another
writer, a ResourceQuota refusing the run's Jobs. The rest are marked `chaos` (`make chaos`; excluded from
`make test` by pyproject's addopts) because they train for real on the process node or restart the
apiserver: a trainer pod deleted mid-RL, the kube-apiserver restarted mid-run, the newest checkpoint
corrupted, the schedule edited mid-stage. Storage full is tests/model/test_checkpoint_faults.py (a real
tmpfs filling up under `copd stage`) and tests/unit/runtime/test_checkpoint.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
from kubernetes.client.rest import ApiException

from tests import ROOT
from tests.cluster.support import Api, Operator, apply_crds, apply_doc, wait_for
from tests.cluster.test_faults import (
    cond,
    fault,
    kwok_run,
    proc_operator,
    proc_run,
    running_pod,
    status,
    wait_end,
)

GROUP, VERSION, PLURAL = "copd.io", "v1alpha1", "copdruns"


def trainer_of(branch: str, stage: str = "RL"):
    def pred(p):
        lab = p.metadata.labels or {}
        return (lab.get("copd.io/component") == "trainer" and lab.get("copd.io/branch") == branch
                and lab.get("copd.io/stage") == stage)
    return pred


def checkpoints_dir(cluster, api: Api, ns: str, run: str, branch: str) -> Path | None:
    claims = api.core.list_namespaced_persistent_volume_claim(ns, label_selector=f"copd.io/run={run}").items
    if not claims:
        return None
    return cluster.procnode_workdir / "pvc" / ns / claims[0].metadata.name / "branches" / branch / "checkpoints"


def checkpoints(d: Path | None) -> list[Path]:
    """Complete checkpoints (renamed into place), oldest first by step."""
    if d is None or not d.exists():
        return []
    return sorted((p for p in d.glob("c*-*-s*") if (p / "state.json").exists()), key=lambda p: p.name)


def final_report(api: Api, ns: str, pred) -> dict:
    """The report (termination message) of the pod of `pred` that ended with exit code 0."""
    for p in api.pods(ns):
        if not pred(p):
            continue
        for cs in p.status.container_statuses or []:
            t = cs.state and cs.state.terminated
            if t and t.exit_code == 0 and t.message:
                return json.loads(t.message.strip().splitlines()[-1])
    return {}


def never_wedged(st: dict) -> None:
    rec = cond(st, "ReconcileError")
    assert rec.get("status") != "True", rec


# ---------------------------------------------------------------------------- default suite (KWOK)


@pytest.mark.cluster
def test_status_write_conflict_storm_from_another_writer(cluster, namespace, tmp_path):
    """Another client patches the run's metadata as fast as it can (each write bumps the resourceVersion the
    operator's status PUT carries) and once adds its own status condition: the run still Succeeds, the
    foreign condition and every annotation survive, no ReconcileError."""
    apply_crds(cluster)
    api = Api(cluster)
    op = Operator(cluster, namespace, tmp_path).start()
    stop, counts, errors = threading.Event(), {"metadata": 0, "status": 0}, []

    def storm():
        other = Api(cluster)
        i = 0
        while not stop.is_set():
            i += 1
            try:
                other.custom.patch_namespaced_custom_object(
                    GROUP, VERSION, namespace, PLURAL, "storm",
                    {"metadata": {"annotations": {"chaos.example/n": str(i)}, "labels": {"chaos": str(i % 7)}}})
                counts["metadata"] += 1
                if i >= 20 and not counts["status"]:  # its own condition, added with optimistic locking
                    run = other.run(namespace, "storm")
                    conds = (run.get("status") or {}).get("conditions") or []
                    mine = {"type": "AuditedByOther", "status": "True", "reason": "Chaos", "message": "x",
                            "lastTransitionTime": "2026-01-01T00:00:00Z"}
                    try:
                        other.custom.patch_namespaced_custom_object_status(
                            GROUP, VERSION, namespace, PLURAL, "storm",
                            {"metadata": {"resourceVersion": run["metadata"]["resourceVersion"]},
                             "status": {"conditions": [*conds, mine]}})
                        counts["status"] += 1
                    except ApiException as e:
                        if e.status != 409:
                            raise  # a 409: the operator wrote first; try again next round
            except Exception as e:  # noqa: BLE001 - counted, asserted below
                errors.append(repr(e)[:300])

    try:
        doc = kwok_run("storm")
        doc["spec"]["schedule"]["cycles"] = 2
        doc["spec"]["mergeReadiness"]["minCycles"] = 2
        t = apply_doc(cluster, namespace, doc)
        wait_for(lambda: status(api, namespace, "storm").get("phase") == "Running", 60, "the run to start",
                 interval=0.2)
        th = threading.Thread(target=storm, daemon=True)
        th.start()
        try:
            st = wait_end(api, namespace, "storm", 300, op)
        finally:
            stop.set()
            th.join(30)
        took = time.monotonic() - t
        assert st["phase"] == "Succeeded", (st, op.tail())
        never_wedged(st)
        assert counts["metadata"] >= 50 and counts["status"] == 1, (counts, errors[:3])
        assert not errors, errors[:3]
        assert cond(st, "AuditedByOther").get("reason") == "Chaos", st["conditions"]  # the other writer's
        md = api.run(namespace, "storm")["metadata"]
        assert md["annotations"]["chaos.example/n"] == str(counts["metadata"])
        rate = counts["metadata"] / took
        fault("status-conflict-storm", took,
              f"nothing ({counts['metadata']} foreign metadata writes at {rate:.0f}/s + 1 status write; "
              f"run Succeeded, foreign condition kept)")
    finally:
        stop.set()
        op.stop()


@pytest.mark.cluster
def test_quota_refusing_jobs_waits_then_continues(cluster, namespace, tmp_path):
    """A ResourceQuota count/jobs.batch: 0 refuses every Job (403): the run waits with condition
    ReconcileError/QuotaExceeded naming the quota; raised, the run goes on and Succeeds."""
    apply_crds(cluster)
    api = Api(cluster)
    quota = {"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "jobs"},
             "spec": {"hard": {"count/jobs.batch": "0"}}}
    apply_doc(cluster, namespace, quota)
    wait_for(lambda: (api.core.read_namespaced_resource_quota("jobs", namespace).status.hard or {})
             .get("count/jobs.batch") == "0", 60, "the quota's status", interval=0.3)
    op = Operator(cluster, namespace, tmp_path).start()
    try:
        apply_doc(cluster, namespace, kwok_run("quota"))
        st = wait_for(lambda: cond(s := status(api, namespace, "quota"), "ReconcileError").get("status") == "True"
                      and s, 90, "condition ReconcileError", interval=0.5)
        c = cond(st, "ReconcileError")
        assert c["reason"] == "QuotaExceeded" and "exceeded quota: jobs" in c["message"], c
        assert st["phase"] == "Running" and not api.jobs(namespace)
        events = api.core.list_namespaced_event(namespace, field_selector="reason=QuotaExceeded").items
        assert events and "exceeded quota" in events[0].message
        quota["spec"]["hard"]["count/jobs.batch"] = "100"
        t = apply_doc(cluster, namespace, quota)
        wait_for(lambda: api.jobs(namespace), 120, "the first Job after raising the quota", interval=0.5)
        recovered = time.monotonic() - t
        st = wait_end(api, namespace, "quota", 240, op)
        assert st["phase"] == "Succeeded", (st, op.tail())
        assert cond(st, "ReconcileError")["status"] == "False" and cond(st, "ReconcileError")["reason"] == "Reconciled"
        fault("quota-403-on-create", recovered, "nothing (waited with ReconcileError/QuotaExceeded, "
              "first Job created after the quota was raised)")
    finally:
        op.stop()


# ---------------------------------------------------------------------------- make chaos


@pytest.mark.cluster
@pytest.mark.chaos
def test_apiserver_restarted_mid_run(cluster, namespace, tmp_path):
    """scripts/cluster.sh restart kube-apiserver while the run is Running: the operator survives the
    refused connections and broken watches, carries on, and the run Succeeds."""
    apply_crds(cluster)
    api = Api(cluster)
    op = Operator(cluster, namespace, tmp_path).start()
    try:
        doc = kwok_run("apirestart")
        doc["spec"]["schedule"]["cycles"] = 2
        doc["spec"]["mergeReadiness"]["minCycles"] = 2
        apply_doc(cluster, namespace, doc)
        wait_for(lambda: status(api, namespace, "apirestart").get("phase") == "Running", 60, "the run to start",
                 interval=0.2)
        before = status(api, namespace, "apirestart")
        t = time.monotonic()
        p = subprocess.run(["bash", str(ROOT / "scripts/cluster.sh"), "restart", "kube-apiserver"], cwd=ROOT,
                           env=os.environ.copy(), capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        down_s = time.monotonic() - t
        api = Api(cluster)  # new connections

        def moved_on():
            s = status(api, namespace, "apirestart")
            return (s.get("phase"), s.get("cycle"), s.get("stage")) != \
                (before.get("phase"), before.get("cycle"), before.get("stage")) and s
        wait_for(moved_on, 180, "the run to move on after the restart", interval=0.5)
        recovered = time.monotonic() - t
        assert op.proc.poll() is None, op.tail()  # the operator did not die with its connections
        st = wait_end(api, namespace, "apirestart", 300, op)
        assert st["phase"] == "Succeeded", (st, op.tail())
        never_wedged(st)
        fault("apiserver-restart", recovered, f"nothing (apiserver away {down_s:.1f} s; the operator kept "
              f"running; the run Succeeded)")
    finally:
        op.stop()


@pytest.mark.cluster
@pytest.mark.chaos
@pytest.mark.slow
def test_trainer_pod_deleted_mid_rl(cluster, namespace, tmp_path):
    """`kubectl delete pod` of a trainer mid-RL (real training): the Job makes a new pod (one failure
    against backoffLimit, no restart of the run's budget used), which resumes from the newest checkpoint."""
    apply_crds(cluster)
    api = Api(cluster)
    op = proc_operator(cluster, namespace, tmp_path)
    try:
        doc = proc_run("podel", rl=8, opd=0)
        doc["spec"]["failurePolicy"] = {"maxRestarts": 1}
        apply_doc(cluster, namespace, doc)
        pod = wait_for(lambda: running_pod(api, namespace, trainer_of("arith")), 400, "the arith trainer running",
                       interval=0.5)
        wait_for(lambda: checkpoints(checkpoints_dir(cluster, api, namespace, "podel", "arith")), 400,
                 "a checkpoint of arith in RL", interval=0.3)
        t = time.monotonic()
        api.core.delete_namespaced_pod(pod.metadata.name, namespace)
        ck_at_delete = checkpoints(checkpoints_dir(cluster, api, namespace, "podel", "arith"))[-1].name
        wait_for(lambda: (p := running_pod(api, namespace, trainer_of("arith"))) and p.metadata.uid != pod.metadata.uid,
                 300, "a new arith trainer running", interval=0.5)
        recovered = time.monotonic() - t
        st = wait_end(api, namespace, "podel", 600, op)
        assert st["phase"] == "Succeeded", (st, op.tail())
        assert st.get("restarts", 0) == 0 and st["branches"]["arith"]["step"] == 8
        (job,) = [j for j in api.jobs(namespace) if (j.metadata.labels or {}).get("copd.io/branch") == "arith"]
        assert (job.status.failed or 0) == 1 and (job.status.succeeded or 0) == 1, job.status
        rep = final_report(api, namespace, trainer_of("arith"))
        assert rep.get("resumed_step", 0) >= 2 and rep["resumed_from"].startswith("c001-RL-s"), rep
        fault("trainer-pod-deleted-mid-rl", recovered,
              f"only the steps after {ck_at_delete} (resumed at step {rep['resumed_step']}); 1 Job pod failure "
              f"of backoffLimit 2, 0 of maxRestarts 1 used")
    finally:
        op.stop()


@pytest.mark.cluster
@pytest.mark.chaos
@pytest.mark.slow
def test_newest_checkpoint_corrupted_resumes_from_the_previous(cluster, namespace, tmp_path):
    """The trainer is killed and its newest checkpoint damaged on the volume before the Job's next pod
    starts: that pod moves the damaged one aside, resumes from the one before and reports which."""
    apply_crds(cluster)
    api = Api(cluster)
    op = proc_operator(cluster, namespace, tmp_path)
    try:
        apply_doc(cluster, namespace, proc_run("corrupt", rl=10, opd=0))
        pod = wait_for(lambda: running_pod(api, namespace, trainer_of("arith")), 400, "the arith trainer running",
                       interval=0.5)
        ckdir = wait_for(lambda: (d := checkpoints_dir(cluster, api, namespace, "corrupt", "arith"))
                         and len(checkpoints(d)) >= 2 and d, 400, "two checkpoints of arith in RL", interval=0.3)
        api.core.delete_namespaced_pod(pod.metadata.name, namespace, grace_period_seconds=0)

        def gone():
            try:
                p = api.core.read_namespaced_pod(pod.metadata.name, namespace)
            except Exception:  # noqa: BLE001 - 404: gone
                return True
            return p.status.phase in ("Failed", "Succeeded")
        wait_for(gone, 120, "the killed trainer gone", interval=0.1)
        cks = checkpoints(ckdir)
        newest, previous = cks[-1], cks[-2]
        weights = newest / "model.safetensors"
        b = bytearray(weights.read_bytes())
        b[len(b) // 2] ^= 0xFF
        weights.write_bytes(bytes(b))
        t = time.monotonic()
        wait_for(lambda: list(ckdir.glob(f".corrupt-{newest.name}-*")), 300, "the damaged checkpoint moved aside",
                 interval=0.3)
        recovered = time.monotonic() - t
        st = wait_end(api, namespace, "corrupt", 600, op)
        assert st["phase"] == "Succeeded", (st, op.tail())
        rep = final_report(api, namespace, trainer_of("arith"))
        assert rep["resumed_from"] == previous.name, (rep, previous.name)
        assert rep["skipped_checkpoints"] == [f"{newest.name}: model.safetensors does not match its SHA-256"]
        assert st["branches"]["arith"]["step"] == 10
        fault("newest-checkpoint-corrupted", recovered,
              f"checkpoint {newest.name} (moved aside, kept for inspection); resumed from {previous.name}")
    finally:
        op.stop()


@pytest.mark.cluster
@pytest.mark.chaos
@pytest.mark.slow
def test_schedule_edited_mid_stage(cluster, namespace, tmp_path):
    """spec.schedule.rlStepsPerCycle set to 0 while RL runs: the running Jobs finish the steps they started
    with, the run moves to the next stage the new schedule has and Succeeds; never a ReconcileError."""
    apply_crds(cluster)
    api = Api(cluster)
    op = proc_operator(cluster, namespace, tmp_path)
    try:
        apply_doc(cluster, namespace, proc_run("sched", rl=6, opd=2))
        wait_for(lambda: running_pod(api, namespace, trainer_of("arith")), 400, "the arith trainer running",
                 interval=0.5)
        assert status(api, namespace, "sched").get("stage") == "RL"
        api.custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "sched",
                                                  {"spec": {"schedule": {"rlStepsPerCycle": 0}}})
        t = time.monotonic()
        wait_for(lambda: status(api, namespace, "sched").get("stage") not in ("RL", None)
                 or status(api, namespace, "sched").get("phase") in ("Merging", "Succeeded", "Failed"),
                 600, "the stage after RL", interval=0.5)
        recovered = time.monotonic() - t
        st = wait_end(api, namespace, "sched", 600, op)
        assert st["phase"] == "Succeeded", (st, op.tail())
        never_wedged(st)
        for b in ("arith", "reverse"):  # the RL Jobs ran the steps they were started with
            rep = final_report(api, namespace, trainer_of(b, "RL"))
            assert rep.get("step") == 6 and rep.get("done"), (b, rep)
        fault("schedule-edit-mid-stage", recovered, "nothing (RL Jobs finished their 6 steps, then OPD; "
              "no ReconcileError)")
    finally:
        op.stop()


def fill_up(path: Path, leave: int) -> None:
    """Fill the file system of `path` (the trainer may be writing meanwhile), then give `leave` bytes back."""
    chunk = b"\0" * (1 << 16)
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError as e:
            if e.errno != 28:  # ENOSPC: full, as wanted
                raise
        f.truncate(max(0, f.tell() - leave))


def _mount_tmpfs(path: Path, size: str) -> bool:
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.mark.cluster
@pytest.mark.chaos
@pytest.mark.slow
def test_storage_full_while_checkpointing_on_the_claim(cluster, namespace, tmp_path):
    """The branch's checkpoint directory on the claim is a real tmpfs (the process node's volume) that fills
    up after the first checkpoint: the next write fails with the kernel's ENOSPC, the trainer reports
    StorageFull (exit 3: FailJob, no retries), the run goes Failed/StorageFull naming the intact previous
    checkpoint, which still verifies. Needs the right to mount (root); skipped where it is refused."""
    from copd_runtime.checkpoint import verify_checkpoint

    apply_crds(cluster)
    api = Api(cluster)
    op = proc_operator(cluster, namespace, tmp_path)
    mounted = None
    try:
        apply_doc(cluster, namespace, proc_run("full", rl=8, opd=0))
        ckdir = wait_for(lambda: (d := checkpoints_dir(cluster, api, namespace, "full", "arith"))
                         and d.parent.parent.parent.exists() and d, 120, "the claim's directory", interval=0.2)
        ckdir.mkdir(parents=True, exist_ok=True)
        if not _mount_tmpfs(ckdir, "64m"):
            pytest.skip("mounting a tmpfs is refused here; tests/model/test_checkpoint_faults.py covers it")
        mounted = ckdir
        first = wait_for(lambda: checkpoints(ckdir), 400, "arith's first checkpoint", interval=0.1)[0]
        size = sum(f.stat().st_size for f in first.rglob("*") if f.is_file())
        fill_up(ckdir / "filler", leave=size // 2)
        t = time.monotonic()
        st = wait_end(api, namespace, "full", 600, op)
        took = time.monotonic() - t
        failed = cond(st, "Failed")
        assert st["phase"] == "Failed" and failed["reason"] == "StorageFull", (st, op.tail())
        kept = checkpoints(ckdir)[-1]
        assert f"{kept.name} is intact" in failed["message"] and "no space left" in failed["message"], failed
        assert verify_checkpoint(kept) is None and not list(ckdir.glob(".tmp-*"))
        (job,) = [j for j in api.jobs(namespace) if (j.metadata.labels or {}).get("copd.io/branch") == "arith"]
        assert (job.status.failed or 0) == 1 and st.get("restarts", 0) == 0, job.status  # FailJob: no retries
        fault("storage-full", took, f"the steps after {kept.name}, which is intact (run Failed/StorageFull, "
              f"1 pod, no retries)")
    finally:
        op.stop()
        if mounted is not None:
            subprocess.run(["umount", "-l", str(mounted)], capture_output=True)
