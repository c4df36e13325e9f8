"""What one operator process runs: built by main, handed to the kopf handlers through kopf's memo.

    main       rt = OperatorRuntime(queue, reconciler, ...)   (+ elector, health)
               kopf.run(..., memo=kopf.Memo(runtime=rt))
    handlers   startup: rt.start()   watch events: rt.queue.add(key)   cleanup: rt.shutdown()
    health     reads rt.workers / rt.elector (control.health.Probed)
    main       rt.shutdown() again once kopf.run returned, however it ended (idempotent)

`shutdown()` is the one graceful stop: stop the workers, let an in-flight
reconcile finish, then release the Lease, so that another replica may lead only
once this one can no longer write. main then stops the write pool and the informers.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from kubernetes.client.rest import ApiException

from copd_operator.control.health import Health
from copd_operator.control.leader import LeaderElector
from copd_operator.control.workqueue import Key, Workers, WorkQueue
from copd_operator.reconcile import Conflict, Reconciler

log = logging.getLogger("copd_operator")

CONFLICT_RETRY_S = 0.2
ERROR_RETRY_S = 2.0  # the first retry after a reconcile raised; doubled per failure of the same key
MAX_ERROR_RETRY_S = 60.0


@dataclass
class OperatorRuntime:
    queue: WorkQueue
    reconciler: Reconciler
    worker_count: int
    resync_s: float
    elector: LeaderElector | None = None  # --leader-elect: only the Lease holder runs the workers
    health: Health | None = None  # --health-port
    join_timeout_s: float = 10.0  # how long shutdown() waits for in-flight reconciles before releasing
    workers: Workers | None = None  # made by start() (kopf's startup handler)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _shut_down: bool = field(default=False, init=False, repr=False)

    # -- the work queue's callbacks

    def work(self, key: Key) -> bool:
        t0 = time.monotonic()
        try:
            outcome = self.reconciler.reconcile(*key)
        finally:
            self.reconciler.metrics.reconcile_duration.observe(time.monotonic() - t0)
        self.queue.succeeded(key)
        if outcome.exists and outcome.requeue_after_s is not None:
            self.queue.add(key, delay=outcome.requeue_after_s)
        return outcome.exists

    def on_error(self, key: Key, err: BaseException) -> float:
        if isinstance(err, Conflict):
            return CONFLICT_RETRY_S
        if self.stopping:  # cut short by the shutdown (a request refused at exit): not an error of the run
            log.info("reconcile %s/%s interrupted by the shutdown: %s", *key, err)
            return 0.0
        kind = type(err).__name__ if not isinstance(err, ApiException) else f"ApiException{err.status}"
        self.reconciler.metrics.reconcile_errors.labels(kind).inc()
        wait = self.queue.retry_after(key, ERROR_RETRY_S, MAX_ERROR_RETRY_S)
        log.error("reconcile %s/%s failed (retry in %.0fs): %s", *key, wait, err, exc_info=err)
        return wait

    # -- lifecycle

    @property
    def stopping(self) -> bool:
        return self._shut_down

    def start(self) -> Workers:
        """Make the workers; run them now, or (leader election) once this process holds the Lease."""
        with self._lock:
            if self.workers is None:
                self.workers = Workers(self.queue, self.work, self.worker_count, self.resync_s, self.on_error)
                if self.elector is None:
                    self.workers.start()
                else:
                    self.elector.on_started_leading = self.workers.start
                    self.elector.start()
            return self.workers

    def shutdown(self) -> None:
        """Stop the workers, wait (up to join_timeout_s) for in-flight reconciles, release the Lease.

        The wait is also what keeps the exit quiet: main returns only after it, so a reconcile is never
        cut off by the interpreter's shutdown (whose executors refuse new work) and recorded as an error
        of its run. Idempotent: kopf's cleanup handler calls it, and main calls it again after kopf.run
        returned, in case the cleanup was cut short; a second call waits for the first."""
        with self._lock:
            if self._shut_down:
                return
            self._shut_down = True
            self.reconciler.stopping = True
            if self.workers is not None:
                self.workers.stop()
            else:
                self.queue.close()
            if self.workers is not None and not self.workers.join(self.join_timeout_s):
                log.warning("a reconcile is still running after %.0fs; %s", self.join_timeout_s,
                            "exiting anyway" if self.elector is None else "releasing the Lease anyway")
            if self.elector is not None:
                self.elector.release()
