"""A small run of the fleet benchmark (bench/operator_scale.py) as a regression check: 10 three-branch x
2-cycle runs at once on the KWOK cluster, one operator. Figures are printed, not asserted (timings on a
shared machine): what must hold is that every run completes and the JSON line is complete."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tests.cluster.support import ROOT

KEYS = {"runs", "completed", "wall_s", "apply_to_first_pod_p50_s", "apply_to_first_pod_p99_s",
        "phase_transition_p50_s", "phase_transition_p99_s", "operator_rss_mb", "operator_cpu_s",
        "api_requests_per_run"}


@pytest.mark.cluster
def test_operator_scale_bench_10_runs(cluster):
    p = subprocess.run([sys.executable, "-m", "bench.operator_scale", "--runs", "10", "--timeout", "600"],
                       cwd=ROOT, env=cluster.env, capture_output=True, text=True, timeout=900)
    lines = p.stdout.strip().splitlines()
    assert lines, p.stderr[-4000:]
    res = json.loads(lines[-1])
    print("SCALE", json.dumps(res))
    assert set(res) == KEYS, res
    assert res["runs"] == 10 and res["completed"] == 10, (res, p.stderr[-4000:])
    assert p.returncode == 0, p.stderr[-4000:]
    for k in KEYS - {"runs", "completed"}:
        assert isinstance(res[k], (int, float)) and math.isfinite(res[k]) and res[k] >= 0, (k, res)
    # every run went Pending -> RL -> OPD -> Diagnose (x2) -> Merging: 6 measured transitions each
    assert res["phase_transition_p50_s"] <= res["phase_transition_p99_s"]
    assert res["api_requests_per_run"] > 0


@pytest.mark.cluster
def test_operator_scale_bench_cut_short_still_reports(cluster):
    """A bench stopped before its runs end (here its --timeout, 5 s after the apply) prints what it measured,
    marked partial with the Jobs and transitions it saw, and exits 1."""
    p = subprocess.run([sys.executable, "-m", "bench.operator_scale", "--runs", "4", "--timeout", "5"],
                       cwd=ROOT, env=cluster.env, capture_output=True, text=True, timeout=600)
    lines = p.stdout.strip().splitlines()
    assert lines, p.stderr[-4000:]
    res = json.loads(lines[-1])
    print("SCALE-PARTIAL", json.dumps(res))
    assert p.returncode == 1, p.stderr[-4000:]
    assert KEYS <= set(res) and res["partial"] is True and res["stopped_by"] == "timeout", res
    assert res["completed"] < 4 and res["jobs_expected"] == 4 * 15 and res["transitions_expected"] == 4 * 6
    assert 0 <= res["jobs_done"] < res["jobs_expected"] and res["stopped_after_s"] >= 5
    assert "PARTIAL (timeout" in p.stderr
