"""The trainer's optimizer: AdamW, with fp32 master weights when the model is bf16.

An fp32 model gets `torch.optim.AdamW` as it always did (the CPU demo is unchanged).
A bf16 model gets `MasterWeightsAdamW`: an fp32 copy of every trainable parameter
owns the AdamW state; each backward's bf16 gradient is added into an fp32 gradient
as soon as it is accumulated (so micro-batch accumulation sums in fp32), the step
updates the fp32 copies and writes them back to the bf16 model, rounded once. A
learning rate of 1e-6 moves weights by less than a bf16 ulp: an AdamW on bf16
parameters would lose most updates, the master copy keeps them.

Both expose what `recipes.grpo.policy_update` calls: `zero_grad`, `step`,
`param_groups`, `state_dict`/`load_state_dict` and `clip_grad_norm_(max_norm)`.
"""

from __future__ import annotations

import torch


class MasterWeightsAdamW:
    def __init__(self, params, lr: float, weight_decay: float = 0.0):
        self.params = [p for p in params if p.requires_grad]
        self.master = [torch.nn.Parameter(p.detach().float().clone()) for p in self.params]
        self.inner = torch.optim.AdamW(self.master, lr=lr, weight_decay=weight_decay, fused=_fused(self.master))
        self._hooks = [p.register_post_accumulate_grad_hook(self._hook(m)) for p, m in zip(self.params, self.master)]

    @staticmethod
    def _hook(master: torch.Tensor):
        def add(p: torch.Tensor) -> None:
            if master.grad is None:
                master.grad = p.grad.float()
            else:
                master.grad.add_(p.grad)
            p.grad = None

        return add

    @property
    def param_groups(self):
        return self.inner.param_groups

    @property
    def state(self):
        return self.inner.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p, m in zip(self.params, self.master):
            p.grad = None
            m.grad = None

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(self.master, max_norm)

    @torch.no_grad()
    def step(self) -> None:
        self.inner.step()
        torch._foreach_copy_(self.params, self.master)  # one launch per dtype/device group, not one per tensor

    def state_dict(self) -> dict:
        return {"adamw": self.inner.state_dict(), "master": [m.detach() for m in self.master]}

    @torch.no_grad()
    def load_state_dict(self, sd: dict) -> None:
        self.inner.load_state_dict(sd["adamw"])
        for p, m, saved in zip(self.params, self.master, sd["master"], strict=True):
            m.copy_(saved)
            p.copy_(m)


def _fused(params) -> bool | None:
    """torch's fused AdamW kernel on CUDA (one kernel for all parameters; the CPU keeps the default
    implementation, so the CPU demo's numbers do not move)."""
    return True if params and all(p.is_cuda for p in params) else None


def make_optimizer(model: torch.nn.Module, lr: float):
    """AdamW (weight decay 0) on an fp32 model; `MasterWeightsAdamW` on a bf16/fp16 one."""
    params = [p for p in model.parameters() if p.requires_grad]
    if all(p.dtype == torch.float32 for p in params):
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=_fused(params))
    return MasterWeightsAdamW(params, lr=lr, weight_decay=0.0)


def clip_grad_norm(optimizer, model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the gradients the optimizer will step on (its fp32 copies, if it keeps any)."""
    clip = getattr(optimizer, "clip_grad_norm_", None)
    if clip is not None:
        return clip(max_norm)
    return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
