"""Two copd-operators with --leader-elect on the real control plane (KWOK GPU nodes).

Exactly one holds the coordination.k8s.io Lease and only it reconciles; SIGKILL of the
leader mid-run hands the run to the other within about lease duration + retry period,
and the run still ends Succeeded with every Job made exactly once. A graceful stop
(SIGTERM) releases the Lease before the process exits, so the next takeover is fast.

Every wait polls a condition (the Lease, a run's status, an operator's log) with a
generous timeout; nothing sleeps a fixed time.
"""

from __future__ import annotations

import re
import signal
import time

import pytest

from tests.cluster.support import (
    GPU_NODE_SELECTOR,
    KWOK_TOLERATION,
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

LEASE = "copd-operator-leader"


def _holder(cluster, ns) -> str | None:
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    try:
        return client.CoordinationV1Api(cluster.api_client()).read_namespaced_lease(LEASE, ns).spec.holder_identity
    except ApiException as e:
        if e.status == 404:
            return None
        raise


def _log(op: Operator, since: int = 0) -> str:
    """The operator's log from byte offset `since` (a restarted operator appends to the same file)."""
    if not op.log.exists():
        return ""
    with open(op.log, "rb") as f:
        f.seek(since)
        return f.read().decode(errors="replace")


def _identity(op: Operator, since: int = 0) -> str | None:
    """The identity this operator acquired the Lease as (its log line), or None."""
    m = re.findall(r"acquired lease \S+ as (\S+)", _log(op, since))
    return m[-1] if m else None


def _waits_on(op: Operator, holder: str, since: int = 0) -> bool:
    """The operator read the Lease, found it held by `holder`, and is waiting (its log line)."""
    return f"is held by {holder}: waiting" in _log(op, since)


def _transitions(op: Operator) -> float:
    text = op.metrics() or ""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("copd_phase_transitions_total{"))


@pytest.mark.cluster
def test_two_operators_one_leader_failover_without_duplicates(cluster, namespace, tmp_path):
    apply_crds(cluster)
    api = Api(cluster)
    flags = ("--leader-elect", "--leader-election-namespace", namespace)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    ops = [Operator(cluster, namespace, tmp_path / "a", *flags).start(),
           Operator(cluster, namespace, tmp_path / "b", *flags).start()]
    try:
        holder = wait_for(lambda: _holder(cluster, namespace), 60, "a Lease holder")
        # one has logged taking it, the other has read it and waits (so it tried and did not take it)
        leader = wait_for(lambda: next((op for op in ops if _identity(op) == holder), None), 60,
                          "the holder's log line")
        follower = next(op for op in ops if op is not leader)
        wait_for(lambda: _waits_on(follower, holder), 60, "the other operator to wait on the Lease")
        assert _holder(cluster, namespace) == holder
        assert _identity(follower) is None, [(_identity(o), o.tail(10)) for o in ops]

        doc = example(tolerations=[KWOK_TOLERATION], nodeSelector=GPU_NODE_SELECTOR)
        doc["spec"]["trainer"].pop("priorityClassName", None)
        doc["spec"]["schedule"]["cycles"] = 2
        doc["spec"]["mergeReadiness"]["minCycles"] = 2
        apply_doc(cluster, namespace, doc)
        # the leader drives the run; the follower (watching the same events) does nothing
        wait_for(lambda: (api.run(namespace, "demo").get("status") or {}).get("stage") == "OPD", 120, "cycle 1 OPD")
        assert _transitions(leader) >= 1
        assert _transitions(follower) == 0, follower.tail()

        # SIGKILL the leader mid-run: no release; the follower waits out the lease
        leader.kill(signal.SIGKILL)
        t_kill = time.monotonic()
        new = wait_for(lambda: (h := _holder(cluster, namespace)) not in (None, holder) and h, 60,
                       "the follower to take the Lease")
        failover_s = time.monotonic() - t_kill
        wait_for(lambda: _identity(follower) == new, 30, "the follower's log line for the Lease it took")
        assert failover_s < 15 + 2 * 2 + 3, failover_s  # lease duration + retry (jitter) + poll slack

        st = wait_for(lambda: (s := api.run(namespace, "demo").get("status") or {}).get("phase")
                      in ("Succeeded", "Failed") and s, 240, "the run to end")
        assert st["phase"] == "Succeeded", (st, follower.tail())
        jobs = [j.metadata.name for j in api.jobs(namespace)]
        assert len(jobs) == len(set(jobs)) == 2 * (3 * 2 + 1) + 1, sorted(jobs)
        assert_no_duplicate_children(api, namespace)
        assert metric(follower.metrics(), "copd_run_phase", namespace=namespace, run="demo",
                      phase="Succeeded") == 1.0

        # graceful stop of the new leader releases the Lease before it exits; the restarted one, waiting
        # on it, takes it on its next retry instead of after the lease duration
        since = leader.log.stat().st_size
        leader.start()
        wait_for(lambda: _waits_on(leader, new, since), 60, "the restarted operator to wait on the Lease")
        follower.stop()  # SIGTERM, then waits for the process to exit
        t_stop = time.monotonic()
        assert follower.proc.returncode == 0, follower.tail()
        assert "released lease" in _log(follower), follower.tail()
        assert _holder(cluster, namespace) != new, "SIGTERM should release the Lease before the process exits"
        taker = wait_for(lambda: (h := _holder(cluster, namespace)) not in (None, "", new) and h, 60,
                         "takeover after release")
        release_failover_s = time.monotonic() - t_stop
        wait_for(lambda: _identity(leader, since) == taker, 30, "the restarted operator's log line")
        # an unreleased Lease could not be taken before it expired (15 s after the last renewal)
        assert release_failover_s < 10, release_failover_s

        report("leader-failover", sigkill_failover_s=round(failover_s, 2),
               release_failover_s=round(release_failover_s, 2))
    finally:
        for op in ops:
            op.stop()
