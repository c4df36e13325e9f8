"""CoPDRuns queued by Kueue on the real control plane (scripts/cluster.sh runs the Kueue manager).

Pods are KWOK's (they run for the annotation kwok.copd.io/duration, set through spec.trainer.podAnnotations).
All of it runs in the default suite (about 4-5 min): a missing LocalQueue shows a condition and the run
waits, then runs once the queue exists (one gang-admitted run); four runs sharing 8 GPUs; preemption by a
higher-priority run; a Kueue restart mid-run. COPD_KUEUE_FULL=0 skips the last three for a quick local loop;
`make test-kueue` runs only this file.
"""

from __future__ import annotations

import os
import signal
import statistics
import threading
import time

import pytest

from tests.cluster.support import (
    GPU_NODE_SELECTOR,
    KWOK_TOLERATION,
    Api,
    Operator,
    apply_crds,
    apply_doc,
    example,
    report,
    wait_for,
)

FULL = os.environ.get("COPD_KUEUE_FULL", "1") != "0"
full_only = pytest.mark.skipif(not FULL, reason="long Kueue scenario skipped (COPD_KUEUE_FULL=0)")
K = ("kueue.x-k8s.io", "v1beta2")


# ---------------------------------------------------------------------------
# helpers


def queue_objects(cluster, namespace: str, gpus: int) -> str:
    """A ResourceFlavor, a ClusterQueue of `gpus` GPUs that only this namespace uses (preemption of lower
    priorities inside it), and the LocalQueue `gpus` in the namespace. Returns the ClusterQueue's name."""
    cq = f"cq-{namespace}"[:63]
    cluster.kubectl("apply", "--server-side", "-f", "-", input=f"""
apiVersion: kueue.x-k8s.io/v1beta2
kind: ResourceFlavor
metadata: {{name: copd-gpu}}
---
apiVersion: kueue.x-k8s.io/v1beta2
kind: ClusterQueue
metadata: {{name: {cq}}}
spec:
  namespaceSelector:
    matchLabels: {{kubernetes.io/metadata.name: {namespace}}}
  preemption: {{withinClusterQueue: LowerPriority}}
  resourceGroups:
  - coveredResources: [cpu, memory, nvidia.com/gpu]
    flavors:
    - name: copd-gpu
      resources:
      - {{name: cpu, nominalQuota: "1000"}}
      - {{name: memory, nominalQuota: 10Ti}}
      - {{name: nvidia.com/gpu, nominalQuota: {gpus}}}
---
apiVersion: kueue.x-k8s.io/v1beta2
kind: WorkloadPriorityClass
metadata: {{name: copd-low}}
value: 10
---
apiVersion: kueue.x-k8s.io/v1beta2
kind: WorkloadPriorityClass
metadata: {{name: copd-high}}
value: 1000
""")
    local_queue(cluster, namespace, "gpus", cq)
    return cq


def local_queue(cluster, namespace: str, name: str, cq: str) -> None:
    cluster.kubectl("apply", "--server-side", "-n", namespace, "-f", "-", input=f"""
apiVersion: kueue.x-k8s.io/v1beta2
kind: LocalQueue
metadata: {{name: {name}}}
spec: {{clusterQueue: {cq}}}
""")


def queued_run(name: str, queue: str, duration: str = "2s", priority: str | None = None, cycles: int = 1,
               gpus: int = 2) -> dict:
    doc = example(tolerations=[KWOK_TOLERATION], nodeSelector=GPU_NODE_SELECTOR,
                  resources={"gpu": gpus, "cpu": "2", "memory": "4Gi"},
                  hubResources={"gpu": 1, "cpu": "1", "memory": "4Gi"},
                  podAnnotations={"kwok.copd.io/duration": duration},
                  podLabels={"cost-centre": "copd-tests"})
    doc["metadata"]["name"] = name
    doc["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": queue}
    if priority:
        doc["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] = priority
    doc["spec"]["schedule"]["cycles"] = cycles
    doc["spec"]["mergeReadiness"]["minCycles"] = cycles
    return doc


def workloads(api: Api, ns: str) -> list[dict]:
    return api.custom.list_namespaced_custom_object(*K, ns, "workloads")["items"]


def cond(obj: dict, type_: str) -> dict | None:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == type_), None)


def is_true(obj: dict, type_: str) -> bool:
    c = cond(obj, type_)
    return c is not None and c["status"] == "True"


def admitted(wl: dict) -> bool:
    return is_true(wl, "Admitted") and is_true(wl, "QuotaReserved") and not is_true(wl, "Evicted") \
        and not is_true(wl, "Finished")


def gpus_of(pod) -> int:
    return sum(int((c.resources.limits or {}).get("nvidia.com/gpu", 0)) for c in pod.spec.containers)


def stage_key(labels: dict) -> tuple[str, str, str] | None:
    """(run, cycle, stage) of a trainer or hub pod / a Workload."""
    comp = labels.get("copd.io/component")
    if comp in ("trainer", "workload"):
        return labels["copd.io/run"], labels.get("copd.io/cycle", "0"), labels.get("copd.io/stage", "")
    if comp == "hub":
        return labels["copd.io/run"], labels.get("copd.io/cycle", "0"), "OPD"
    if comp == "diagnose":
        return labels["copd.io/run"], labels.get("copd.io/cycle", "0"), "Diagnose"
    if comp == "merge":
        return labels["copd.io/run"], "*", "Merge"
    return None


class Sampler(threading.Thread):
    """Polls pods and Workloads: GPUs held by running pods, running pods of stages Kueue has not admitted,
    and per stage the first moment its Workload was admitted and the first moment all its pods ran."""

    def __init__(self, api: Api, ns: str, branches: int = 3):
        super().__init__(daemon=True)
        self.api, self.ns, self.branches = api, ns, branches
        self.stop = threading.Event()
        self.samples = 0
        self.max_gpus = 0
        self.violations: list[str] = []
        self.created_at: dict[tuple, float] = {}  # first seen: the stage is ready (its Jobs exist, suspended)
        self.admitted_at: dict[tuple, float] = {}
        self.all_running_at: dict[tuple, float] = {}
        self.errors: list[str] = []

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.sample()
            except Exception as e:  # noqa: BLE001 - a flaky read is not a finding; keep sampling
                self.errors.append(repr(e))
            self.stop.wait(0.3)

    def sample(self) -> None:
        wls = workloads(self.api, self.ns)
        pods = self.api.pods(self.ns)
        now = time.monotonic()
        reserved = set()  # stages whose quota Kueue holds (admitted, or evicted and not yet released)
        for wl in wls:
            k = stage_key(wl["metadata"].get("labels") or {})
            if k is None:
                continue
            self.created_at.setdefault(k, now)
            if is_true(wl, "QuotaReserved") and not is_true(wl, "Finished"):
                reserved.add(k)
            if admitted(wl):
                self.admitted_at.setdefault(k, now)
        running = [p for p in pods if p.status.phase == "Running" and not p.metadata.deletion_timestamp]
        gpus = sum(gpus_of(p) for p in running)
        self.max_gpus = max(self.max_gpus, gpus)
        self.samples += 1
        per_stage: dict[tuple, int] = {}
        for p in running:
            k = stage_key(p.metadata.labels or {})
            if k is None:
                continue
            per_stage[k] = per_stage.get(k, 0) + 1
            if k not in reserved and gpus_of(p) > 0:
                self.violations.append(f"{p.metadata.name} runs but Kueue holds no quota for its stage {k}")
        for k, n in per_stage.items():
            want = self.branches + (1 if k[2] == "OPD" else 0)
            if k[2] in ("RL", "OPD") and n >= want:
                self.all_running_at.setdefault(k, now)

    def latencies(self) -> list[float]:
        """Admission -> all of the stage's pods running (Kueue's admission to pods: the operator and KWOK)."""
        return [self.all_running_at[k] - self.admitted_at[k] for k in self.all_running_at if k in self.admitted_at]

    def ready_to_running(self) -> list[float]:
        """Stage ready (its Workload appeared) -> all its pods running: includes the wait for quota."""
        return [self.all_running_at[k] - self.created_at[k] for k in self.all_running_at if k in self.created_at]


@pytest.fixture
def kueue_queue(cluster, namespace):
    cq = queue_objects(cluster, namespace, gpus=8)
    yield cq
    cluster.kubectl("delete", "clusterqueue", cq, "--wait=false", check=False)


# ---------------------------------------------------------------------------
# default suite


@pytest.mark.cluster
def test_missing_queue_waits_then_runs_gang_admitted(cluster, namespace, tmp_path):
    """A run whose LocalQueue does not exist shows Queued/LocalQueueNotFound and starts no pod, without
    failing; once the queue exists the run's stages are admitted one by one and it succeeds."""
    apply_crds(cluster)
    api = Api(cluster)
    cq = queue_objects(cluster, namespace, gpus=8)
    op = Operator(cluster, namespace, tmp_path).start()
    try:
        apply_doc(cluster, namespace, queued_run("lost", "no-such-queue"))

        def waiting():
            st = api.run(namespace, "lost").get("status") or {}
            return (st.get("queue") or {}).get("state") == "QueueNotFound" and st
        st = wait_for(waiting, 90, "status.queue.state QueueNotFound")
        c = next(c for c in st["conditions"] if c["type"] == "Queued")
        assert c["status"] == "True" and c["reason"] == "LocalQueueNotFound" and "no-such-queue" in c["message"]
        assert next(c for c in st["conditions"] if c["type"] == "Admitted")["status"] == "False"
        # it waits: the Workload exists, nothing runs, the run has not failed, the printer columns say so
        wait_for(lambda: workloads(api, namespace), 30, "the first stage's Workload")
        t_end = time.monotonic() + 8
        while time.monotonic() < t_end:
            assert not api.pods(namespace), "a pod started although the run's queue does not exist"
            assert api.run(namespace, "lost")["status"]["phase"] in ("Pending", "Running")
            time.sleep(0.5)
        assert all(j.spec.suspend for j in api.jobs(namespace)), "a Job of an unadmitted stage is not suspended"
        table = cluster.kubectl("get", "copdrun", "lost", "-n", namespace).stdout
        assert "QueueNotFound" in table and "no-such-queue" in table, table
        assert "ReconcileError" not in str(api.run(namespace, "lost")["status"]["conditions"])

        # the queue appears: Kueue admits each stage as a whole; the run succeeds
        sampler = Sampler(api, namespace)
        sampler.start()
        local_queue(cluster, namespace, "no-such-queue", cq)
        wait_for(lambda: (api.run(namespace, "lost").get("status") or {}).get("phase") == "Succeeded", 300,
                 "the run to succeed once its queue exists", interval=1)
        sampler.stop.set()
        sampler.join(10)
        assert not sampler.violations, sampler.violations[:5]
        assert sampler.max_gpus <= 8
        st = api.run(namespace, "lost")["status"]
        assert st["restarts"] == 0
        assert st["queue"]["state"] == "Idle"
        wls = workloads(api, namespace)
        assert {w["metadata"]["labels"]["copd.io/stage"] for w in wls} == {"RL", "OPD", "Diagnose", "Merge"}
        assert all(is_true(w, "Finished") for w in wls), "a stage's Workload still holds quota after the run"
        opd = next(w for w in wls if w["metadata"]["labels"]["copd.io/stage"] == "OPD")
        assert [p["name"] for p in opd["spec"]["podSets"]] == ["arith", "reverse", "maxbox", "copd-hub"]
        assert opd["spec"]["podSets"][0]["template"]["spec"]["containers"][0]["resources"]["requests"][
            "nvidia.com/gpu"] == "2"
        # podLabels / podAnnotations reached every pod (the operator's own labels too)
        for p in api.pods(namespace):
            assert p.metadata.labels.get("cost-centre") == "copd-tests", p.metadata.name
            assert p.metadata.labels["copd.io/run"] == "lost"
            assert (p.metadata.annotations or {}).get("kwok.copd.io/duration") == "2s"
    finally:
        op.stop()
        cluster.kubectl("delete", "clusterqueue", cq, "--wait=false", check=False)


# ---------------------------------------------------------------------------
# the long scenarios (COPD_KUEUE_FULL=0 skips them)


@pytest.mark.cluster
@full_only
def test_four_runs_share_eight_gpus(cluster, namespace, tmp_path, kueue_queue):
    """Four runs of 3 branches x 2 GPUs applied at once to a ClusterQueue of 8 GPUs: running pods never hold
    more than 8 GPUs, no stage runs without Kueue's admission, all four succeed. Reports the latency from
    a stage's admission to all of its pods running."""
    apply_crds(cluster)
    api = Api(cluster)
    op = Operator(cluster, namespace, tmp_path).start()
    sampler = Sampler(api, namespace)
    sampler.start()
    try:
        names = [f"run-{i}" for i in range(4)]
        t0 = time.monotonic()
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input="\n---\n".join(
            __import__("yaml").safe_dump(queued_run(n, "gpus", duration="4s")) for n in names))

        def phases():
            return {n: (api.run(namespace, n).get("status") or {}).get("phase") for n in names}
        seen_waiting = set()

        def done():
            for n in names:
                st = api.run(namespace, n).get("status") or {}
                if (st.get("queue") or {}).get("state") == "Queued":
                    seen_waiting.add(n)
            return all(v == "Succeeded" for v in phases().values())
        wait_for(done, 900, "four queued runs to succeed", interval=1)
        total_s = time.monotonic() - t0
    finally:
        sampler.stop.set()
        sampler.join(10)
        op.stop()
    assert sampler.samples > 20, "too few samples to say anything"
    assert sampler.max_gpus <= 8, f"running pods held {sampler.max_gpus} GPUs (quota 8)"
    assert not sampler.violations, sampler.violations[:5]
    assert seen_waiting, "no run was ever seen waiting for quota"
    for n in names:
        assert api.run(namespace, n)["status"]["restarts"] == 0
    lat = sampler.latencies()
    assert len(lat) >= 8, f"admission latency measured for only {len(lat)} stages"
    ready = sampler.ready_to_running()
    report("kueue_four_runs", runs=4, total_s=round(total_s, 1), max_gpus_running=sampler.max_gpus,
           samples=sampler.samples, stages_measured=len(lat),
           admitted_to_all_running_p50_s=round(statistics.median(lat), 2),
           admitted_to_all_running_max_s=round(max(lat), 2),
           ready_to_all_running_min_s=round(min(ready), 2),
           ready_to_all_running_p50_s=round(statistics.median(ready), 2),
           ready_to_all_running_max_s=round(max(ready), 2))


@pytest.mark.cluster
@full_only
def test_higher_priority_run_preempts_lower_which_resumes(cluster, namespace, tmp_path, kueue_queue):
    """A high-priority run preempts a running low-priority one; the low run's stage is suspended (not failed),
    goes back to the queue, resumes in the same Jobs and the run succeeds with no restart spent."""
    apply_crds(cluster)
    api = Api(cluster)
    op = Operator(cluster, namespace, tmp_path).start()
    try:
        apply_doc(cluster, namespace, queued_run("low", "gpus", duration="25s", priority="copd-low"))
        wait_for(lambda: len([p for p in api.pods(namespace) if p.status.phase == "Running"]) == 3, 120,
                 "the low run's 3 RL pods running")
        low_jobs = {j.metadata.name for j in api.jobs(namespace)}
        apply_doc(cluster, namespace, queued_run("high", "gpus", duration="3s", priority="copd-high"))

        def low_evicted():
            st = api.run(namespace, "low").get("status") or {}
            return (st.get("queue") or {}).get("state") == "Queued" and st
        st = wait_for(low_evicted, 120, "the low run to be evicted back to the queue")
        assert next(c for c in st["conditions"] if c["type"] == "Queued")["reason"] == "Evicted"
        wait_for(lambda: all(j.spec.suspend for j in api.jobs(namespace) if j.metadata.name in low_jobs), 60,
                 "the low run's Jobs suspended")
        wl = next(w for w in workloads(api, namespace) if w["metadata"]["labels"]["copd.io/run"] == "low")
        wait_for(lambda: any(is_true(w, "Requeued") and not is_true(w, "QuotaReserved")
                             for w in workloads(api, namespace) if w["metadata"]["name"] == wl["metadata"]["name"]),
                 60, "the low run's Workload requeued without quota")
        assert api.run(namespace, "low")["status"]["phase"] == "Running"
        wait_for(lambda: (api.run(namespace, "high").get("status") or {}).get("phase") == "Succeeded", 400,
                 "the high run to succeed", interval=1)
        wait_for(lambda: (api.run(namespace, "low").get("status") or {}).get("phase") == "Succeeded", 600,
                 "the low run to resume and succeed", interval=1)
        st = api.run(namespace, "low")["status"]
        assert st["restarts"] == 0, "a preemption was counted against the restart budget"
        assert all(b.get("attempt", 0) == 0 for b in st["branches"].values())
        events = api.core.list_namespaced_event(namespace, field_selector="involvedObject.name=low").items
        assert any(e.reason == "Evicted" for e in events)
        # the preempted stage resumed in the same Jobs (the trainer's resume-from-checkpoint path), none failed
        jobs = {j.metadata.name: j for j in api.jobs(namespace)}
        for name in low_jobs:
            assert name in jobs
            assert not any(c.type == "Failed" and c.status == "True" for c in jobs[name].status.conditions or [])
    finally:
        op.stop()


@pytest.mark.cluster
@full_only
def test_kueue_restarted_mid_run(cluster, namespace, tmp_path, kueue_queue):
    """The Kueue manager is killed while two runs are queued/running and started again: both succeed."""
    apply_crds(cluster)
    api = Api(cluster)
    op = Operator(cluster, namespace, tmp_path).start()
    try:
        for n in ("a", "b"):
            apply_doc(cluster, namespace, queued_run(n, "gpus", duration="5s"))
        wait_for(lambda: any(admitted(w) for w in workloads(api, namespace)), 120, "a stage admitted")
        pid_file = cluster.dir / "pids" / "kueue.pid"
        pid = int(pid_file.read_text())
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not os.path.exists(f"/proc/{pid}") or "kueue" not in open(f"/proc/{pid}/cmdline").read(),
                 30, "Kueue to exit")
        cluster.run(str(cluster.root / "scripts/cluster.sh"), "up", timeout=600)
        wait_for(lambda: all((api.run(namespace, n).get("status") or {}).get("phase") == "Succeeded"
                             for n in ("a", "b")), 600, "both runs to succeed after Kueue's restart", interval=1)
        for n in ("a", "b"):
            assert api.run(namespace, n)["status"]["restarts"] == 0
    finally:
        op.stop()



@pytest.mark.cluster
def test_pod_labels_and_annotations_are_checked_at_admission(cluster, namespace):
    """The CRD's CEL rules refuse operator-owned or malformed pod label/annotation keys, as pydantic does."""
    import yaml

    apply_crds(cluster)
    cases = [
        ("podLabels", {"copd.io/run": "x"}, "reserved"),
        ("podLabels", {"kueue.x-k8s.io/queue-name": "q"}, "reserved"),
        ("podAnnotations", {"batch.kubernetes.io/job-name": "x"}, "reserved"),
        ("podLabels", {"job-name": "x"}, "reserved"),
        ("podLabels", {"bad key!": "x"}, "valid label key"),
        ("podLabels", {"team": "not valid!"}, "valid label value"),
        ("podAnnotations", {"a" * 64: "x"}, "valid annotation key"),
    ]
    failures = []
    for field, value, needle in cases:
        doc = queued_run("bad", "gpus")
        doc["spec"]["trainer"][field] = value
        p = cluster.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-", input=yaml.safe_dump(doc),
                            check=False)
        if p.returncode == 0 or needle not in p.stderr:
            failures.append(f"{field}={value}: rc={p.returncode} {p.stderr.strip()[:300]}")
    ok = queued_run("good", "gpus")
    ok["spec"]["trainer"]["podLabels"] = {"example.com/team": "ml", "cost-centre": "42"}
    ok["spec"]["trainer"]["podAnnotations"] = {"sidecar.istio.io/inject": "false", "kwok.copd.io/duration": "1s"}
    p = cluster.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-", input=yaml.safe_dump(ok),
                        check=False)
    assert p.returncode == 0, p.stderr
    assert not failures, "\n".join(failures)
