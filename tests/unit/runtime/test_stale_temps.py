"""Temp directories a SIGKILL'd checkpoint writer left behind are removed at the branch's next save or
load; a live writer's (another process holding its lock) and anything not named like ours are kept."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from copd_runtime import checkpoint as ck
from copd_runtime.builtin.tiny_text import build_tiny_qwen3
from copd_runtime.models.policy import writer_lock_path
from tests import ROOT

WRITER = """
import os, signal, sys
from pathlib import Path
from copd_runtime.models.policy import atomic_dir
with atomic_dir(Path(sys.argv[1])) as tmp:
    (tmp / "model.safetensors").write_bytes(b"0" * 1000)
    print(tmp.name, flush=True)
    if sys.argv[2] == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    sys.stdin.readline()  # a live writer: finishes when told
"""


@pytest.fixture(scope="module")
def policy():
    return build_tiny_qwen3(seed=0, warm_steps=0)


def _writer(final, mode):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", WRITER, str(final), mode], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def _dead_writer(final):
    p = _writer(final, "die")
    name = p.stdout.readline().strip()
    assert p.wait(timeout=120) == -9 and name
    return final.parent / name


def _save(storage, policy, step):
    opt = torch.optim.AdamW(policy.model.parameters(), lr=1e-3)
    return ck.save_checkpoint(storage, "a", policy, opt, ck.Counters(1, "RL", step, 10), keep=5)


def test_a_killed_writers_temp_dir_goes_at_the_next_save_and_load_a_live_ones_stays(tmp_path, policy):
    root = tmp_path / "branches/a/checkpoints"
    dead = _dead_writer(root / "c001-RL-s00002")
    assert dead.is_dir() and writer_lock_path(dead).exists()  # what SIGKILL left: the dir and its lock file

    live = _writer(root / "c001-RL-s00003", "live")
    try:
        live_tmp = root / live.stdout.readline().strip()  # it is inside atomic_dir, holding its lock
        assert live_tmp.is_dir() and live_tmp != root

        old_unlocked = root / ".tmp-c001-RL-s00001-sharded"  # a writer from before the locks, long gone
        old_unlocked.mkdir()
        hour_ago = time.time() - 2 * ck.UNLOCKED_STALE_S
        os.utime(old_unlocked, (hour_ago, hour_ago))
        fresh_unlocked = root / ".tmp-c001-RL-s00004-abc123"  # created a moment ago, not yet locked
        fresh_unlocked.mkdir()
        not_ours = [root / ".tmp-notes", root / ".corrupt-c001-RL-s00001-7", root / "tmp-c001-RL-s00001-x"]
        for d in not_ours:
            d.mkdir()
        a_file = root / ".tmp-c001-RL-s00005-file"
        a_file.write_text("a file, not a writer's directory")
        os.utime(a_file, (hour_ago, hour_ago))

        _save(tmp_path, policy, 1)  # the next save of the branch
        assert not dead.exists() and not writer_lock_path(dead).exists()
        assert not old_unlocked.exists()
        assert live_tmp.is_dir() and writer_lock_path(live_tmp).exists()  # the live writer's work is untouched
        assert fresh_unlocked.is_dir() and a_file.exists() and all(d.is_dir() for d in not_ours)
        assert ck.latest_checkpoint(tmp_path, "a")[0].step == 1

        dead2 = _dead_writer(root / "c001-RL-s00006")
        assert dead2.is_dir()
        assert ck.latest_checkpoint(tmp_path, "a")[0].step == 1  # a load cleans too
        assert not dead2.exists() and not writer_lock_path(dead2).exists() and live_tmp.is_dir()

        live.stdin.write("\n")
        live.stdin.flush()
        assert live.wait(timeout=120) == 0
        assert (root / "c001-RL-s00003/model.safetensors").exists()  # it finished: renamed into place
        assert not live_tmp.exists() and not writer_lock_path(live_tmp).exists()
    finally:
        if live.poll() is None:
            live.kill()
            live.wait()


def test_a_lock_file_without_its_directory_is_removed(tmp_path):
    root = tmp_path / "branches/a/checkpoints"
    root.mkdir(parents=True)
    orphan = root / ".tmp-c001-OPD-s00002-q1w2e3.lock"  # killed between removing the dir and its lock
    orphan.write_text("")
    assert ck.remove_stale_temps(tmp_path, "a") == [".tmp-c001-OPD-s00002-q1w2e3"] and not orphan.exists()
