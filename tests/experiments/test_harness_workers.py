"""The comparison harness's worker processes end with it (experiments/compare/harness.py).

A killed harness whose workers lived on kept training into the storage directories that the next
invocation starts the same jobs in: two writers on one run's checkpoints. Here the harness is killed
while its two workers train, and both must be gone soon after (polled, not slept).
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def _children(pid: int) -> set[int]:
    kids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            kids.add(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait(cond, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.2)
    return cond()


@pytest.mark.skipif(sys.platform != "linux", reason="workers end with the harness through PR_SET_PDEATHSIG (Linux)")
def test_killing_the_harness_ends_its_workers(tmp_path):
    cfg = yaml.safe_load((ROOT / "examples/compare-conflicting.yaml").read_text())
    cfg["spec"]["seeds"] = [0, 1]
    spec = tmp_path / "compare.yaml"
    spec.write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "experiments.compare", str(spec), "--output", str(tmp_path / "out"),
                             "--no-pilot", "--only", "mixed_rlvr", "--jobs", "2"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # the two pool workers (beside multiprocessing's resource tracker) are up and working
        assert _wait(lambda: len(_children(proc.pid)) >= 3, 120), f"workers never started: {_children(proc.pid)}"
        workers = _children(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)  # no clean-up code of the harness runs
        proc.wait(30)
        assert _wait(lambda: not any(_alive(w) for w in workers), 60), \
            f"workers outlived the harness: {[w for w in workers if _alive(w)]}"
    finally:
        if proc.poll() is None:
            proc.kill()
