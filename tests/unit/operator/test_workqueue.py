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
