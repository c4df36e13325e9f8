"""Sampling responses and scoring tokens, for text LMs and VLMs alike.

A `Rollout` holds N sequences laid out as [left-padded prompt | response | right pad],
the behaviour log-probs π_old, and the vision tensors (if any) that every forward
pass over these sequences needs.

Every log-prob of a response token (π_old, the student update, the hub's teacher
scores, diagnose) goes through one path: the backbone's hidden states at the M
positions that predict a response token, then the LM head over a few of them at a
time (`maths.logprobs`). No [N, L, V] tensor is ever made, and π_old is the
trainer's own forward, not `generate()`'s incremental logits: a teacher with the
student's weights scores the same rows to exactly the same bits.

Under DeepSpeed ZeRO-3 each rank holds only a slice of every weight, and a module's own
call gathers its weights (hooks before its forward, and again before its backward).
The LM head is therefore always run as the output-embedding module's call
(`_through_head`), so the chunked head sees the whole weight in forward and backward;
and `generate()` runs with `synced_gpus` (every rank takes as many forward steps as the
longest, since each forward is a collective).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from copd_runtime.data.examples import Example
from copd_runtime.maths.logprobs import LMHead, scores_M, token_logprobs_M, topk_logprobs_M_K
from copd_runtime.models.compile import eager_blocks
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
    old_logprobs: torch.Tensor  # [N, L] float: π_old of the response tokens, 0 elsewhere
    truncated: torch.Tensor  # [N] bool: hit max_new_tokens without EOS
    responses: list[str]
    vision: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def device(self) -> torch.device:
        return self.input_ids.device

    def to(self, device: torch.device | str) -> Rollout:
        """The same rows with every tensor on `device` (itself when already there)."""
        device = torch.device(device)
        if self.input_ids.device == device:
            return self
        return Rollout(self.examples, self.input_ids.to(device), self.attention_mask.to(device),
                       self.response_mask.to(device), self.old_logprobs.to(device), self.truncated.to(device),
                       self.responses, {k: v.to(device) for k, v in self.vision.items()})

    def select(self, rows: list[int]) -> Rollout:
        idx = torch.tensor(rows, dtype=torch.long, device=self.device)
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
    each row's share of `pixel_values*` is prod(grid_thw) per image/video. A kind of
    media none of the rows has is left out (an empty grid breaks the vision tower)."""
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
        if items:  # rows without any image (video) carry no image (video) tensors at all
            out[grid] = g[torch.tensor(items, dtype=torch.long, device=g.device)]
            out[pix] = vision[pix][torch.tensor(patches, dtype=torch.long, device=g.device)]
    return out


def encode_prompts(policy: Policy, examples: list[Example]) -> dict[str, torch.Tensor]:
    """Left-padded prompt ids (+ vision tensors for a VLM), on the policy's device; pixel
    values in the policy's dtype."""
    if policy.is_vlm:
        enc = encode_vlm_prompts(policy.processor, examples)
    else:
        tok = policy.tokenizer
        tok.padding_side = "left"
        enc = dict(tok([e.prompt for e in examples], return_tensors="pt", padding=True, add_special_tokens=False))
    dev, dtype = policy.device, policy.model.dtype
    return {k: v.to(dev, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in enc.items()}


def _position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def _forward_kwargs(policy: Policy, input_ids, attention_mask, vision: dict | None) -> dict:
    """Text models get explicit position ids (left padding). VLMs compute their own
    multimodal (M-RoPE) positions from the ids, the attention mask (pads on either side
    are skipped) and the grids, given the token types; a VLM batch without media gets
    the text position ids."""
    kwargs = dict(vision or {})
    if policy.is_vlm and ("image_grid_thw" in kwargs or "video_grid_thw" in kwargs):
        kwargs["mm_token_type_ids"] = mm_token_type_ids(policy.model.config, input_ids)
    else:
        kwargs["position_ids"] = _position_ids(attention_mask)
    return kwargs


def forward_logits(policy: Policy, input_ids, attention_mask, vision: dict | None = None) -> torch.Tensor:
    """Full logits [N, L, V] (small models and tests only: training and scoring use
    `response_logprobs` / `teacher_scores`). VLM logits of the vision special tokens
    are masked (the policy never emits them)."""
    kwargs = _forward_kwargs(policy, input_ids, attention_mask, vision)
    logits = policy.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs).logits
    return mask_vision_logits(policy.model.config, logits) if policy.is_vlm else logits


# Config fields of models whose logits are not `lm_head(last hidden state)`.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def _backbone(model) -> torch.nn.Module:
    """The model without its LM head (`model.model` for Qwen3ForCausalLM and
    Qwen3VLForConditionalGeneration): it returns the last hidden state, after the final norm."""
    inner = getattr(model, "model", None)
    if not isinstance(inner, torch.nn.Module) or model.get_output_embeddings() is None:
        raise ValueError(
            f"{type(model).__name__}: expected a backbone at `.model` and an LM head at "
            "`get_output_embeddings()` (the Hugging Face causal-LM / VLM layout)"
        )
    cfg = model.config.get_text_config()
    for name in _LOGIT_TRANSFORMS:
        if getattr(cfg, name, None) not in (None, 1, 1.0):
            raise ValueError(f"{type(model).__name__}: logits are transformed ({name}), not lm_head(hidden)")
    return inner


def lm_head_of(policy: Policy) -> LMHead:
    """The policy's output projection (tied to the input embeddings or not: it is the same
    Parameter, so its gradient reaches both), with the VLM's vision special tokens masked."""
    _backbone(policy.model)
    out = policy.model.get_output_embeddings()
    masked = tuple(vision_token_ids(policy.model.config).values()) if policy.is_vlm else ()
    return LMHead(out.weight, getattr(out, "bias", None), masked)


def vocab_of(policy: Policy) -> int:
    """Rows of the LM head (also under ZeRO-3, where the weight tensor itself is a slice)."""
    w = policy.model.get_output_embeddings().weight
    return int(getattr(w, "ds_shape", w.shape)[0])


def _partitioned(module: torch.nn.Module) -> bool:
    """ZeRO-3 has partitioned the module's weights (DeepSpeed marks each such parameter with `ds_id`)."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


def _through_head(policy: Policy, fn, *args):
    """`fn(lm_head_of(policy), *args)`, run as the call of the model's output-embedding module: under
    ZeRO-3 the module's hooks gather its partitioned weight for the forward and, through the output
    tensors, again for the backward. Elsewhere a plain call."""
    out = policy.model.get_output_embeddings()
    if not _partitioned(out):
        return fn(lm_head_of(policy), *args)
    out.forward = lambda *a: fn(lm_head_of(policy), *a)  # the instance attribute shadows the class's forward
    try:
        return out(*args)
    finally:
        del out.forward


def head_token_logprobs_M(policy: Policy, hidden_M_H: torch.Tensor, targets_M: torch.Tensor,
                          temperature: float) -> torch.Tensor:
    """`maths.logprobs.token_logprobs_M` through the policy's LM head (ZeRO-3 safe; differentiable)."""
    return _through_head(policy, lambda head, h, y: token_logprobs_M(head, h, y, temperature), hidden_M_H, targets_M)


def head_topk_M_K(policy: Policy, hidden_M_H: torch.Tensor, temperature: float, k: int,
                  query_ids_M_Q: torch.Tensor | None = None):
    """`maths.logprobs.topk_logprobs_M_K` through the policy's LM head (ZeRO-3 safe; no gradient)."""
    if query_ids_M_Q is None:
        return _through_head(policy, lambda head, h: topk_logprobs_M_K(head, h, temperature, k), hidden_M_H)
    return _through_head(policy, lambda head, h, q: topk_logprobs_M_K(head, h, temperature, k, q),
                         hidden_M_H, query_ids_M_Q)


def head_scores_M(policy: Policy, hidden_M_H: torch.Tensor, targets_M: torch.Tensor, temperature: float, k: int,
                  query_ids_M_Q: torch.Tensor | None = None):
    """`maths.logprobs.scores_M` through the policy's LM head (ZeRO-3 safe; no gradient): the target
    ids' log-probs (bit-identical to `head_token_logprobs_M`), the top-k and the query ids' log-probs
    from one pass of the head."""
    if query_ids_M_Q is None:
        return _through_head(policy, lambda head, h, y: scores_M(head, h, y, temperature, k), hidden_M_H, targets_M)
    return _through_head(policy, lambda head, h, y, q: scores_M(head, h, y, temperature, k, q),
                         hidden_M_H, targets_M, query_ids_M_Q)


def forward_hidden(policy: Policy, input_ids, attention_mask, vision: dict | None = None) -> torch.Tensor:
    """The last hidden state [N, L, H] (what the LM head would read)."""
    kwargs = _forward_kwargs(policy, input_ids, attention_mask, vision)
    out = _backbone(policy.model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
    return out.last_hidden_state


def predicts_response_N_L(r: Rollout) -> torch.Tensor:
    """[N, L-1] bool: position j-1 predicts response token j."""
    return r.response_mask[:, 1:] > 0


def response_hidden_M_H(policy: Policy, r: Rollout) -> torch.Tensor:
    """Hidden states at the M positions that predict a response token, row-major."""
    return forward_hidden(policy, r.input_ids, r.attention_mask, r.vision)[:, :-1][predicts_response_N_L(r)]


def spread_N_L(values_M: torch.Tensor, r: Rollout) -> torch.Tensor:
    """Put per-response-token values [M, ...] back at their token positions: [N, L, ...],
    zero elsewhere (differentiable)."""
    mask = predicts_response_N_L(r)
    shape = mask.shape + values_M.shape[1:]
    full = values_M.new_zeros(shape).masked_scatter(mask.view(mask.shape + (1,) * (values_M.dim() - 1)), values_M)
    return torch.nn.functional.pad(full, (0, 0) * (values_M.dim() - 1) + (1, 0))


def response_logprobs(policy: Policy, r: Rollout, temperature: float) -> torch.Tensor:
    """log π(y_j | y_<j) of every response token [N, L], 0 elsewhere; differentiable.
    The one code for π_old, the student update and the teacher's scores."""
    r = r.to(policy.device)
    hidden = response_hidden_M_H(policy, r)
    targets = r.input_ids[:, 1:][predicts_response_N_L(r)]
    return spread_N_L(head_token_logprobs_M(policy, hidden, targets, temperature), r)


@torch.no_grad()
def sample(
    policy: Policy, examples: list[Example], max_new_tokens: int, temperature: float, greedy: bool = False,
    logprobs: bool = True,
) -> Rollout:
    """Sample one response per example (repeat examples for a group). Uses the global torch RNG.

    Through `policy.generator` when it has one (the vLLM engine, `spec.rollout.engine: vllm`),
    else transformers' `generate`. With `logprobs`, π_old is `response_logprobs` on the whole
    batch (at temperature 1 when greedy) whatever sampled it; without, `old_logprobs` is zeros
    (evaluation, or a caller that scores the rows itself, as OPD does per teacher)."""
    policy.model.eval()
    if policy.generator is not None:
        r = policy.generator.sample(policy, examples, max_new_tokens, temperature, greedy)
    else:
        r = _generate(policy, examples, max_new_tokens, temperature, greedy)
    if logprobs:
        r.old_logprobs = response_logprobs(policy, r, 1.0 if greedy else temperature)
    return r


def _generate(policy: Policy, examples: list[Example], max_new_tokens: int, temperature: float, greedy: bool
              ) -> Rollout:
    enc = encode_prompts(policy, examples)
    prompt_ids, prompt_mask = enc.pop("input_ids"), enc.pop("attention_mask")
    gen_kwargs = dict(enc)
    if policy.is_vlm:  # token types for M-RoPE; never sample vision special tokens (see forward_logits)
        gen_kwargs["mm_token_type_ids"] = mm_token_type_ids(policy.model.config, prompt_ids)
        gen_kwargs["suppress_tokens"] = list(vision_token_ids(policy.model.config).values())
    with eager_blocks(policy.model):  # `trainer.compile`: blocks are compiled for fixed-shape forwards only
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
            synced_gpus=_partitioned(policy.model) and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1,
        )
    return assemble_rollout(policy, examples, prompt_ids, prompt_mask, out[:, prompt_ids.shape[1]:], enc)


def assemble_rollout(policy: Policy, examples: list[Example], prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                     gen: torch.Tensor, vision: dict[str, torch.Tensor]) -> Rollout:
    """The rollout of left-padded prompts [N, P] and what was generated after them [N, R]: each
    response is its tokens up to and including the first EOS (anything after it is padding);
    one without EOS is truncated. `old_logprobs` is zeros."""
    N, R = gen.shape
    is_eos = gen == policy.eos_id
    first_eos = torch.where(is_eos.any(1), is_eos.float().argmax(1), torch.full((N,), R, device=gen.device))
    steps = torch.arange(R, device=gen.device).unsqueeze(0)
    resp_mask = (steps <= first_eos.unsqueeze(1)).long()
    resp_mask &= (steps < R).long()
    truncated = ~is_eos.any(1)
    input_ids = torch.cat([prompt_ids, gen], 1)
    attention_mask = torch.cat([prompt_mask, resp_mask], 1)
    response_mask = torch.cat([torch.zeros_like(prompt_mask), resp_mask], 1).float()
    texts = policy.tokenizer.batch_decode(gen * resp_mask + policy.pad_id * (1 - resp_mask),
                                          skip_special_tokens=True)
    return Rollout(examples, input_ids, attention_mask, response_mask, torch.zeros_like(response_mask), truncated,
                   texts, vision)


@torch.no_grad()
def teacher_scores(policy: Policy, r: Rollout, temperature: float, k: int, query_ids: torch.Tensor | None = None):
    """What the hub returns for one teacher: per response token, the teacher's log-prob of
    the sampled token (`response_logprobs`'s code), its top-k ids and log-probs, and
    (optionally) its log-probs at `query_ids` [N, L, Q] (the student's own top-k, for the
    bucketed KL); [N, L, ...], zero outside the response."""
    policy.model.eval()
    r = r.to(policy.device)
    if query_ids is not None:
        query_ids = query_ids.to(policy.device)
    hidden = response_hidden_M_H(policy, r)
    at = predicts_response_N_L(r)
    query = None if query_ids is None else query_ids[:, 1:][at]
    sampled, top_ids, top_lp, query_lp = head_scores_M(policy, hidden, r.input_ids[:, 1:][at], temperature, k, query)
    res = {
        "sampled_logprobs": spread_N_L(sampled, r),
        "topk_ids": spread_N_L(top_ids, r),
        "topk_logprobs": spread_N_L(top_lp, r),
    }
    if query_lp is not None:
        res["query_logprobs"] = spread_N_L(query_lp, r)
    return res
