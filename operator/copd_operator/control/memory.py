"""Keep the operator's resident memory close to what its objects use (glibc's allocator).

Measured at 300 runs (bench/operator_scale.py, glibc's mallinfo2 sampled in the operator): the
Python objects needed ~36 MB of malloc'd memory, but glibc held 142 MB, 106 MB of it free. The
operator has ~60 threads (reconcile workers, the write pool, informers, kopf's loop), and glibc
gives threads their own arenas (up to 8 per core) whose freed chunks stay resident, each arena
grown to the high-water mark of the JSON the threads that share it parsed at once.

    limit_arenas(n)      mallopt(M_ARENA_MAX, n): at most n arenas (before the threads start)
    Trimmer(interval_s)  a thread that calls malloc_trim(0) every interval_s: freed pages go back
                         to the kernel (glibc also returns free pages inside an arena, not only its top)

Both are what MALLOC_ARENA_MAX and a periodic trim do for other long-running Python services. Off
glibc (musl, macOS) they do nothing and say so once, at debug level.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import threading

log = logging.getLogger("copd_operator.memory")

M_ARENA_MAX = -8  # glibc's malloc.h


@functools.cache
def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError as e:
        log.debug("no C library to load (%s): the allocator is left as it is", e)
        return None
    if not (hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim")):
        log.debug("not glibc: the allocator is left as it is")
        return None
    return libc


def limit_arenas(n: int) -> bool:
    """At most `n` malloc arenas for the process. Call before starting threads. True if applied."""
    libc = _libc()
    return bool(libc is not None and n > 0 and libc.mallopt(M_ARENA_MAX, n) == 1)


def trim() -> bool:
    """Give free heap pages back to the kernel now. True if glibc released any."""
    libc = _libc()
    return bool(libc is not None and libc.malloc_trim(0))


class Trimmer:
    """malloc_trim(0) every `interval_s` on a daemon thread, until `stop()`."""

    def __init__(self, interval_s: float):
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="copd-malloc-trim", daemon=True)

    def start(self) -> Trimmer:
        if self.interval_s > 0 and _libc() is not None:
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            trim()
