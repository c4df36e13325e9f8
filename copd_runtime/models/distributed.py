"""Data parallel training across processes: DeepSpeed ZeRO under `torchrun`.

The operator starts `torchrun --nproc-per-node=<GPUs of the pod>` (and `--nnodes` with a c10d
rendezvous for trainer.nodes > 1); every process is one rank with one device
(`models.device`). Each rank samples and scores its own share of a step's prompts (whole
GRPO groups: a group's advantages need only its own rewards) and runs the same clipped
update on its rows; `ZeroOptimizer` wraps DeepSpeed's engine, which averages the gradients
across ranks and shards the optimizer state (ZeRO-2) and also the weights (ZeRO-3) — the
stage is `spec.trainer.zeroStage`. In bf16 DeepSpeed keeps the
fp32 master weights inside its sharded optimizer. Under ZeRO-3 every forward is a
collective (each module gathers its weights), so every rank runs the same passes
(`rollout` runs the LM head through its module and generates with `synced_gpus`), and a
checkpoint's Hugging Face weights are gathered onto rank 0 (`full_state_dict`).

The update equals the single-process one: every rank divides its token sum by the whole
mini-batch's token count (an all-reduce) times the world size (DeepSpeed averages), and
every rank runs the same number of micro-batches (a rank short of rows runs a zero-weight
one), because each backward ends in collective reductions.

On a CPU, `DS_ACCELERATOR=cpu` and the gloo backend run the same code (the tests do).
"""

from __future__ import annotations

import atexit
import os
from pathlib import Path

import torch
import torch.distributed as dist

from copd_runtime.models.device import Placement

CHECKPOINT_TAG = "zero"


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def wanted_world_size() -> int:
    """What torchrun asked for (WORLD_SIZE), before any process group exists."""
    v = os.environ.get("WORLD_SIZE", "").strip()
    return int(v) if v else 1


def init(place: Placement) -> None:
    """Join the process group torchrun set up (nccl on CUDA, gloo on CPU); once per process."""
    if wanted_world_size() <= 1 or dist.is_initialized():
        return
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if place.is_cuda else "gloo")
    atexit.register(_leave)


def _leave() -> None:
    """At this process's exit: destroy its process group. Left to the interpreter's teardown, the
    group's background threads are destroyed still running, and C++ aborts the process ("terminate
    called without an active exception", SIGABRT): a rank that finished first then exits with -6 and
    torchrun kills its peers, though all the work was done."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - at exit, nothing to do about a failed teardown
            pass


def all_sum(x: float | torch.Tensor) -> torch.Tensor:
    """The sum over ranks (a float64 tensor on the CPU for gloo, or x's device)."""
    t = torch.as_tensor(x, dtype=torch.float64).clone()
    if world_size() > 1:
        dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        t = t.to(dev)
        dist.all_reduce(t)
    return t.cpu()


def all_max(x: int) -> int:
    t = torch.tensor([x], dtype=torch.int64)
    if world_size() > 1:
        dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        t = t.to(dev)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def share(items: list, of_rank: int | None = None, ranks: int | None = None) -> list:
    """This rank's share of a list every rank holds alike: items r, r+W, r+2W, ..."""
    r = rank() if of_rank is None else of_rank
    w = world_size() if ranks is None else ranks
    return items[r::w]


# ZeRO-3 keeps parameters of at most this many elements whole on every rank (DeepSpeed's own
# default, 1e5, when unset); COPD_ZERO3_PERSISTENCE_THRESHOLD=0 partitions every one (the CPU tests
# use it: a tiny model's weights would all stay whole otherwise)
PERSISTENCE_ENV = "COPD_ZERO3_PERSISTENCE_THRESHOLD"


def ds_config(zero_stage: int, bf16: bool, world: int) -> dict:
    zero = {"stage": zero_stage, "overlap_comm": False, "contiguous_gradients": True}
    if zero_stage == 3 and os.environ.get(PERSISTENCE_ENV, "").strip():
        zero["stage3_param_persistence_threshold"] = int(os.environ[PERSISTENCE_ENV])
    return {
        "train_micro_batch_size_per_gpu": 1,  # the trainer forms its own micro-batches (rl.microBatchTokens)
        "gradient_accumulation_steps": 1,  # and marks the accumulation boundary itself
        "train_batch_size": world,
        "gradient_clipping": 1.0,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


class ZeroOptimizer:
    """What `recipes.grpo.policy_update` needs from an optimizer, over a DeepSpeed engine:
    `backward(loss, boundary)` (the engine's backward; `boundary` on the last micro-batch
    of a mini-batch), `step`, `zero_grad`, `clip_grad_norm_` (the engine clips at 1.0),
    `param_groups`, and `save`/`load` of the sharded state."""

    def __init__(self, model: torch.nn.Module, lr: float, zero_stage: int, bf16: bool):
        import deepspeed

        if zero_stage not in (2, 3):
            raise ValueError(f"trainer.zeroStage {zero_stage}: the trainer runs DeepSpeed ZeRO stage 2 or 3")
        self.zero_stage = zero_stage
        params = [p for p in model.parameters() if p.requires_grad]
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=torch.optim.AdamW(params, lr=lr, weight_decay=0.0),
            config=ds_config(zero_stage, bf16, world_size()))

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.engine.zero_grad()

    def backward(self, loss: torch.Tensor, boundary: bool) -> None:
        # What the engine's own forward does first (the trainer calls the model's modules directly):
        # without it ZeRO-3 never advances its micro-step and each micro-batch's gradient would
        # replace the previous one's instead of adding to it
        self.engine.optimizer.clear_backward_seen_flag()
        self.engine.set_gradient_accumulation_boundary(boundary)
        self.engine.backward(loss)

    def clip_grad_norm_(self, max_norm: float) -> None:
        return None  # gradient_clipping in the engine's config

    def step(self) -> None:
        self.engine.step()

    def save(self, directory: Path) -> None:
        """Every rank writes its shard (a collective: all ranks call it with the same directory)."""
        self.engine.save_checkpoint(str(directory), tag=CHECKPOINT_TAG)

    def full_state_dict(self) -> dict | None:
        """ZeRO-3: the whole model's weights (in the model's dtype) gathered layer by layer onto rank 0's
        CPU, as a state dict there, None on the other ranks (a collective: every rank calls it). ZeRO-2
        (every rank holds the whole model): None, the model's own state dict is whole."""
        if self.zero_stage != 3:
            return None
        return self.engine._zero3_consolidated_16bit_state_dict()  # what transformers' own integration calls

    def load(self, directory: Path) -> None:
        self.engine.load_checkpoint(str(directory), tag=CHECKPOINT_TAG, load_module_strict=True,
                                    load_optimizer_states=True, load_lr_scheduler_states=False)
