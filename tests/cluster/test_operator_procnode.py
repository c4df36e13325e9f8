"""copd-operator with real training: pods run `copd stage|hub|diagnose|merge` on the process node.

The hub is reached by pod IP (127.0.0.1 on the process node; Services do not route here),
on a port fixed by (namespace, run, cycle). The operator is SIGKILLed while the RL trainers
run and restarted: the run must finish with no duplicate pods.
"""

from __future__ import annotations

import time

import pytest

from tests.cluster.support import (
    PY,
    Api,
    Operator,
    apply_crds,
    apply_doc,
    assert_no_duplicate_children,
    example,
    metric,
    report,
    wait_for,
)

PROC_TOLERATION = {"key": "copd.io/process-node", "operator": "Exists", "effect": "NoSchedule"}


def small_run() -> dict:
    doc = example(tolerations=[PROC_TOLERATION], nodeSelector={"copd.io/process-node": "true"},
                  resources={"gpu": 1, "cpu": "1", "memory": "2Gi"})
    s = doc["spec"]
    doc["metadata"]["name"] = "tiny"
    s["branches"] = s["branches"][:2]
    s["schedule"] = {"cycles": 1, "rlStepsPerCycle": 2, "opdStepsPerCycle": 2}
    s["rl"].update(groupSize=4, batchSize=2, maxNewTokens=8)
    s["diagnostics"] = {"topK": 8, "probePrompts": 4}
    s["mergeReadiness"]["minCycles"] = 1
    return doc


@pytest.mark.cluster
@pytest.mark.slow
def test_operator_process_node_trains_scores_and_merges(cluster, namespace, tmp_path):
    apply_crds(cluster)
    api = Api(cluster)
    op = Operator(cluster, namespace, tmp_path, "--hub-address", "pod-ip",
                  "--trainer-command", f"{PY} -m copd_runtime.cli").start()
    try:
        t_apply = apply_doc(cluster, namespace, small_run())
        pods = wait_for(lambda: [p for p in api.pods(namespace) if p.status.phase == "Running"], 120,
                        "a running trainer pod")
        assert pods[0].spec.node_name == cluster.procnode_name
        # kill the operator while the RL trainers run, restart it
        op.kill()
        time.sleep(2)
        op.start()
        st = wait_for(lambda: (s := api.run(namespace, "tiny").get("status") or {}).get("phase")
                      in ("Succeeded", "Failed") and s, 540, "the run to end", interval=1.0)
        wall = time.monotonic() - t_apply
        assert st["phase"] == "Succeeded", (st, op.tail())

        # diagnostics come from real scoring, in status and in /metrics
        diags = st["diagnostics"]
        assert {(d["student"], d["teacher"]) for d in diags} == {("arith", "reverse"), ("reverse", "arith")}
        for d in diags:
            assert 0.0 < d["topkOverlap"] <= 1.0 and d["symmetricKl"] >= 0.0
        assert st["minTopkOverlap"] == min(d["topkOverlap"] for d in diags)
        assert st["maxSymmetricKl"] == max(d["symmetricKl"] for d in diags)
        text = op.metrics()
        for d in diags:
            got = metric(text, "copd_topk_overlap", namespace=namespace, run="tiny", student=d["student"],
                         teacher=d["teacher"])
            assert got == pytest.approx(d["topkOverlap"])
            assert metric(text, "copd_symmetric_kl", namespace=namespace, run="tiny", student=d["student"],
                          teacher=d["teacher"]) == pytest.approx(d["symmetricKl"])
        branches = {b["spec"]["branch"]: b["status"] for b in api.branches(namespace)}
        assert all(b["phase"] == "Succeeded" and b["step"] == 2 for b in branches.values()), branches
        assert_no_duplicate_children(api, namespace)

        # the merge Job wrote a model from_pretrained loads
        assert st["mergedModel"] == "/copd/merged"
        (claim,) = api.core.list_namespaced_persistent_volume_claim(namespace, label_selector="copd.io/run=tiny").items
        merged = cluster.procnode_workdir / "pvc" / namespace / claim.metadata.name / "merged"
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(merged)
        assert sum(p.numel() for p in model.parameters()) > 0
        report("process-node", wall_s=round(wall, 1))
    finally:
        op.stop()
