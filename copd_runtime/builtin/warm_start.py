"""A short supervised warm start, so that RL on a random-init tiny model starts with some signal."""

from __future__ import annotations

import random

import torch

from copd_runtime.data.examples import Example
from copd_runtime.models.policy import Policy
from copd_runtime.rollout import encode_prompts, forward_logits


def answer_loss(policy: Policy, rows: list[Example]) -> torch.Tensor:
    """Mean teacher-forced cross-entropy on the rows' answer tokens (+EOS).

    Same layout as a rollout, [left-padded prompt | answer | right pad], with the
    prompts encoded like a rollout's (the processor for a VLM, vision tensors included).
    """
    tok = policy.tokenizer
    enc = encode_prompts(policy, rows)
    p_ids, p_mask = enc.pop("input_ids"), enc.pop("attention_mask")
    answers = [tok(e.answer, add_special_tokens=False)["input_ids"] + [policy.eos_id] for e in rows]
    A = max(map(len, answers))
    a_ids = torch.tensor([a + [policy.pad_id] * (A - len(a)) for a in answers])
    a_mask = torch.tensor([[1] * len(a) + [0] * (A - len(a)) for a in answers])
    input_ids = torch.cat([p_ids, a_ids], 1)
    mask = torch.cat([p_mask, a_mask], 1)
    labels = torch.cat([torch.full_like(p_ids, -100), a_ids.masked_fill(a_mask == 0, -100)], 1)
    logits = forward_logits(policy, input_ids, mask, enc)
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
    )


def sft_warm_start(
    policy: Policy, examples: list[Example], steps: int, lr: float = 3e-3, batch: int = 32, seed: int = 0
) -> list[float]:
    """`answer_loss` minimised with AdamW on random batches. Returns the loss curve."""
    rng = random.Random(seed)
    opt = torch.optim.AdamW(policy.model.parameters(), lr=lr, weight_decay=0.0)
    policy.model.train()
    losses = []
    for _ in range(steps):
        rows = rng.sample(examples, min(batch, len(examples)))
        loss = answer_loss(policy, rows)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    policy.model.eval()
    return losses
