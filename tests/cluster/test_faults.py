"""Faults on the real control plane: the run recovers, or stops with a clear reason, and loses nothing.

Each scenario prints one line `FAULT <name>: recovered in X s, lost <what>` (and records it with
support.report). KWOK GPU nodes complete pods without running them; the process node runs
`copd stage|hub|diagnose|merge` as real local processes (real, small training).
"""

from __future__ import annotations

import json
import time

import pytest
import yaml

from tests import ROOT
from tests.cluster.support import (
    GPU_NODE_SELECTOR,
    KWOK_TOLERATION,
    PY,
    Api,
    Operator,
    apply_crds,
    apply_doc,
    example,
    report,
    wait_for,
)

PROC_TOLERATION = {"key": "copd.io/process-node", "operator": "Exists", "effect": "NoSchedule"}
END = ("Succeeded", "Failed")


def fault(name: str, recovered_s: float, lost: str) -> None:
    print(f"FAULT {name}: recovered in {recovered_s:.1f} s, lost {lost}", flush=True)
    report(f"fault-{name}", recovered_s=round(recovered_s, 1), lost=lost)


def proc_run(name: str, rl: int = 2, opd: int = 2) -> dict:
    doc = example(tolerations=[PROC_TOLERATION], nodeSelector={"copd.io/process-node": "true"},
                  resources={"gpu": 1, "cpu": "1", "memory": "2Gi"})
    s = doc["spec"]
    doc["metadata"]["name"] = name
    s["branches"] = s["branches"][:2]
    s["schedule"] = {"cycles": 1, "rlStepsPerCycle": rl, "opdStepsPerCycle": opd}
    s["rl"].update(groupSize=4, batchSize=2, maxNewTokens=8)
    s["diagnostics"] = {"topK": 8, "probePrompts": 4}
    s["mergeReadiness"]["minCycles"] = 1
    return doc


def kwok_run(name: str) -> dict:
    doc = example(tolerations=[KWOK_TOLERATION], nodeSelector=GPU_NODE_SELECTOR)
    doc["spec"]["trainer"].pop("priorityClassName", None)
    doc["metadata"]["name"] = name
    doc["spec"]["schedule"] = {"cycles": 1, "rlStepsPerCycle": 2, "opdStepsPerCycle": 2}
    doc["spec"]["mergeReadiness"]["minCycles"] = 1
    return doc


def proc_operator(cluster, namespace, tmp_path) -> Operator:
    return Operator(cluster, namespace, tmp_path, "--hub-address", "pod-ip",
                    "--trainer-command", f"{PY} -m copd_runtime.cli").start()


def status(api: Api, ns: str, name: str) -> dict:
    return api.run(ns, name).get("status") or {}


def cond(st: dict, type_: str) -> dict:
    return next((c for c in st.get("conditions") or [] if c["type"] == type_), {})


def wait_end(api: Api, ns: str, name: str, timeout: float, op: Operator) -> dict:
    st = wait_for(lambda: (s := status(api, ns, name)).get("phase") in END and s, timeout, f"run {name} to end",
                  interval=1.0)
    return st


def running_pod(api: Api, ns: str, pred) -> object | None:
    return next((p for p in api.pods(ns) if pred(p) and p.status.phase == "Running"
                 and not p.metadata.deletion_timestamp), None)


# ---------------------------------------------------------------------------


@pytest.mark.cluster
@pytest.mark.slow
def test_trainer_evicted_three_times_does_not_fail_the_run(cluster, namespace, tmp_path):
    """Evictions (DisruptionTarget) are ignored by the Jobs' failure policy: with no restart budget at all
    (maxRestarts 0) and backoffLimit 2, three evictions of one branch's trainer still end in Succeeded."""
    from kubernetes import client

    apply_crds(cluster)
    api = Api(cluster)
    op = proc_operator(cluster, namespace, tmp_path)
    try:
        doc = proc_run("evict", rl=6, opd=0)
        doc["spec"]["failurePolicy"] = {"maxRestarts": 0}
        apply_doc(cluster, namespace, doc)

        def trainer(p):
            lab = p.metadata.labels or {}
            return lab.get("copd.io/component") == "trainer" and lab.get("copd.io/branch") == "arith"

        evicted, t_last = [], 0.0
        for _ in range(3):
            pod = wait_for(lambda: (p := running_pod(api, namespace, trainer)) and p.metadata.name not in evicted
                           and p, 240, "a running arith trainer pod", interval=0.5)
            time.sleep(3)  # let it load and train a little (an eviction mid-stage, not at start-up)
            api.core.create_namespaced_pod_eviction(
                pod.metadata.name, namespace,
                client.V1Eviction(metadata=client.V1ObjectMeta(name=pod.metadata.name, namespace=namespace)))
            evicted.append(pod.metadata.name)
            t_last = time.monotonic()
        wait_for(lambda: running_pod(api, namespace, trainer) is not None
                 or (status(api, namespace, "evict").get("branches") or {}).get("arith", {}).get("done"),
                 240, "the arith trainer back after the last eviction", interval=0.5)
        recovered = time.monotonic() - t_last
        st = wait_end(api, namespace, "evict", 600, op)
        assert st["phase"] == "Succeeded", (st, op.tail())
        jobs = [j for j in api.jobs(namespace) if (j.metadata.labels or {}).get("copd.io/branch") == "arith"]
        assert len(jobs) == 1, [j.metadata.name for j in jobs]  # no replacement attempt was needed
        assert st.get("restarts", 0) == 0 and st["branches"]["arith"]["step"] == 6
        fault("trainer-evicted-x3", recovered,
              f"0 checkpoints, {jobs[0].status.failed or 0} counted Job failures, 0 restarts used")
    finally:
        op.stop()


@pytest.mark.cluster
@pytest.mark.slow
def test_hub_deleted_mid_opd_is_recreated_and_the_run_succeeds(cluster, namespace, tmp_path):
    apply_crds(cluster)
    api = Api(cluster)
    op = proc_operator(cluster, namespace, tmp_path)
    try:
        apply_doc(cluster, namespace, proc_run("hubdel", rl=1, opd=4))

        def hub(p):
            return (p.metadata.labels or {}).get("copd.io/component") == "hub"

        def opd_trainer(p):
            lab = p.metadata.labels or {}
            return lab.get("copd.io/component") == "trainer" and lab.get("copd.io/stage") == "OPD"

        old = wait_for(lambda: running_pod(api, namespace, hub), 400, "the hub pod running", interval=0.5)
        wait_for(lambda: running_pod(api, namespace, opd_trainer), 120, "an OPD trainer running", interval=0.5)
        wait_for(lambda: any(c.ready for c in (api.core.read_namespaced_pod(old.metadata.name, namespace)
                                                 .status.container_statuses or [])), 180, "the hub ready",
                 interval=0.5)
        time.sleep(2)
        t = time.monotonic()
        api.core.delete_namespaced_pod(old.metadata.name, namespace)

        def new_hub_ready():
            p = running_pod(api, namespace, hub)
            return p is not None and p.metadata.uid != old.metadata.uid and \
                any(c.ready for c in p.status.container_statuses or []) and p
        new = wait_for(new_hub_ready, 300, "a new hub pod, ready", interval=0.5)
        assert new.metadata.name == old.metadata.name
        # serving again: the new hub publishes its address once its teachers are loaded and it listens
        (claim,) = api.core.list_namespaced_persistent_volume_claim(namespace, label_selector="copd.io/run=hubdel").items
        address = cluster.procnode_workdir / "pvc" / namespace / claim.metadata.name / "hub" / "cycle-001.json"
        wall_t = time.time() - (time.monotonic() - t)

        def published() -> bool:
            try:
                return json.loads(address.read_text())["time"] > wall_t
            except (OSError, ValueError, KeyError):
                return False
        wait_for(published, 300, "the new hub to publish its address", interval=0.5)
        recovered = time.monotonic() - t
        st = wait_end(api, namespace, "hubdel", 600, op)
        assert st["phase"] == "Succeeded", (st, op.tail())
        assert st.get("restarts", 0) == 0
        assert all(b["step"] == 4 for b in st["branches"].values()), st["branches"]
        fault("hub-deleted-mid-opd", recovered, "0 steps, 0 checkpoints, 0 restarts used (trainers retried)")
    finally:
        op.stop()


@pytest.mark.cluster
def test_missing_claim_waits_then_proceeds(cluster, namespace, tmp_path):
    apply_crds(cluster)
    api = Api(cluster)
    op = Operator(cluster, namespace, tmp_path).start()
    try:
        doc = kwok_run("claim")
        doc["spec"]["storage"]["claimName"] = "later"
        apply_doc(cluster, namespace, doc)
        st = wait_for(lambda: cond(s := status(api, namespace, "claim"), "Blocked").get("status") == "True" and s,
                      60, "condition Blocked", interval=0.5)
        assert cond(st, "Blocked")["reason"] == "ClaimNotFound" and "later" in cond(st, "Blocked")["message"]
        assert st.get("phase", "Pending") == "Pending" and not api.jobs(namespace)
        pvc = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "later"},
               "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}
        t = apply_doc(cluster, namespace, pvc)
        wait_for(lambda: status(api, namespace, "claim").get("phase") == "Running", 60, "the run to start",
                 interval=0.5)
        recovered = time.monotonic() - t
        st = wait_end(api, namespace, "claim", 180, op)
        assert st["phase"] == "Succeeded", (st, op.tail())
        assert cond(st, "Blocked")["status"] == "False"
        fault("missing-claim", recovered, "nothing (waited with condition Blocked/ClaimNotFound)")
    finally:
        op.stop()


@pytest.mark.cluster
@pytest.mark.slow
def test_bad_dataset_path_fails_with_invalid_input_without_retries(cluster, namespace, tmp_path):
    apply_crds(cluster)
    api = Api(cluster)
    op = proc_operator(cluster, namespace, tmp_path)
    try:
        doc = proc_run("badpath")
        doc["spec"]["branches"][0]["dataset"] = {"path": "data/missing.jsonl"}
        t = apply_doc(cluster, namespace, doc)
        st = wait_end(api, namespace, "badpath", 300, op)
        took = time.monotonic() - t
        failed = cond(st, "Failed")
        assert st["phase"] == "Failed" and failed["reason"] == "InvalidInput", (st, op.tail())
        assert "spec.branches[0].dataset.path" in failed["message"] and "no such file" in failed["message"]
        (job,) = [j for j in api.jobs(namespace) if (j.metadata.labels or {}).get("copd.io/branch") == "arith"]
        assert (job.status.failed or 0) == 1, job.status  # FailJob on exit 2: not retried
        fault("bad-dataset-path", took, "nothing: Failed/InvalidInput naming spec.branches[0].dataset.path, 1 pod")
    finally:
        op.stop()


@pytest.mark.cluster
def test_unknown_spec_field_from_a_newer_crd_is_reported_not_fatal(cluster, namespace, tmp_path):
    """A newer CRD admits `spec.futureKnob`; this operator does not know it: a SpecWarning, the run goes on.
    The CRD gets the field for the test (additive: other runs are unaffected) and is restored after."""
    apply_crds(cluster)
    api = Api(cluster)
    crd = yaml.safe_load((ROOT / "crds" / "copdruns.copd.io.yaml").read_text())
    for v in crd["spec"]["versions"]:
        v["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["futureKnob"] = {"type": "string"}
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=yaml.safe_dump(crd))
    op = Operator(cluster, namespace, tmp_path).start()
    try:
        doc = kwok_run("future")
        doc["spec"]["futureKnob"] = "on"
        t = apply_doc(cluster, namespace, doc)
        st = wait_for(lambda: cond(s := status(api, namespace, "future"), "SpecWarning").get("status") == "True"
                      and s, 60, "condition SpecWarning", interval=0.5)
        assert cond(st, "SpecWarning")["reason"] == "UnknownFields" and "spec.futureKnob" in \
            cond(st, "SpecWarning")["message"]
        st = wait_end(api, namespace, "future", 180, op)
        assert st["phase"] == "Succeeded", (st, op.tail())
        fault("unknown-spec-field", time.monotonic() - t, "nothing (reported as SpecWarning/UnknownFields)")
    finally:
        op.stop()
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds" / "copdruns.copd.io.yaml"))
