"""experiments.compare.kernels: the pinned kernels compute the same bits whatever MKL would pick.

A second processor cannot be had in a test, but MKL can be told to dispatch as on another one
(`MKL_ENABLE_INSTRUCTIONS`: an Intel processor with only AVX2, or only SSE4.2). Unpinned, that changes
the bits (the control below, on an AVX-512 Intel CPU like the machine of record); pinned, it must not.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.compare.kernels import cpu_info

ROOT = Path(__file__).resolve().parents[2]
# MKL as on other processors: its own choice here, an AVX2-only Intel, an SSE4.2-only Intel
DISPATCH = [{}, {"MKL_ENABLE_INSTRUCTIONS": "AVX2"}, {"MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}]


def _flags() -> set[str]:
    return set(cpu_info().get("flags", "").split())


def _run(code_or_module: list[str], env: dict) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("MKL_CBWR", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")}
    res = subprocess.run([sys.executable, *code_or_module], capture_output=True, text=True, timeout=120,
                         cwd=ROOT, env={**clean, **env})
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def test_pin_refuses_once_torch_is_loaded():
    import torch  # noqa: F401

    from experiments.compare.kernels import pin

    with pytest.raises(RuntimeError, match="before torch is imported"):
        pin()


@pytest.mark.skipif(not {"avx2", "fma"} <= _flags(), reason="the pin caps ATen at AVX2: this CPU has no AVX2/FMA")
def test_pinned_fingerprint_is_the_same_whatever_mkl_dispatches_to():
    got = [json.loads(_run(["-m", "experiments.compare.kernels"], env)) for env in DISPATCH]
    assert all(d["pinned"] and d["mkl_cbwr"] == "COMPATIBLE" and d["aten_cpu_capability"] == "AVX2" for d in got), got
    assert len({d["fingerprint"] for d in got}) == 1, [d["fingerprint"] for d in got]
    # and it is the fingerprint the committed comparisons were computed with
    for ref in ("docs/science/comparison.json", "docs/science/conflicting/comparison.json"):
        assert json.loads((ROOT / ref).read_text())["kernels"]["fingerprint"] == got[0]["fingerprint"], ref


@pytest.mark.skipif(not ({"avx512f"} <= _flags() and cpu_info().get("vendor_id") == "GenuineIntel"),
                    reason="the control needs an Intel CPU with AVX-512 (MKL then dispatches differently when restricted)")
def test_control_unpinned_the_dispatch_changes_the_bits():
    code = ["-c", "import torch; from experiments.compare.kernels import fingerprint; print(fingerprint())"]
    prints = {_run(code, env).strip() for env in DISPATCH}
    assert len(prints) == len(DISPATCH), prints
