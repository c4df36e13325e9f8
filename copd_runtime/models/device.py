"""Where a process's tensors live and in which precision: one device per rank.

`spec.trainer.precision` is `auto | bf16 | fp32`:

- `auto` (the default): bf16 where the process has a CUDA device, fp32 on CPU (the
  tiny CPU demo keeps its fp32 results bit for bit);
- `bf16`: weights and activations in bfloat16 (also on CPU, where torch runs bf16
  kernels; slower there, for tests). A trainer keeps fp32 master weights and fp32
  AdamW state beside the bf16 model (`models.optim`), as DeepSpeed's bf16 mode does;
  the hub, diagnose and evaluation load bf16 weights only;
- `fp32`: everything in float32.

Under `torchrun` each rank takes `cuda:$LOCAL_RANK` (a pod's GPUs, one per process);
`RANK` / `WORLD_SIZE` say which share of the batch a rank trains. TF32 matmuls are on
for CUDA (fp32 master-weight arithmetic and any fp32 model run on tensor cores).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

PRECISIONS = ("auto", "bf16", "fp32")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def precision(self) -> str:
        return "bf16" if self.dtype == torch.bfloat16 else "fp32"

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"


CPU_FP32 = Placement(torch.device("cpu"), torch.float32)


def resolve_precision(precision: str, cuda: bool) -> str:
    """`auto` → bf16 with a CUDA device, fp32 without; `bf16`/`fp32` as given."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {PRECISIONS}")
    if precision == "auto":
        return "bf16" if cuda else "fp32"
    return precision


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name, "")
    return int(v) if v.strip() else default


def placement(precision: str = "auto", device: str | None = None) -> Placement:
    """This process's device and dtype. `device` overrides (`cpu`, `cuda:1`); else
    `cuda:$LOCAL_RANK` when CUDA is available (`COPD_DEVICE=cpu` forces the CPU), else the CPU."""
    local_rank = _env_int("LOCAL_RANK", 0)
    want = device or os.environ.get("COPD_DEVICE") or None
    if want is None:
        want = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(want)
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        enable_tf32()
    dtype = DTYPES[resolve_precision(precision, dev.type == "cuda")]
    return Placement(dev, dtype, rank=_env_int("RANK", 0), local_rank=local_rank,
                     world_size=_env_int("WORLD_SIZE", 1))


def enable_tf32() -> None:
    """TF32 for fp32 matmuls and convolutions on CUDA (Ampere and newer; a no-op elsewhere)."""
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    torch.backends.cudnn.conv.fp32_precision = "tf32"

