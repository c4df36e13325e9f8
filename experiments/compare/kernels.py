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
`describe()` records what the jobs ran with (comparison.json's `kernels`), with `fingerprint()`: a
hash of the results of the kind of operations the jobs run (GEMMs of the model's shapes forward and
backward, softmax, log-softmax, causal attention, RMS norm, SiLU). Two machines with the same
fingerprint compute those bits alike, a check of seconds before a rerun of minutes:

    python -m experiments.compare.kernels      (prints describe(), pinned as the harness pins)
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
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


def cpu_info() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (`model name`, `vendor_id`, `flags`, ...); {} elsewhere."""
    fields = {}
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        if not line.strip():
            break
        k, _, v = line.partition(":")
        fields[k.strip()] = v.strip()
    return fields


def describe() -> dict:
    """What chose this process's CPU kernels: the numbers agree to the digit only where `pinned` is true."""
    import torch

    fields = cpu_info()
    capability = torch.backends.cpu.get_cpu_capability()
    mkl = os.environ.get("MKL_CBWR", "AUTO")
    return {"mkl_cbwr": mkl, "aten_cpu_capability": capability, "torch": torch.__version__,
            "cpu": fields.get("model name"), "cpu_vendor": fields.get("vendor_id"), "arch": platform.machine(),
            "pinned": mkl == PIN["MKL_CBWR"] and capability == PINNED_CAPABILITY, "fingerprint": fingerprint()}


def fingerprint() -> str:
    """SHA-256 (16 hex) of fixed operations on fixed inputs, on one thread as the jobs run."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(0)
        h = hashlib.sha256()

        def put(t: torch.Tensor) -> None:
            h.update(t.detach().contiguous().numpy().tobytes())

        for m, k, n in [(7, 64, 64), (33, 64, 256), (128, 256, 64), (200, 64, 65), (5, 512, 64)]:
            a = torch.randn(m, k, generator=g, requires_grad=True)
            w = torch.randn(n, k, generator=g, requires_grad=True)
            y = torch.nn.functional.silu(a @ w.T)
            y.square().sum().backward()
            for t in (y, a.grad, w.grad):
                put(t)
        x = torch.randn(4, 37, 65, generator=g)
        put(torch.softmax(x, -1))
        put(torch.log_softmax(x, -1))
        put(x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
        q, kk, v = (torch.randn(2, 4, 37, 16, generator=g) for _ in range(3))
        put(torch.nn.functional.scaled_dot_product_attention(q, kk, v, is_causal=True))
        return h.hexdigest()[:16]
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    pin()
    print(json.dumps(describe(), indent=1))
