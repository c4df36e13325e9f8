"""OperatorRuntime: the requeue after a reconcile that made Branches; the graceful shutdown's order."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
from copd_operator.control.workqueue import WorkQueue
from copd_operator.reconcile import AGAIN, DONE, GONE, Conflict
from copd_operator.runtime import OperatorRuntime


class FakeReconciler:
    def __init__(self, outcomes):
        self.outcomes, self.calls = list(outcomes), []
        self.metrics = SimpleNamespace(reconcile_errors=SimpleNamespace(labels=lambda kind: SimpleNamespace(
            inc=lambda: self.calls.append(("error", kind)))), reconcile_duration=SimpleNamespace(observe=lambda s: None))

    def reconcile(self, namespace, name):
        self.calls.append((namespace, name))
        return self.outcomes.pop(0) if self.outcomes else DONE


class FakeElector:
    def __init__(self, log):
        self.log, self.on_started_leading, self.is_leader = log, lambda: None, False

    def start(self):
        self.log.append("elector started")

    def release(self):
        self.log.append("released")
        return True


def _rt(outcomes=(), elector=None, workers=1):
    return OperatorRuntime(queue=WorkQueue(), reconciler=FakeReconciler(outcomes), worker_count=workers,
                           resync_s=60, elector=elector)


@pytest.mark.parametrize("outcome, forgotten, requeued", [
    (DONE, False, False),
    (AGAIN, False, True),   # it made Branches: their stage Jobs come with the next pass, at once
    (GONE, True, False),
])
def test_work_forgets_or_requeues(outcome, forgotten, requeued):
    rt = _rt([outcome])
    key = ("ns", "r")
    rt.queue.add(key)
    assert rt.queue.get(0.1) == key
    assert rt.work(key) is (not forgotten)
    rt.queue.done(key)
    assert (rt.queue.get(0.1) == key) is requeued


def test_a_new_run_is_reconciled_again_after_it_made_its_branches():
    rt = _rt([AGAIN, DONE], workers=1)
    rt.start()
    try:
        rt.queue.add(("ns", "r"))
        deadline = time.monotonic() + 5
        while len(rt.reconciler.calls) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert rt.reconciler.calls == [("ns", "r"), ("ns", "r")]
    finally:
        rt.shutdown()


def test_on_error_backs_off_and_counts_errors_but_not_conflicts():
    rt = _rt()
    assert rt.on_error(("ns", "r"), Conflict("ns/r")) < rt.on_error(("ns", "r"), RuntimeError("boom"))
    assert rt.reconciler.calls == [("error", "RuntimeError")]


def test_shutdown_stops_workers_waits_for_the_reconcile_then_releases_once():
    log = []
    entered, finish = threading.Event(), threading.Event()
    rt = _rt(elector=FakeElector(log))

    def reconcile(namespace, name):
        entered.set()
        finish.wait(5)
        log.append("reconcile finished")
        return DONE

    rt.reconciler.reconcile = reconcile
    workers = rt.start()
    assert rt.start() is workers and log == ["elector started"] and not workers.started  # follower so far
    rt.elector.on_started_leading()  # this process took the Lease
    assert workers.started
    rt.queue.add(("ns", "r"))
    assert entered.wait(5)
    threading.Timer(0.3, finish.set).start()
    rt.shutdown()
    rt.shutdown()  # main repeats it after kopf's cleanup handler: a no-op
    assert log == ["elector started", "reconcile finished", "released"]
    assert workers.stopped and workers.join(0)


def test_shutdown_before_startup_still_releases():
    log = []
    rt = _rt(elector=FakeElector(log))
    rt.shutdown()
    assert log == ["released"]


def test_shutdown_without_leader_election_waits_for_the_reconcile_and_its_error_is_not_the_runs():
    """Without a Lease too, shutdown() returns only after the in-flight reconcile: main exits after it, so
    the interpreter's shutdown never cuts a reconcile off. A reconcile that fails while the process stops
    (its executor refused work) is logged, not counted as a reconcile error, and the reconciler is told not
    to record it on the run."""
    log = []
    entered, finish = threading.Event(), threading.Event()
    rt = _rt()

    def reconcile(namespace, name):
        entered.set()
        finish.wait(5)
        log.append("reconcile finished")
        raise RuntimeError("cannot schedule new futures after shutdown")

    rt.reconciler.reconcile = reconcile
    workers = rt.start()
    rt.queue.add(("ns", "r"))
    assert entered.wait(5)
    threading.Timer(0.3, finish.set).start()
    rt.shutdown()
    assert log == ["reconcile finished"] and workers.join(0)
    assert rt.stopping and rt.reconciler.stopping
    assert ("error", "RuntimeError") not in rt.reconciler.calls
