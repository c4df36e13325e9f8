"""`spec.trainer.compile`: regional `torch.compile` of a trainer's model.

Only the model's repeated blocks are compiled (the classes a Hugging Face model lists in
`_no_split_modules`: Qwen3's `Qwen3DecoderLayer`, ...), each block's `forward` replaced by a
compiled one. The blocks share their code, so TorchDynamo traces it once and every block reuses
the graph (the parameters are the graph's inputs); the chunked LM head (`maths.logprobs`) stays
eager. What it buys is fused elementwise work (RMSNorm, rotary, SiLU·up, residual adds), which
eager PyTorch runs as one memory-bound kernel per op: a Qwen3-1.7B-shaped bf16 update went from
28% to 41% MFU on one H200 (`bench/train_step.py --compile`, docs/bench/h200-2026-11-27).

Compiled blocks serve the forward passes of fixed shape: the update (forward and backward) and
π_old. `generate()` calls the blocks with a KV cache and one new token per step, a different
graph at every length, so `eager_blocks` puts the eager `forward` back for the time of a
generation. The first update pays the compilation (12 s for the 1.7B model on an H200); a model
whose shapes change from step to step (the tiny demo's short, varying responses) recompiles more
than it gains (the demo: 43 s eager, 130 s compiled on the H200). Inductor needs a C compiler (the
trainer image has gcc).
"""

from __future__ import annotations

import contextlib

import torch

# every block of one model shares one traced graph per input shape: allow more than torch's
# default number of cached graphs per code object (the update's and π_old's shapes, train/eval)
CACHE_SIZE_LIMIT = 64


def repeated_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks: modules whose class is in its `_no_split_modules`."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def compile_blocks(model: torch.nn.Module) -> int:
    """Replace each repeated block's `forward` by a compiled one; the number of blocks. A model
    that names no repeated blocks is left as it is (0)."""
    blocks = repeated_blocks(model)
    if blocks:
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, CACHE_SIZE_LIMIT)
    for b in blocks:
        if "forward" not in vars(b):  # not compiled yet
            b.forward = torch.compile(b.forward)
    return len(blocks)


@contextlib.contextmanager
def eager_blocks(model: torch.nn.Module):
    """Inside: every compiled block runs its eager `forward` (the class's own)."""
    compiled = [(b, vars(b)["forward"]) for b in repeated_blocks(model) if "forward" in vars(b)]
    for b, _ in compiled:
        del b.forward
    try:
        yield
    finally:
        for b, fwd in compiled:
            b.forward = fwd
