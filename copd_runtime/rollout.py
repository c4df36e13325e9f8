"""Sampling responses and scoring tokens, for text LMs and VLMs alike.

A `Rollout` holds N sequences laid out as [left-padded prompt | response | right pad],
the behaviour log-probs recorded while sampling, and the vision tensors (if any)
that every forward pass over these sequences needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from copd_runtime.data.examples import Example
from copd_runtime.maths.losses import token_logprobs_B_T
from copd_runtime.models.policy import Policy
from copd_runtime.models.vlm import (
    encode_vlm_prompts,
    mask_vision_logits,
    mm_token_type_ids,
    vision_token_ids,
)


@dataclass
class Rollout:
    examples: list[Example]
    input_ids: torch.Tensor  # [N, L] long
    attention_mask: torch.Tensor  # [N, L] long
    response_mask: torch.Tensor  # [N, L] float: 1 on sampled tokens (EOS included)
    old_logprobs: torch.Tensor  # [N, L] float: behaviour log-probs, 0 elsewhere
    truncated: torch.Tensor  # [N] bool: hit max_new_tokens without EOS
    responses: list[str]
    vision: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, rows: list[int]) -> Rollout:
        idx = torch.tensor(rows, dtype=torch.long)
        return Rollout(
            examples=[self.examples[i] for i in rows],
            input_ids=self.input_ids[idx],
            attention_mask=self.attention_mask[idx],
            response_mask=self.response_mask[idx],
            old_logprobs=self.old_logprobs[idx],
            truncated=self.truncated[idx],
            responses=[self.responses[i] for i in rows],
            vision=select_vision(self.vision, self.examples, rows),
        )


def select_vision(vision: dict[str, torch.Tensor], examples: list[Example], rows: list[int]):
    """Pick the vision tensors of some rows. Patches are packed row after row, so
    each row's share of `pixel_values*` is prod(grid_thw) per image/video."""
    if not vision:
        return {}
    out = {}
    for pix, grid in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
        if grid not in vision:
            continue
        g = vision[grid]
        per_item = g.prod(-1).tolist()
        counts = [len(e.images) if grid == "image_grid_thw" else int(bool(e.video)) for e in examples]
        item_start, patch_start = [], []
        i = p = 0
        for c in counts:
            item_start.append(i)
            patch_start.append(p)
            p += sum(per_item[i : i + c])
            i += c
        items, patches = [], []
        for r in rows:
            c = counts[r]
            items.extend(range(item_start[r], item_start[r] + c))
            n = sum(per_item[item_start[r] : item_start[r] + c])
            patches.extend(range(patch_start[r], patch_start[r] + n))
        out[grid] = g[torch.tensor(items, dtype=torch.long)]
        out[pix] = vision[pix][torch.tensor(patches, dtype=torch.long)]
    return out


def encode_prompts(policy: Policy, examples: list[Example]) -> dict[str, torch.Tensor]:
    """Left-padded prompt ids (+ vision tensors for a VLM)."""
    if policy.is_vlm:
        return encode_vlm_prompts(policy.processor, examples)
    tok = policy.tokenizer
    tok.padding_side = "left"
    return dict(tok([e.prompt for e in examples], return_tensors="pt", padding=True, add_special_tokens=False))


def _position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def forward_logits(policy: Policy, input_ids, attention_mask, vision: dict | None = None) -> torch.Tensor:
    """Logits [N, L, V]. Text models get explicit position ids (left padding).
    VLMs compute their own multimodal (M-RoPE) positions from the ids, the attention
    mask (pads on either side are skipped) and the grids, given the token types;
    a VLM batch without media gets the text position ids. VLM logits of the vision
    special tokens are masked (the policy never emits them)."""
    kwargs = dict(vision or {})
    if not policy.is_vlm:
        kwargs["position_ids"] = _position_ids(attention_mask)
        return policy.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs).logits
    cfg = policy.model.config
    if "image_grid_thw" in kwargs or "video_grid_thw" in kwargs:
        kwargs["mm_token_type_ids"] = mm_token_type_ids(cfg, input_ids)
    else:
        kwargs["position_ids"] = _position_ids(attention_mask)
    logits = policy.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs).logits
    return mask_vision_logits(cfg, logits)


def sequence_logprobs(policy: Policy, r: Rollout, temperature: float) -> torch.Tensor:
    """log π(token_j | tokens_<j) at every position j ≥ 1 (position 0 gets 0)."""
    logits = forward_logits(policy, r.input_ids, r.attention_mask, r.vision)
    lp = token_logprobs_B_T(logits[:, :-1], r.input_ids[:, 1:], temperature)
    return torch.nn.functional.pad(lp, (1, 0))


@torch.no_grad()
def sample(
    policy: Policy, examples: list[Example], max_new_tokens: int, temperature: float, greedy: bool = False
) -> Rollout:
    """Sample one response per example (repeat examples for a group). Uses the global torch RNG."""
    policy.model.eval()
    enc = encode_prompts(policy, examples)
    prompt_ids, prompt_mask = enc.pop("input_ids"), enc.pop("attention_mask")
    gen_kwargs = dict(enc)
    if policy.is_vlm:  # token types for M-RoPE; never sample vision special tokens (see forward_logits)
        gen_kwargs["mm_token_type_ids"] = mm_token_type_ids(policy.model.config, prompt_ids)
        gen_kwargs["suppress_tokens"] = list(vision_token_ids(policy.model.config).values())
    out = policy.model.generate(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        **gen_kwargs,
        do_sample=not greedy,
        temperature=temperature if not greedy else None,
        top_k=0 if not greedy else None,
        top_p=1.0 if not greedy else None,
        max_new_tokens=max_new_tokens,
        eos_token_id=policy.eos_id,
        pad_token_id=policy.pad_id,
        output_logits=True,
        return_dict_in_generate=True,
    )
    P = prompt_ids.shape[1]
    gen = out.sequences[:, P:]
    N, R = gen.shape
    # response tokens: up to and including the first EOS
    is_eos = gen == policy.eos_id
    first_eos = torch.where(is_eos.any(1), is_eos.float().argmax(1), torch.full((N,), R))
    resp_mask = (torch.arange(R).unsqueeze(0) <= first_eos.unsqueeze(1)).long()
    resp_mask &= (torch.arange(R).unsqueeze(0) < R).long()
    truncated = ~is_eos.any(1)
    logits = torch.stack(out.logits, dim=1)  # [N, R, V], before temperature
    if policy.is_vlm:
        logits = mask_vision_logits(policy.model.config, logits)
    beh = token_logprobs_B_T(logits, gen, 1.0 if greedy else temperature)
    input_ids = torch.cat([prompt_ids, gen], 1)
    attention_mask = torch.cat([prompt_mask, resp_mask], 1)
    response_mask = torch.cat([torch.zeros_like(prompt_mask), resp_mask], 1).float()
    old = torch.cat([torch.zeros(N, P), beh * resp_mask], 1)
    texts = policy.tokenizer.batch_decode(gen * resp_mask + policy.pad_id * (1 - resp_mask),
                                          skip_special_tokens=True)
    return Rollout(examples, input_ids, attention_mask, response_mask, old, truncated, texts, enc)


@torch.no_grad()
def teacher_scores(policy: Policy, r: Rollout, temperature: float, k: int, query_ids: torch.Tensor | None = None):
    """What the hub returns for one teacher: per token, the teacher's log-prob of the
    sampled token, its top-k ids and log-probs, and (optionally) its log-probs at
    `query_ids` [N, L, Q] (the student's own top-k, for the bucketed KL)."""
    policy.model.eval()
    logits = forward_logits(policy, r.input_ids, r.attention_mask, r.vision)[:, :-1].float()
    logp = torch.log_softmax(logits / temperature, -1)
    pad = torch.nn.functional.pad
    sampled = pad(logp.gather(-1, r.input_ids[:, 1:].unsqueeze(-1)).squeeze(-1), (1, 0))
    top_lp, top_ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
    res = {
        "sampled_logprobs": sampled * r.response_mask,
        "topk_ids": pad(top_ids, (0, 0, 1, 0)),
        "topk_logprobs": pad(top_lp, (0, 0, 1, 0)),
    }
    if query_ids is not None:
        res["query_logprobs"] = pad(logp, (0, 0, 1, 0)).gather(-1, query_ids)
    return res
