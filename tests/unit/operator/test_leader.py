"""decide_lease(): the pure decision of Lease-based leader election (operator/copd_operator/leader.py)."""

from __future__ import annotations

import pytest
from copd_operator.control.leader import Action, LeaseRecord, decide_lease

ME, OTHER, D = "op-a_1234", "op-b_5678", 15.0

CASES = [
    # (what, lease, now, expected)
    ("no lease: create it", None, 100.0, Action.CREATE),
    ("mine, fresh: renew", LeaseRecord(ME, 99.0), 100.0, Action.RENEW),
    ("mine, even if expired: renew", LeaseRecord(ME, 10.0), 100.0, Action.RENEW),
    ("released (holder None): acquire", LeaseRecord(None, 99.0), 100.0, Action.ACQUIRE),
    ("released (holder ''): acquire", LeaseRecord("", 99.0), 100.0, Action.ACQUIRE),
    ("other, fresh: wait", LeaseRecord(OTHER, 99.0), 100.0, Action.WAIT),
    ("other, just inside duration: wait", LeaseRecord(OTHER, 85.01), 100.0, Action.WAIT),
    ("other, exactly at expiry: acquire", LeaseRecord(OTHER, 85.0), 100.0, Action.ACQUIRE),
    ("other, expired: acquire", LeaseRecord(OTHER, 50.0), 100.0, Action.ACQUIRE),
    ("other, never renewed: acquire", LeaseRecord(OTHER, None), 100.0, Action.ACQUIRE),
    ("record's own duration wins (30 s): wait", LeaseRecord(OTHER, 80.0, duration_s=30), 100.0, Action.WAIT),
    ("record's own duration wins (5 s): acquire", LeaseRecord(OTHER, 94.0, duration_s=5), 100.0, Action.ACQUIRE),
    ("record duration 0 falls back to default: wait", LeaseRecord(OTHER, 90.0, duration_s=0), 100.0, Action.WAIT),
]


@pytest.mark.parametrize("what,lease,now,expected", CASES, ids=[c[0] for c in CASES])
def test_decide_lease(what, lease, now, expected):
    assert decide_lease(lease, ME, now, D) is expected


def test_two_candidates_never_both_wait_or_both_lead_on_the_same_record():
    """On one record, at most one of two candidates may RENEW, and on a live foreign lease nobody else acts."""
    for _, lease, now, _ in CASES:
        a, b = decide_lease(lease, ME, now, D), decide_lease(lease, OTHER, now, D)
        assert not (a is Action.RENEW and b is Action.RENEW)
        if a is Action.RENEW and lease.holder == ME and now < (lease.renew_time or 0) + D:
            assert b is Action.WAIT


def test_identity_has_host_and_random_suffix(monkeypatch):
    from copd_operator.control.leader import identity

    monkeypatch.setenv("POD_NAME", "copd-operator-7d9f-abcde")
    a, b = identity(), identity()
    assert a.startswith("copd-operator-7d9f-abcde_") and a != b


def test_flags_default_off_and_parse():
    from copd_operator.main import parse_args

    a = parse_args(["-n", "x"])
    assert a.leader_elect is False and a.leader_election_id == "copd-operator-leader"
    a = parse_args(["-n", "x", "--leader-elect", "--leader-election-namespace", "sys", "--leader-election-id", "l"])
    assert a.leader_elect and a.leader_election_namespace == "sys" and a.leader_election_id == "l"
    assert parse_args(["-n", "x", "--no-leader-elect"]).leader_elect is False


def test_follower_health_is_ready_with_unstarted_workers():
    from types import SimpleNamespace

    from copd_operator.control.health import Health
    from copd_operator.control.workqueue import Workers, WorkQueue

    workers = Workers(WorkQueue(), lambda key: True, n=1, resync_s=60, on_error=lambda k, e: 1.0)  # never started
    h = Health(SimpleNamespace(workers=workers, elector=SimpleNamespace(is_leader=False)))
    h.beat()
    ok, body = h.ready()
    assert ok and body["leader"] is False and body["problems"] == []


class FakeLeaseApi:
    """CoordinationV1Api's read/replace on one Lease, with optional 409s on replace."""

    def __init__(self, holder, conflicts=0):
        from kubernetes import client

        self.lease = client.V1Lease(metadata=client.V1ObjectMeta(name="l", namespace="ns", resource_version="1"),
                                    spec=client.V1LeaseSpec(holder_identity=holder, lease_duration_seconds=15,
                                                            lease_transitions=0))
        self.conflicts, self.replaced = conflicts, []

    def read_namespaced_lease(self, name, namespace, **_):
        return self.lease

    def replace_namespaced_lease(self, name, namespace, body, **_):
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        if self.conflicts:
            self.conflicts -= 1
            raise ApiException(status=409, reason="Conflict")
        self.replaced.append(body)
        rv = str(int(self.lease.metadata.resource_version) + 1)
        self.lease = client.V1Lease(metadata=client.V1ObjectMeta(name=name, namespace=namespace, resource_version=rv),
                                    spec=client.V1LeaseSpec(holder_identity=body["spec"].get("holderIdentity"),
                                                            lease_duration_seconds=body["spec"]["leaseDurationSeconds"],
                                                            lease_transitions=body["spec"]["leaseTransitions"]))
        return self.lease


def _elector(api):
    from copd_operator.control.leader import LeaderElector

    e = LeaderElector(None, "ns", "l", me=ME)
    e.api = api
    return e


@pytest.mark.parametrize("what, holder, conflicts, writes, released", [
    ("mine: cleared", ME, 0, 1, True),
    ("mine, two 409s first: retried, then cleared", ME, 2, 1, True),
    ("someone else's: untouched", OTHER, 0, 0, True),
    ("free: untouched", None, 0, 0, True),
    ("mine, 409 every time: gives up (it expires)", ME, 99, 0, False),
])
def test_release(what, holder, conflicts, writes, released):
    api = FakeLeaseApi(holder, conflicts)
    e = _elector(api)
    e.is_leader = holder == ME  # release decides on the Lease as read, not on this flag
    assert e.release(attempts=3) is released
    assert len(api.replaced) == writes
    if writes:
        assert "holderIdentity" not in api.replaced[0]["spec"] and api.lease.spec.holder_identity is None
    assert e.is_leader is False


def test_release_is_idempotent_and_no_round_takes_the_lease_back():
    api = FakeLeaseApi(ME)
    e = _elector(api)
    e.release()
    e.release()
    assert len(api.replaced) == 1
    # a renew round that was waiting for the lock when release() ran must not re-acquire the free Lease
    assert e.try_acquire_or_renew() is False and api.lease.spec.holder_identity is None
