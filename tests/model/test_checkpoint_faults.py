"""Checkpoint faults with the real trainer (`copd stage` on the tiny model): a damaged newest checkpoint
(resume from the previous one, say which), and a storage volume that fills up while a checkpoint is written
(a real tmpfs of limited size in a private mount namespace: the kernel's own ENOSPC)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import yaml

from copd_core.cycle import Stage
from copd_core.spec import parse_manifest
from copd_runtime import checkpoint as ck
from copd_runtime.recipes.stage import run_branch_stage
from tests import ROOT

EXAMPLE = ROOT / "examples" / "copdrun.yaml"


def _doc(rl: int) -> dict:
    doc = yaml.safe_load(EXAMPLE.read_text())
    s = doc["spec"]
    s["branches"] = s["branches"][:2]
    s["schedule"] = {"cycles": 1, "rlStepsPerCycle": rl, "opdStepsPerCycle": 0}
    s["rl"].update(groupSize=4, batchSize=2, maxNewTokens=6)
    s["mergeReadiness"]["minCycles"] = 1
    return doc


def test_a_stage_resumes_from_the_previous_checkpoint_when_the_newest_is_damaged(tmp_path):
    spec = parse_manifest(_doc(rl=6)).spec
    calls = iter(range(100))
    first = run_branch_stage(spec, tmp_path, "arith", 1, Stage.RL, checkpoint_every=2,
                             should_stop=lambda: next(calls) == 4)  # stops at step 4, after a checkpoint
    assert first["step"] == 4 and not first["done"]
    cks = ck.list_checkpoints(tmp_path, "arith")
    assert [c.step for c, _ in cks] == [2, 4]
    weights = cks[-1][1] / "model.safetensors"
    b = bytearray(weights.read_bytes())
    b[len(b) // 2] ^= 0xFF
    weights.write_bytes(bytes(b))

    rep = run_branch_stage(spec, tmp_path, "arith", 1, Stage.RL, checkpoint_every=2)
    assert rep["done"] and rep["step"] == 6
    assert rep["resumed_from"] == "c001-RL-s00002" and rep["resumed_step"] == 2
    assert rep["skipped_checkpoints"] == ["c001-RL-s00004: model.safetensors does not match its SHA-256"]
    assert "resumed from c001-RL-s00002" in rep["message"]
    final = ck.latest_checkpoint(tmp_path, "arith")
    assert final[0].step == 6 and ck.verify_checkpoint(final[1]) is None


DRIVER = textwrap.dedent("""
    import json, os, subprocess, sys
    from pathlib import Path
    storage, m2, m4, py = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    from copd_runtime import checkpoint as ck

    def stage(manifest, report):
        p = subprocess.run([py, "-m", "copd_runtime.cli", "stage", "--manifest", manifest, "--storage",
                            str(storage), "--branch", "arith", "--cycle", "1", "--stage", "RL",
                            "--checkpoint-every", "1", "--report-file", str(report)],
                           capture_output=True, text=True)
        return p.returncode, p.stderr

    rc1, _ = stage(m2, storage.parent / "r1.json")
    cks = ck.list_checkpoints(storage, "arith")
    size = sum(f.stat().st_size for f in cks[-1][1].rglob("*") if f.is_file())
    st = os.statvfs(storage)
    free = st.f_bavail * st.f_frsize
    with open(storage / "filler", "wb") as f:  # leave room for half a checkpoint
        f.write(b"\\0" * max(0, free - size // 2))
    rc2, err = stage(m4, storage.parent / "r2.json")
    os.unlink(storage / "filler")
    left = sorted(p.name for p in (storage / "branches/arith/checkpoints").iterdir())
    newest = ck.latest_checkpoint(storage, "arith")
    print(json.dumps({"rc1": rc1, "rc2": rc2, "stderr": err[-2000:], "size": size, "left": left,
                      "report": json.loads((storage.parent / "r2.json").read_text()),
                      "newest": newest[1].name, "intact": ck.verify_checkpoint(newest[1]) is None}))
""")


def _private_tmpfs_works() -> bool:
    if not shutil.which("unshare"):
        return False
    p = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt || "
                        "mount -t tmpfs -o size=1m tmpfs /tmp"], capture_output=True)
    return p.returncode == 0


@pytest.mark.slow
def test_storage_full_while_checkpointing_keeps_the_previous_checkpoint_and_reports_storage_full(tmp_path):
    if not _private_tmpfs_works():
        pytest.skip("no unprivileged private mount namespace here (unshare -rm + tmpfs); "
                    "tests/unit/runtime/test_checkpoint.py injects ENOSPC instead")
    mnt = tmp_path / "volume"
    mnt.mkdir()
    storage = mnt / "copd"
    m2, m4 = tmp_path / "m2.yaml", tmp_path / "m4.yaml"
    m2.write_text(yaml.safe_dump(_doc(rl=2)))
    m4.write_text(yaml.safe_dump(_doc(rl=4)))
    (tmp_path / "driver.py").write_text(DRIVER)
    py = sys.executable
    script = (f"mount -t tmpfs -o size=64m tmpfs {mnt} && mkdir {storage} && "
              f"exec {py} {tmp_path / 'driver.py'} {storage} {m2} {m4} {py}")
    p = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["rc1"] == 0
    assert out["rc2"] == 3, out  # EXIT_STORAGE_FULL: the Job fails at once (podFailurePolicy)
    rep = out["report"]
    assert rep["failed"] and rep["reason"] == "StorageFull", rep
    assert "no space left" in rep["message"] and "c001-RL-s00003" in rep["message"]
    assert "c001-RL-s00002 is intact" in rep["message"]
    assert "storage full:" in out["stderr"] and "Traceback" not in out["stderr"]
    assert out["newest"] == "c001-RL-s00002" and out["intact"]
    assert not [n for n in out["left"] if n.startswith(".tmp")], out["left"]  # no partial directory


def test_a_storage_that_went_further_than_the_run_is_refused_not_rerun(tmp_path):
    """A checkpoint from a later stage (another run's storage, or a second writer) would never be the
    newest after this stage ran again, and a runner reading progress from it would repeat the stage
    forever: the stage refuses, naming the checkpoint and the way out."""
    spec = parse_manifest(_doc(rl=2)).spec
    run_branch_stage(spec, tmp_path, "arith", 1, Stage.RL)
    (_, ahead), = ck.list_checkpoints(tmp_path, "arith")
    shutil.copytree(ahead, ahead.with_name("c002-RL-s00002"))
    later = ahead.with_name("c002-RL-s00002")
    state = json.loads((later / "state.json").read_text())
    (later / "state.json").write_text(json.dumps({**state, "cycle": 2}))
    ck.write_manifest(later)
    with pytest.raises(ck.StorageAhead, match=r"holds checkpoint c002-RL-s00002, from after the stage this run is at \(cycle 1 RL\)"):
        run_branch_stage(spec, tmp_path, "arith", 1, Stage.RL)
    assert run_branch_stage(spec, tmp_path, "arith", 2, Stage.RL)["done"]  # the stage it is at runs as before

    # `copd stage` (a trainer pod): a reason and exit 2, so the Job fails at once (podFailurePolicy) and
    # the operator fails the branch instead of retrying into the same checkpoints
    manifest, report = tmp_path / "m.yaml", tmp_path / "report.json"
    manifest.write_text(yaml.safe_dump(_doc(rl=2)))
    p = subprocess.run([sys.executable, "-m", "copd_runtime.cli", "stage", "--manifest", str(manifest), "--storage",
                        str(tmp_path), "--branch", "arith", "--cycle", "1", "--stage", "RL", "--report-file", str(report)],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    rep = json.loads(report.read_text())
    assert rep["failed"] and rep["reason"] == "StorageAhead" and "c002-RL-s00002" in rep["message"], rep
    assert "storage ahead of the run" in p.stderr and "Traceback" not in p.stderr

    # `copd run` (one machine) stops with the message, no traceback, and does not loop
    p = subprocess.run([sys.executable, "-m", "copd_runtime.cli", "run", str(manifest), "--output", str(tmp_path),
                        "--no-live"], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert p.returncode == 2, (p.stdout[-2000:], p.stderr[-2000:])
    assert "storage ahead of the run" in p.stderr and "c002-RL-s00002" in p.stderr and "Traceback" not in p.stderr
