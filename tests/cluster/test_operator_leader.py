"""Two copd-operators with --leader-elect on the real control plane (KWOK GPU nodes).

Exactly one holds the coordination.k8s.io Lease and only it reconciles; SIGKILL of the
leader mid-run hands the run to the other within about lease duration + retry period,
and the run still ends Succeeded with every Job made exactly once. A graceful stop
(SIGTERM) releases the Lease, so the next takeover is fast.
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


def _identity(op: Operator) -> str | None:
    """The identity this operator acquired the Lease as (its log line), or None."""
    m = re.findall(r"acquired lease \S+ as (\S+)", op.log.read_text(errors="replace") if op.log.exists() else "")
    return m[-1] if m else None


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
        holder = wait_for(lambda: _holder(cluster, namespace), 30, "a Lease holder")
        time.sleep(3)  # a retry period or so: the other one must not have taken it
        assert _holder(cluster, namespace) == holder
        leaders = [op for op in ops if _identity(op) == holder]
        assert len(leaders) == 1, [(_identity(o), o.tail(10)) for o in ops]
        leader = leaders[0]
        follower = next(op for op in ops if op is not leader)
        assert _identity(follower) is None

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
        assert new == _identity(follower)
        assert failover_s < 15 + 2 * 2 + 3, failover_s  # lease duration + retry (jitter) + poll slack

        st = wait_for(lambda: (s := api.run(namespace, "demo").get("status") or {}).get("phase")
                      in ("Succeeded", "Failed") and s, 240, "the run to end")
        assert st["phase"] == "Succeeded", (st, follower.tail())
        jobs = [j.metadata.name for j in api.jobs(namespace)]
        assert len(jobs) == len(set(jobs)) == 2 * (3 * 2 + 1) + 1, sorted(jobs)
        assert_no_duplicate_children(api, namespace)
        assert metric(follower.metrics(), "copd_run_phase", namespace=namespace, run="demo",
                      phase="Succeeded") == 1.0

        # graceful stop of the new leader releases the Lease; a fresh operator takes it on its first try
        leader.start()
        wait_for(lambda: leader.metrics() is not None, 30, "restarted operator")
        follower.stop()
        t_stop = time.monotonic()
        assert _holder(cluster, namespace) in (None, ""), "SIGTERM should release the Lease"
        wait_for(lambda: _holder(cluster, namespace) not in (None, "", new), 30, "takeover after release")
        release_failover_s = time.monotonic() - t_stop
        assert release_failover_s < 2 * 2 + 2, release_failover_s

        report("leader-failover", sigkill_failover_s=round(failover_s, 2),
               release_failover_s=round(release_failover_s, 2))
    finally:
        for op in ops:
            op.stop()
