"""Checkpoints: verified on load (a damaged newest one is moved aside and the previous one used), and an
out-of-space write leaves the previous checkpoint intact and says so (StorageFull)."""

from __future__ import annotations

import errno
import json

import pytest
import torch

from copd_runtime import checkpoint as ck
from copd_runtime.builtin.tiny_text import build_tiny_qwen3


@pytest.fixture(scope="module")
def policy():
    return build_tiny_qwen3(seed=0, warm_steps=0)


def _save(storage, policy, step, total=10):
    opt = torch.optim.AdamW(policy.model.parameters(), lr=1e-3)
    return ck.save_checkpoint(storage, "a", policy, opt, ck.Counters(1, "RL", step, total), keep=5)


def test_every_checkpoint_has_a_manifest_and_verifies(tmp_path, policy):
    d = _save(tmp_path, policy, 2)
    files = json.loads((d / ck.MANIFEST).read_text())["files"]
    assert {"state.json", "optimizer.pt", "rng.pt", "config.json"} <= set(files)
    assert ck.verify_checkpoint(d) is None
    assert ck.latest_checkpoint(tmp_path, "a")[1] == d


@pytest.mark.parametrize("damage, problem", [
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:-100]), "bytes"),
    (lambda d: _flip(d / "model.safetensors"), "SHA-256"),
    (lambda d: (d / "optimizer.pt").unlink(), "missing"),
    (lambda d: (d / ck.MANIFEST).write_text("{"), "unreadable"),
])
def test_a_damaged_newest_checkpoint_is_moved_aside_and_the_previous_one_used(tmp_path, policy, damage,
                                                                             problem, capsys):
    prev = _save(tmp_path, policy, 2)
    newest = _save(tmp_path, policy, 4)
    damage(newest)
    skipped: list[str] = []
    got = ck.latest_checkpoint(tmp_path, "a", skipped=skipped)
    assert got is not None and got[1] == prev and got[0].step == 2
    assert len(skipped) == 1 and skipped[0].startswith(newest.name) and problem in skipped[0]
    assert not newest.exists() and len(list(newest.parent.glob(f"{ck.CORRUPT_PREFIX}{newest.name}-*"))) == 1
    assert f"{newest.name} is damaged" in capsys.readouterr().err
    assert ck.latest_checkpoint(tmp_path, "a")[1] == prev  # moved aside: not met again


def test_a_damaged_state_json_is_ignored_not_fatal(tmp_path, policy):
    prev = _save(tmp_path, policy, 2)
    newest = _save(tmp_path, policy, 4)
    (newest / "state.json").write_text("{not json")
    assert ck.latest_checkpoint(tmp_path, "a")[1] == prev


def test_only_the_newest_damaged_checkpoint_is_kept(tmp_path, policy):
    for step in (2, 4, 6):
        _save(tmp_path, policy, step)
    for _ in (6, 4):
        _flip(ck.latest_checkpoint(tmp_path, "a")[1] / "model.safetensors")
        ck.latest_checkpoint(tmp_path, "a")
    assert ck.latest_checkpoint(tmp_path, "a")[0].step == 2
    assert len(list((tmp_path / "branches/a/checkpoints").glob(f"{ck.CORRUPT_PREFIX}*"))) == 1


def test_checkpoints_without_a_manifest_are_trusted(tmp_path, policy):
    d = _save(tmp_path, policy, 2)
    (d / ck.MANIFEST).unlink()
    assert ck.verify_checkpoint(d) is None


def test_out_of_space_while_writing_keeps_the_previous_checkpoint_and_names_it(tmp_path, policy, monkeypatch):
    """Injected ENOSPC at the weights writer (tests/model/test_storage_full.py fills a real tmpfs)."""
    prev = _save(tmp_path, policy, 2)
    before = {p.name: p.stat().st_size for p in prev.iterdir()}

    def full(policy, path, *args, **kwargs):
        (path / "model.safetensors").write_bytes(b"\0" * 1000)  # a partial file, then the error
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(ck, "save_policy", full)
    with pytest.raises(ck.StorageFull) as e:
        _save(tmp_path, policy, 4)
    assert e.value.errno == errno.ENOSPC and ck.no_space(e.value)
    msg = str(e.value)
    assert "no space left" in msg and "a/c001-RL-s00004" in msg and f"{prev.name} is intact" in msg
    assert "bytes free" in msg
    root = tmp_path / "branches/a/checkpoints"
    assert sorted(p.name for p in root.iterdir()) == [prev.name]  # no partial dir left behind
    assert {p.name: p.stat().st_size for p in prev.iterdir()} == before and ck.verify_checkpoint(prev) is None


def test_no_space_is_recognised_when_a_library_wraps_it():
    try:
        try:
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        except OSError as inner:
            raise RuntimeError("safetensors: write failed") from inner
    except RuntimeError as e:
        assert ck.no_space(e)
    assert ck.no_space(RuntimeError("[enforce fail] ... No space left on device"))
    assert not ck.no_space(OSError(errno.EACCES, "Permission denied"))


def _flip(path):
    b = bytearray(path.read_bytes())
    b[len(b) // 2] ^= 0xFF
    path.write_bytes(bytes(b))
