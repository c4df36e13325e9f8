"""The CPU arithmetic the science numbers are computed with, fixed so that another machine gets them.

A job is deterministic on one machine (its seed, the shipped base, one torch thread), but two
libraries pick their kernels by the processor at hand, and a kernel of another vector width sums in
another order: the last bit differs, a sampled token flips sooner or later, and the run diverges.

- MKL (every GEMM) picks a code path per processor model. `MKL_CBWR=COMPATIBLE` is MKL's Conditional
  Numerical Reproducibility on its SSE2 branch without the approximate rcpps/rsqrtps instructions,
  the one branch MKL documents for Intel and Intel-compatible (AMD) processors alike; the ISA-named
  branches (AVX2, AVX512, ...) hold only on Intel processors that have that ISA and fall back to
  MKL's automatic choice elsewhere.
- ATen (softmax, log-softmax, attention, ...) picks AVX-512, AVX2 or plain kernels by the CPU's
  flags. `ATEN_CPU_CAPABILITY=avx2` caps it at AVX2, which every x86-64 server processor since 2013
  (Intel Haswell, AMD Zen) has.

Both are read when torch first computes, so `pin()` must run before torch is imported.
`describe()` records what the jobs ran with (comparison.json's `kernels`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

PIN = {"MKL_CBWR": "COMPATIBLE", "ATEN_CPU_CAPABILITY": "avx2"}
# what torch reports for ATen's pinned capability (torch.backends.cpu.get_cpu_capability())
PINNED_CAPABILITY = "AVX2"


def pin() -> None:
    """Set PIN in this process's environment (inherited by its workers). Before torch loads."""
    if "torch" in sys.modules:
        raise RuntimeError("experiments.compare.kernels.pin() must run before torch is imported: "
                           "MKL and ATen read their settings when torch first computes")
    os.environ.update(PIN)


def describe() -> dict:
    """What chose this process's CPU kernels: the numbers agree to the digit only where `pinned` is true."""
    import torch

    fields = {}
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        if not line.strip():
            break
        k, _, v = line.partition(":")
        fields[k.strip()] = v.strip()
    capability = torch.backends.cpu.get_cpu_capability()
    mkl = os.environ.get("MKL_CBWR", "AUTO")
    return {"mkl_cbwr": mkl, "aten_cpu_capability": capability, "torch": torch.__version__,
            "cpu": fields.get("model name"), "cpu_vendor": fields.get("vendor_id"),
            "pinned": mkl == PIN["MKL_CBWR"] and capability == PINNED_CAPABILITY}
