"""A small controller work queue: keys are (namespace, run); one key is never reconciled twice at once.

Watch events add keys (deduplicated while waiting); workers take them; a key
added while it is being reconciled is run again afterwards. A resync adds
every known key every `resync_s` (minutes by default), which makes the loop
level-based even if an event is missed.

Two priorities: event-driven adds (watch events, requeues, retries) go before
resync adds, so a resync of 1,000 idle runs never delays the run whose Job just
finished; a key waiting as a resync is promoted when an event for it comes. The
queue reports its depth and each key's wait (`copd_workqueue_depth`,
`copd_workqueue_latency_seconds`, by priority) when given the metrics. A key whose reconcile raised backs off exponentially (`retry_after`:
base·2^(n-1), capped), and every add of it waits for that, resyncs included, until
a reconcile of it succeeds (`succeeded`). (kopf's own daemons/timers would need a finalizer on every
CoPDRun; this queue needs none, so deleting a run never waits for the operator.)
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from copd_core.metrics import CoPDMetrics

log = logging.getLogger("copd_operator.queue")

Key = tuple[str, str]
EVENT, RESYNC = 0, 1  # priorities: lower goes first
PRIORITY_NAMES = ("event", "resync")


class WorkQueue:
    def __init__(self, metrics: CoPDMetrics | None = None):
        self._cv = threading.Condition()
        self._ready: tuple[deque[Key], deque[Key]] = (deque(), deque())  # may hold stale entries: see _prio
        self._prio: dict[Key, int] = {}  # waiting keys -> their priority (the deque entry that counts)
        self._since: dict[Key, float] = {}  # waiting keys -> when they became ready
        self._processing: set[Key] = set()
        self._again: set[Key] = set()
        self._delayed: list[tuple[float, Key]] = []
        self.known: set[Key] = set()
        self._closed = False
        self._failures: dict[Key, int] = {}
        self._not_before: dict[Key, float] = {}
        self.metrics = metrics
        self._depth = [0, 0]

    def _make_ready(self, key: Key, prio: int) -> None:
        """Under the lock: `key` waits at `prio` (or better, if it waits already)."""
        old = self._prio.get(key)
        if old is not None and old <= prio:
            return
        if old is not None:
            self._depth[old] -= 1  # its entry in the other deque is now stale
        else:
            self._since[key] = time.monotonic()
        self._prio[key] = prio
        self._depth[prio] += 1
        self._ready[prio].append(key)
        self._report_depth()

    def _report_depth(self) -> None:
        if self.metrics is not None:
            for p, name in enumerate(PRIORITY_NAMES):
                self.metrics.queue_depth(name, self._depth[p])

    def depth(self) -> int:
        with self._cv:
            return len(self._prio)

    def add(self, key: Key, delay: float = 0.0, resync: bool = False) -> None:
        """Queue `key`: now, or after `delay` seconds (and never before its error backoff ends). `resync`: the
        periodic pass, which waits behind every event-driven key."""
        with self._cv:
            self.known.add(key)
            delay = max(delay, self._not_before.get(key, 0.0) - time.monotonic())  # a key in error backoff
            if delay > 0:
                heapq.heappush(self._delayed, (time.monotonic() + delay, key))
            elif key in self._processing:
                self._again.add(key)
            else:
                self._make_ready(key, RESYNC if resync else EVENT)
            self._cv.notify()

    def forget(self, key: Key) -> None:
        with self._cv:
            self.known.discard(key)
            self._failures.pop(key, None)
            self._not_before.pop(key, None)

    def retry_after(self, key: Key, base_s: float, max_s: float) -> float:
        """One more failure of `key`: how long it now waits (base·2^(failures-1), at most max_s)."""
        with self._cv:
            n = self._failures.get(key, 0) + 1
            self._failures[key] = n
            wait = min(max_s, base_s * 2 ** (n - 1))
            self._not_before[key] = time.monotonic() + wait
            return wait

    def succeeded(self, key: Key) -> None:
        """A reconcile of `key` went through: its error backoff starts again from the base."""
        with self._cv:
            self._failures.pop(key, None)
            self._not_before.pop(key, None)

    def failures(self, key: Key) -> int:
        with self._cv:
            return self._failures.get(key, 0)

    def get(self, timeout: float = 1.0) -> Key | None:
        with self._cv:
            deadline = time.monotonic() + timeout
            while not self._closed:
                now = time.monotonic()
                while self._delayed and self._delayed[0][0] <= now:
                    _, key = heapq.heappop(self._delayed)
                    if key in self._processing:
                        self._again.add(key)
                    else:
                        self._make_ready(key, EVENT)
                key = self._pop()
                if key is not None:
                    return key
                if now >= deadline:
                    return None
                wait = deadline - now
                if self._delayed:
                    wait = min(wait, max(0.0, self._delayed[0][0] - now))
                self._cv.wait(wait)
            return None

    def _pop(self) -> Key | None:
        """Under the lock: the next key, event-driven ones first; marks it processing."""
        for prio, dq in enumerate(self._ready):
            while dq:
                key = dq.popleft()
                if self._prio.get(key) != prio:
                    continue  # stale: promoted to events, or taken already
                del self._prio[key]
                self._depth[prio] -= 1
                waited = time.monotonic() - self._since.pop(key, time.monotonic())
                if self.metrics is not None:
                    self.metrics.queue_latency(PRIORITY_NAMES[prio], waited)
                self._report_depth()
                self._processing.add(key)
                return key
        return None

    def done(self, key: Key) -> None:
        with self._cv:
            self._processing.discard(key)
            if key in self._again:
                self._again.discard(key)
                self._make_ready(key, EVENT)
                self._cv.notify()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()


class Workers:
    """`n` threads running `work(key)`; `work` returns False to forget the key, raises to retry later.

    Built once; `start()` runs the threads (a leader-election follower never calls it),
    `stop()` asks them to finish, `join()` waits for the in-flight reconciles, `dead()`
    names the started threads that are no longer running (for the liveness probe).
    """

    def __init__(self, queue: WorkQueue, work: Callable[[Key], bool], n: int, resync_s: float,
                 on_error: Callable[[Key, BaseException], float]):
        self.queue, self.work, self.on_error = queue, work, on_error
        self.resync_s = resync_s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._started = False
        self._threads = [threading.Thread(target=self._loop, name=f"copd-worker-{i}", daemon=True) for i in range(n)]
        self._threads.append(threading.Thread(target=self._resync, name="copd-resync", daemon=True))

    @property
    def started(self) -> bool:
        return self._started

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def start(self) -> None:
        """Run the threads; once only, and never after stop() (a late leadership callback is a no-op)."""
        with self._lock:
            if self._started or self._stop.is_set():
                return
            for t in self._threads:
                t.start()
            self._started = True  # after the starts: dead() never sees a thread that is about to run

    def stop(self) -> None:
        with self._lock:
            self._stop.set()
            self.queue.close()

    def join(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds in all for the started threads to end; True if they all did."""
        deadline = time.monotonic() + timeout
        with self._lock:
            threads = list(self._threads) if self._started else []
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in threads)

    def dead(self) -> list[str]:
        """Names of the threads that were started and have ended (empty before start())."""
        if not self._started:
            return []
        return [t.name for t in self._threads if not t.is_alive()]

    def _loop(self) -> None:
        while not self._stop.is_set():
            key = self.queue.get(timeout=1.0)
            if key is None:
                continue
            try:
                if not self.work(key):
                    self.queue.forget(key)
            except BaseException as e:  # noqa: BLE001 - a reconcile error must not kill the worker
                self.queue.add(key, delay=self.on_error(key, e))
            finally:
                self.queue.done(key)

    def _resync(self) -> None:
        while not self._stop.wait(self.resync_s):
            for key in list(self.queue.known):
                self.queue.add(key, resync=True)
