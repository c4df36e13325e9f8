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
    import threading

    from copd_operator.control.health import Health

    class W:
        _threads = [threading.Thread(target=lambda: None, name="copd-worker-0")]

    class E:
        is_leader = False

    h = Health({"worker_threads": W(), "elector": E()})
    h.beat()
    ok, body = h.ready()
    assert ok and body["leader"] is False
