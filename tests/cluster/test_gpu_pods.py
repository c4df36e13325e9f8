"""Many GPUs per branch on the real control plane with KWOK GPU nodes (pods complete without running):
resources.gpu 4 and trainer.nodes 2 give Indexed stage Jobs of 2 pods running torchrun with 4
processes and a memory-backed /dev/shm, found through a headless rendezvous Service; the run
schedules on the 8-GPU KWOK nodes and walks to Succeeded."""

from __future__ import annotations

import pytest

from tests.cluster.support import (
    GPU_NODE_SELECTOR,
    KWOK_TOLERATION,
    Api,
    Operator,
    apply_crds,
    apply_doc,
    example,
    wait_for,
)


@pytest.mark.cluster
def test_four_gpus_two_nodes_per_branch_schedule_and_complete(cluster, namespace, tmp_path):
    apply_crds(cluster)
    api = Api(cluster)
    op = Operator(cluster, namespace, tmp_path).start()
    try:
        doc = example(tolerations=[KWOK_TOLERATION], nodeSelector=GPU_NODE_SELECTOR, nodes=2,
                      resources={"gpu": 4, "cpu": "2", "memory": "4Gi"})
        doc["spec"]["trainer"].pop("priorityClassName", None)
        doc["spec"]["schedule"] = {"cycles": 1, "rlStepsPerCycle": 1, "opdStepsPerCycle": 1}
        doc["spec"]["mergeReadiness"] = {"minCycles": 1}
        apply_doc(cluster, namespace, doc)

        def finished():
            st = api.run(namespace, "demo").get("status") or {}
            return st if st.get("phase") in ("Succeeded", "Failed") else None

        st = wait_for(finished, 300, "the run to finish")
        assert st["phase"] == "Succeeded", (st, op.tail())

        stage_jobs = [j for j in api.jobs(namespace) if j.metadata.labels["copd.io/component"] == "trainer"]
        assert len(stage_jobs) == 3 * 2  # 3 branches × (RL, OPD)
        for j in stage_jobs:
            assert j.spec.completion_mode == "Indexed" and j.spec.completions == 2 and j.spec.parallelism == 2
            assert j.status.succeeded == 2
        trainers = [p for p in api.pods(namespace) if p.metadata.labels.get("copd.io/component") == "trainer"]
        assert len(trainers) == 2 * len(stage_jobs)
        services = {s.metadata.name: s for s in api.core.list_namespaced_service(namespace).items
                    if (s.metadata.labels or {}).get("copd.io/component") == "rendezvous"}
        assert len(services) == 3 and all(s.spec.cluster_ip == "None" for s in services.values())
        for p in trainers:
            c = p.spec.containers[0]
            assert c.command[:2] == ["torchrun", "--nproc-per-node=4"] and "--nnodes=2" in c.command
            assert c.resources.limits["nvidia.com/gpu"] == "4"
            assert p.spec.node_name.startswith("kwok-gpu-")
            assert p.spec.subdomain in services
            shm = [v for v in p.spec.volumes if v.name == "dshm"]
            assert shm and shm[0].empty_dir.medium == "Memory"
            assert {"name": "dshm", "mountPath": "/dev/shm"} in [
                {"name": m.name, "mountPath": m.mount_path} for m in c.volume_mounts]
        assert {p.metadata.annotations["batch.kubernetes.io/job-completion-index"] for p in trainers} == {"0", "1"}
    finally:
        op.stop()
