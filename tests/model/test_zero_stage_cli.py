"""`copd stage` under torchrun, 2 processes on the CPU (gloo, DS_ACCELERATOR=cpu), as the operator runs it
on a pod with 2 GPUs: DeepSpeed ZeRO-2 and ZeRO-3 (weights partitioned; the checkpoint's Hugging Face
weights gathered onto rank 0), a sharded checkpoint per step, a resume from the sharded state, one
report (global rank 0)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from copd_core.spec import parse_manifest
from copd_runtime.checkpoint import ZERO_DIR, latest_checkpoint, list_checkpoints
from copd_runtime.model_uri import resolve_model_dir
from copd_runtime.models.distributed import PERSISTENCE_ENV
from copd_runtime.models.policy import load_policy
from tests import ROOT

pytest.importorskip("deepspeed")

MANIFEST = {
    "apiVersion": "copd.io/v1alpha1", "kind": "CoPDRun", "metadata": {"name": "zero"},
    "spec": {"baseModel": {"uri": "builtin://tiny-qwen3"},
             "branches": [{"name": "a", "dataset": {"builtin": "arith", "size": 64}},
                          {"name": "b", "dataset": {"builtin": "reverse", "size": 64}}],
             "schedule": {"cycles": 1, "rlStepsPerCycle": 2, "opdStepsPerCycle": 1},
             # a hot sampler: mixed rewards within a group (a uniform group has no signal, no update)
             "rl": {"groupSize": 4, "batchSize": 2, "maxNewTokens": 4, "learningRate": 1e-3, "temperature": 2.0},
             "trainer": {"resources": {"gpu": 2}, "zeroStage": 2}},
}


def _stage(tmp_path, storage):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "COPD_DEVICE": "cpu",
           "PYTHONPATH": str(ROOT), PERSISTENCE_ENV: "0"}  # ZeRO-3: every weight partitioned
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
           "copd_runtime.cli", "stage", "--manifest", str(tmp_path / "run.yaml"), "--storage", str(storage),
           "--branch", "a", "--cycle", "1", "--stage", "RL", "--checkpoint-every", "1",
           "--report-file", str(tmp_path / "report.json")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)  # hang guard
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    reports = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"branch"')]
    assert len(reports) == 1, proc.stdout  # global rank 0 only
    assert json.loads((tmp_path / "report.json").read_text()) == reports[0]
    return reports[0]


@pytest.mark.slow
@pytest.mark.timeout(2700)  # torchrun subprocesses: minutes each on a loaded 2-core machine
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_copd_stage_under_torchrun_checkpoints_sharded_and_resumes(tmp_path, zero_stage):
    storage = tmp_path / "storage"
    manifest = {**MANIFEST, "spec": {**MANIFEST["spec"], "trainer": {"resources": {"gpu": 2},
                                                                      "zeroStage": zero_stage}}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(manifest))
    spec = parse_manifest(manifest).spec
    base = resolve_model_dir(spec.base_model.uri, storage)  # built once, before the ranks start

    rep = _stage(tmp_path, storage)
    assert rep["done"] is True and rep["step"] == 2 and rep["resumed_step"] == 0
    cks = list_checkpoints(storage, "a")
    assert [c.step for c, _ in cks] == [1, 2]
    for _, path in cks:
        assert (path / ZERO_DIR).is_dir() and (path / "config.json").exists()
    records = [json.loads(line) for line in (storage / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]  # one record per step (rank 0), whole-batch figures
    assert all(r["tokens"] > 0 for r in records)
    moved = load_policy(cks[-1][1]).model.state_dict()  # ZeRO-3: the weights gathered onto rank 0, whole
    start = load_policy(base).model.state_dict()
    assert {k: v.shape for k, v in moved.items()} == {k: v.shape for k, v in start.items()}
    updated = any(r["skipped"] == 0.0 for r in records)  # some step had a reward signal
    assert any(not (moved[k] == start[k]).all() for k in start) == updated

    shutil.rmtree(cks[-1][1])  # lose the last step: the next attempt resumes from step 1's sharded state
    rep = _stage(tmp_path, storage)
    assert rep["done"] is True and rep["resumed_step"] == 1 and latest_checkpoint(storage, "a")[0].step == 2
