"""Seeds derived from names: every random draw of a run is a function of (run seed, where, when).

A step's seed is derived from (run seed, branch, cycle, stage, step), so a resumed
stage replays the samples it would have drawn, and two executors (or the
comparison harness) that take the same step draw the same samples.
"""

from __future__ import annotations

import hashlib


def step_seed(seed: int, *parts) -> int:
    h = hashlib.sha256(":".join(map(str, (seed, *parts))).encode()).digest()
    return int.from_bytes(h[:8], "little") & 0x7FFF_FFFF
