"""`rollout.engine: vllm` where vLLM cannot run: the pod entry points refuse it with one line naming the
field, exit 2 and an InvalidInput report (the operator fails the run with the reason, no retries);
`copd run` on one machine refuses it too. vllm is not installed in this venv."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from tests import ROOT

COPD = str(ROOT / ".venv/bin/copd")


def manifest(tmp: Path) -> Path:
    doc = yaml.safe_load((ROOT / "examples/copdrun.yaml").read_text())
    doc["spec"]["rollout"] = {"engine": "vllm"}
    p = tmp / "copdrun.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


def test_the_reason_names_the_missing_package():
    # a fresh process: tests/model/test_vllm_conversion.py puts vLLM's classes on this one's path
    r = subprocess.run([str(ROOT / ".venv/bin/python"), "-c",
                        "from copd_runtime.vllm_engine import unavailable; print(unavailable())"],
                       capture_output=True, text=True, timeout=300, check=True)
    assert "vllm is not installed" in r.stdout and "--extra gpu" in r.stdout


@pytest.mark.parametrize("argv", [
    ["stage", "--branch", "arith", "--cycle", "1", "--stage", "RL"],
    ["hub", "--cycle", "1", "--port", "0"],
])
def test_pod_entry_points_refuse_vllm_without_it_as_invalid_input(argv, tmp_path):
    storage, rep = tmp_path / "storage", tmp_path / "termination-log"
    storage.mkdir()
    r = subprocess.run([COPD, *argv, "--manifest", str(manifest(tmp_path)), "--storage", str(storage),
                        "--report-file", str(rep)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    report = json.loads(rep.read_text())
    assert report["failed"] and report["reason"] == "InvalidInput" and report["field"] == "spec.rollout.engine"
    assert report["message"].startswith("spec.rollout.engine: vllm: vllm is not installed")
    assert "Traceback" not in r.stderr
    assert list(storage.iterdir()) == []  # refused before any work: nothing written


def test_copd_run_refuses_vllm(tmp_path):
    r = subprocess.run([COPD, "run", str(manifest(tmp_path)), "--output", str(tmp_path / "out"), "--no-live"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "spec.rollout.engine: vllm: `copd run` (one machine) samples with the hf engine" in r.stderr
    assert "Traceback" not in r.stderr
