"""schedule.mode adaptive through the operator: real trainers on the process node, the Diagnose Job's
mass overlaps reach `decide` through its termination message, and the plan it makes is carried out as
Jobs (`copd stage --steps/--teachers`), at the fixed schedule's update budget."""

from __future__ import annotations

import json

import pytest

from tests.cluster.support import PY, Api, Operator, apply_crds, apply_doc, wait_for
from tests.cluster.test_operator_procnode import small_run


def _args(job) -> list[str]:
    return list(job.spec.template.spec.containers[0].args or [])


def _arg(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args else None


@pytest.mark.cluster
@pytest.mark.slow
def test_operator_drives_the_adaptive_schedule_through_decide(cluster, namespace, tmp_path):
    apply_crds(cluster)
    api = Api(cluster)
    doc = small_run()
    doc["metadata"]["name"] = "adaptive"
    # one-cycle phases: cycle 1 distils (nothing measured yet), then its phase ends (MaxPhase) and in
    # cycle 2 each branch spends its OPD step on RL: 2 RL steps, no OPD stage, no hub
    doc["spec"]["schedule"] = {"cycles": 2, "rlStepsPerCycle": 1, "opdStepsPerCycle": 1, "mode": "adaptive",
                               "adaptive": {"lowerAlignment": 0.5, "upperAlignment": 0.99, "minPhaseCycles": 1,
                                            "maxPhaseCycles": 1}}
    doc["spec"]["mergeReadiness"].pop("minCycles", None)
    op = Operator(cluster, namespace, tmp_path, "--hub-address", "pod-ip",
                  "--trainer-command", f"{PY} -m copd_runtime.cli").start()
    try:
        apply_doc(cluster, namespace, doc)
        st = wait_for(lambda: (s := api.run(namespace, "adaptive").get("status") or {}).get("phase")
                      in ("Succeeded", "Failed") and s, 540, "the run to end", interval=1.0)
        assert st["phase"] == "Succeeded", (st, op.tail())

        # the decision, as the operator wrote it: made from cycle 1's measured alignments
        phases = {(p["student"], p["teacher"]): p for p in st["consolidation"]}
        assert set(phases) == {("arith", "reverse"), ("reverse", "arith")}
        for p in phases.values():
            assert p["distilling"] is False and p["reason"] == "MaxPhase" and 0.0 < p["alignment"] <= 1.0
        # status.diagnostics is the last cycle's; mass overlap reported next to top-k overlap
        assert all(0.0 < d["massOverlap"] <= 1.0 for d in st["diagnostics"])

        jobs = {(_arg(_args(j), "--branch"), _arg(_args(j), "--cycle"), _arg(_args(j), "--stage")): _args(j)
                for j in api.jobs(namespace) if _args(j) and _args(j)[0] == "stage"}
        assert sorted(jobs) == sorted([(b, c, s) for b in ("arith", "reverse")
                                       for c, s in (("1", "RL"), ("1", "OPD"), ("2", "RL"))]), sorted(jobs)
        for b, other in (("arith", "reverse"), ("reverse", "arith")):
            assert _arg(jobs[(b, "1", "RL")], "--steps") == "1"
            assert _arg(jobs[(b, "1", "OPD")], "--steps") == "1"
            assert _arg(jobs[(b, "1", "OPD")], "--teachers") == other
            assert _arg(jobs[(b, "2", "RL")], "--steps") == "2"
        assert not [p for p in api.pods(namespace) if "hub" in p.metadata.name and "c2" in p.metadata.name]

        # what the trainers did: the fixed schedule's 2 updates per branch and cycle
        (claim,) = api.core.list_namespaced_persistent_volume_claim(
            namespace, label_selector="copd.io/run=adaptive").items
        storage = cluster.procnode_workdir / "pvc" / namespace / claim.metadata.name
        recs = [json.loads(x) for x in (storage / "metrics.jsonl").read_text().splitlines() if x.strip()]
        steps = {(r["branch"], r["cycle"], r["phase"], r["step"]) for r in recs}
        for b in ("arith", "reverse"):
            assert {(c, ph, n) for bb, c, ph, n in steps if bb == b} == {
                (1, "RL", 1), (1, "OPD", 1), (2, "RL", 1), (2, "RL", 2)}
        cycle1 = json.loads((storage / "diagnostics" / "cycle-001.json").read_text())
        assert {(r["student"], r["teacher"]): pytest.approx(r["mass_overlap"], abs=1e-4) for r in cycle1} == \
            {k: p["alignment"] for k, p in phases.items()}
        events = api.core.list_namespaced_event(namespace).items
        assert any(e.reason == "ConsolidationPlanned" and "cycle 2: distilling none" in e.message for e in events)
    finally:
        op.stop()
