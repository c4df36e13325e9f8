import threading
import time

from copd_operator.control.workqueue import Workers, WorkQueue


def test_dedup_and_no_concurrent_runs_of_one_key():
    q = WorkQueue()
    q.add(("ns", "a"))
    q.add(("ns", "a"))
    assert q.get(0.1) == ("ns", "a")
    q.add(("ns", "a"))  # while processing: runs again afterwards, not concurrently
    assert q.get(0.05) is None
    q.done(("ns", "a"))
    assert q.get(0.1) == ("ns", "a")


def test_delayed_add_and_workers_retry_on_error():
    q = WorkQueue()
    calls = []
    done = threading.Event()

    def work(key):
        calls.append(time.monotonic())
        if len(calls) < 2:
            raise RuntimeError("transient")
        done.set()
        return False  # the run is gone: forget the key

    w = Workers(q, work, n=2, resync_s=60, on_error=lambda k, e: 0.05)
    w.start()
    q.add(("ns", "r"))
    assert done.wait(5)
    w.stop()
    assert ("ns", "r") not in q.known


def _workers(q, work=lambda key: True, n=2):
    return Workers(q, work, n=n, resync_s=60, on_error=lambda k, e: 0.05)


def test_workers_lifecycle_started_dead_join():
    q = WorkQueue()
    w = _workers(q)
    assert not w.started and w.dead() == []  # a leader-election follower: nothing ran, nothing is dead
    w.start()
    assert w.started and w.dead() == []
    w.stop()
    assert w.join(5)
    assert sorted(w.dead()) == ["copd-resync", "copd-worker-0", "copd-worker-1"]


def test_join_waits_for_the_in_flight_work():
    q = WorkQueue()
    entered, release = threading.Event(), threading.Event()

    def work(key):
        entered.set()
        release.wait(5)
        return True

    w = _workers(q, work, n=1)
    w.start()
    q.add(("ns", "r"))
    assert entered.wait(5)
    w.stop()
    assert w.join(0.2) is False  # still reconciling
    release.set()
    assert w.join(5) is True


def test_start_after_stop_is_a_no_op():
    """A leadership callback that fires after shutdown began must not start workers."""
    w = _workers(WorkQueue())
    w.stop()
    w.start()
    assert not w.started and w.join(0.1)
