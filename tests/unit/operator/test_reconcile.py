"""Reconciler.reconcile with the cluster I/O replaced: the unparsable-spec path and the Branch-then-Jobs passes."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from copd_operator import reconcile as rec
from copd_operator.logic.naming import branch_cr_name, stage_job_name
from copd_operator.logic.plan import Create

from copd_core.metrics import CoPDMetrics
from tests.unit.operator.builders_test_helpers import CFG, DEMO, SnapB, example_doc, run_ref

NOW = datetime(2026, 1, 1, tzinfo=UTC)


class FakeCluster:
    def __init__(self, monkeypatch, snap):
        self.snap, self.status_writes, self.applied, self.created = snap, [], [], []
        monkeypatch.setattr(rec, "gather", lambda apis, ns, name, sa, **kw: self.snap)
        monkeypatch.setattr(rec, "write_run_status", lambda apis, run, body: self.status_writes.append(body))
        monkeypatch.setattr(rec, "apply_ops", lambda apis, ns, ops: self.applied.extend(ops) or [])
        monkeypatch.setattr(rec, "create", lambda apis, ns, obj: self.created.append(obj))

    def reconciler(self) -> rec.Reconciler:
        return rec.Reconciler(None, CFG, CoPDMetrics(), clock=lambda: NOW)  # type: ignore[arg-type]

    def kinds(self, kind):
        return [op.obj["metadata"]["name"] for op in self.applied if isinstance(op, Create) and op.obj["kind"] == kind]


def _run_obj(spec: dict, status: dict | None = None) -> dict:
    doc = example_doc()
    return {"apiVersion": doc["apiVersion"], "kind": doc["kind"],
            "metadata": {"name": "demo", "namespace": "ns", "uid": "uid-run", "generation": 3},
            "spec": spec, "status": status or {}}


def test_gone_run_is_forgotten(monkeypatch):
    c = FakeCluster(monkeypatch, None)
    assert c.reconciler().reconcile("ns", "demo") is rec.GONE


@pytest.mark.parametrize("status, fails", [
    ({}, True),
    ({"phase": "Running", "cycle": 1, "stage": "RL", "stageStartTime": "2025-12-31T23:59:00Z"}, True),
    ({"phase": "Succeeded"}, False),  # ended runs stay ended
])
def test_unparsable_spec_fails_the_run_with_the_cycles_failure_decision(monkeypatch, status, fails):
    spec = dict(example_doc()["spec"], branches="not a list")  # admitted by an older schema, refused now
    snap = SnapB(run_ref()).obj()
    snap.run = _run_obj(spec, status)
    c = FakeCluster(monkeypatch, snap)
    assert c.reconciler().reconcile("ns", "demo") is rec.DONE
    assert c.applied == []  # no spec, no plan: nothing else is touched
    written = c.status_writes[-1] if c.status_writes else None
    if not fails:
        assert [e for e in c.created if e["kind"] == "Event"] == []
        assert written is None or written["phase"] == "Succeeded"
        return
    assert written["phase"] == "Failed" and "stage" not in written and written["observedGeneration"] == 3
    conds = {x["type"]: (x["status"], x["reason"]) for x in written["conditions"]}
    assert conds["Failed"] == ("True", "InvalidSpec") and conds["Progressing"] == ("False", "InvalidSpec")
    events = [e for e in c.created if e["kind"] == "Event"]
    assert [(e["type"], e["reason"]) for e in events] == [("Warning", "InvalidSpec")]
    assert "branches" in events[0]["message"]


def test_a_new_run_gets_its_branches_then_at_once_its_jobs(monkeypatch):
    run = run_ref()
    snap = SnapB(run).obj()
    snap.branches.clear()
    snap.run = _run_obj(example_doc()["spec"])
    c = FakeCluster(monkeypatch, snap)
    r = c.reconciler()
    assert r.reconcile("ns", "demo") is rec.AGAIN
    assert c.kinds("Branch") == [branch_cr_name(DEMO, "arith"), branch_cr_name(DEMO, "reverse"), branch_cr_name(DEMO, "maxbox")] and c.kinds("Job") == []
    # the Branches exist now (the requeued pass sees them, with their uids)
    snap.branches.update(SnapB(run).obj().branches)
    snap.run["status"] = c.status_writes[-1]
    c.applied.clear()
    assert r.reconcile("ns", "demo") is rec.DONE
    assert c.kinds("Job") == [stage_job_name(DEMO, "arith", 1, "RL"), stage_job_name(DEMO, "reverse", 1, "RL"), stage_job_name(DEMO, "maxbox", 1, "RL")]
