"""Bad runtime input is refused before any work: one line naming the spec field and the path, exit 2."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from copd_core.spec import parse_manifest
from copd_runtime.preflight import check_inputs
from tests import ROOT

COPD = str(ROOT / ".venv/bin/copd")


def manifest(tmp: Path, base: str = "builtin://tiny-qwen3", datasets: list[dict] | None = None,
             kind: str = "auto") -> Path:
    datasets = datasets or [{"builtin": "arith"}, {"builtin": "reverse"}]
    doc = {"apiVersion": "copd.io/v1alpha1", "kind": "CoPDRun", "metadata": {"name": "bad"},
           "spec": {"baseModel": {"uri": base, "kind": kind},
                    "branches": [{"name": f"b{i}", "dataset": d} for i, d in enumerate(datasets)]}}
    p = tmp / "copdrun.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


def good_jsonl(tmp: Path, name: str = "good.jsonl") -> str:
    p = tmp / name
    p.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    return str(p)


def model_dir(tmp: Path, drop: str = "", config: str | None = None, vlm: bool = False) -> str:
    d = tmp / "model"
    d.mkdir()
    cfg = {"model_type": "qwen3"} | ({"vision_config": {}} if vlm else {})
    files = {"config.json": config if config is not None else json.dumps(cfg),
             "model.safetensors": "x", "tokenizer.json": "{}"}
    for name, text in files.items():
        if name != drop:
            (d / name).write_text(text)
    return str(d)


def _bad_jsonl(text: str):
    def make(tmp: Path) -> tuple[Path, str]:
        p = tmp / "data.jsonl"
        p.write_text(text)
        return manifest(tmp, datasets=[{"path": str(p)}, {"builtin": "arith"}]), "spec.branches[0].dataset.path"
    return make


def _missing_image(tmp: Path):
    p = tmp / "img.jsonl"
    p.write_text('{"prompt": "<image>?", "answer": "red", "images": ["pics/none.png"]}\n')
    return manifest(tmp, datasets=[{"builtin": "arith"}, {"path": str(p)}]), "spec.branches[1].dataset.path"


def _non_utf8(tmp: Path):
    p = tmp / "latin.jsonl"
    p.write_bytes(b'{"prompt": "caf\xe9", "answer": "x"}\n')
    return manifest(tmp, datasets=[{"path": str(p)}, {"builtin": "arith"}]), "spec.branches[0].dataset.path"


CASES = {
    "dataset file missing": lambda t: (manifest(t, datasets=[{"path": str(t / "nope.jsonl")}, {"builtin": "arith"}]),
                                       "spec.branches[0].dataset.path"),
    "dataset is a directory": lambda t: (manifest(t, datasets=[{"builtin": "arith"}, {"path": str(t)}]),
                                         "spec.branches[1].dataset.path"),
    "malformed JSONL line": _bad_jsonl('{"prompt": "a", "answer": "b"}\n{"prompt": "c", "answer"\n'),
    "record without answer": _bad_jsonl('{"prompt": "a"}\n'),
    "empty dataset": _bad_jsonl("\n\n"),
    "image file missing": _missing_image,
    "not UTF-8": _non_utf8,
    "eval file missing": lambda t: (manifest(t, datasets=[{"path": good_jsonl(t), "evalPath": "missing.jsonl"},
                                                          {"builtin": "arith"}]),
                                    "spec.branches[0].dataset.evalPath"),
    "model directory missing": lambda t: (manifest(t, base=str(t / "no-model")), "spec.baseModel.uri"),
    "model without config.json": lambda t: (manifest(t, base=model_dir(t, drop="config.json")), "spec.baseModel.uri"),
    "config.json not JSON": lambda t: (manifest(t, base=model_dir(t, config="{oops")), "spec.baseModel.uri"),
    "model without weights": lambda t: (manifest(t, base=model_dir(t, drop="model.safetensors")),
                                        "spec.baseModel.uri"),
    "model without tokenizer": lambda t: (manifest(t, base=model_dir(t, drop="tokenizer.json")),
                                          "spec.baseModel.uri"),
    "VLM without processor": lambda t: (manifest(t, base=f"file://{model_dir(t, vlm=True)}"), "spec.baseModel.uri"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_copd_run_refuses_bad_input_with_one_line(case, tmp_path):
    path, field = CASES[case](tmp_path)
    out = tmp_path / "out"
    r = subprocess.run([COPD, "run", str(path), "--output", str(out), "--no-live"], capture_output=True, text=True,
                       timeout=600)  # a hang guard, not a speed check: importing torch takes minutes on a loaded machine
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith(f"invalid input: {field}: "), lines[0]
    assert not (out / "status.json").exists(), "refused before any work"


def test_good_inputs_pass(tmp_path):
    m = parse_manifest(yaml.safe_load(manifest(tmp_path, base=model_dir(tmp_path), datasets=[
        {"path": good_jsonl(tmp_path)}, {"path": "rel.jsonl", "evalPath": good_jsonl(tmp_path, "e.jsonl")}]
    ).read_text()))
    (tmp_path / "rel.jsonl").write_text('{"prompt": "x", "answer": 1}\n')
    assert check_inputs(m.spec, tmp_path) == []


def test_only_the_named_branches_are_checked(tmp_path):
    m = parse_manifest(yaml.safe_load(manifest(tmp_path, datasets=[
        {"path": good_jsonl(tmp_path)}, {"path": str(tmp_path / "missing.jsonl")}]).read_text()))
    assert [p.field for p in check_inputs(m.spec, tmp_path)] == ["spec.branches[1].dataset.path"]
    assert check_inputs(m.spec, tmp_path, branches=["b0"]) == []


@pytest.mark.parametrize("argv", [
    ["stage", "--branch", "b0", "--cycle", "1", "--stage", "RL"],
    ["diagnose", "--cycle", "1"],
    ["merge"],
    ["hub", "--cycle", "1", "--port", "0"],
])
def test_pod_entry_points_refuse_bad_input_with_an_invalid_input_report(argv, tmp_path):
    """In a pod the report is the termination message: the operator fails the run with reason InvalidInput
    (exit 2 is a FailJob rule, so the Job is not retried)."""
    path = manifest(tmp_path, datasets=[{"path": "missing.jsonl"}, {"builtin": "reverse"}])
    storage, rep = tmp_path / "storage", tmp_path / "termination-log"
    storage.mkdir()
    r = subprocess.run([COPD, *argv, "--manifest", str(path), "--storage", str(storage), "--report-file", str(rep)],
                       capture_output=True, text=True, timeout=600)  # a hang guard, not a speed check: importing torch takes minutes on a loaded machine
    assert r.returncode == 2, (r.returncode, r.stderr)
    report = json.loads(rep.read_text())
    assert report["failed"] and report["reason"] == "InvalidInput"
    assert report["field"] == "spec.branches[0].dataset.path" and "no such file" in report["message"]
