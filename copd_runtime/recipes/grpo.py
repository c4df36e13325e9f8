"""The RL phase: one GRPO step on a branch's own verifiable-reward data.

Read top to bottom: pick prompts → sample G responses each (π_old from the
trainer's own forward over them) → verify → group-normalise rewards → clipped
policy-gradient update, token mean over the batch.

Departures from GRPO as published: no reference KL by default (`rl.klCoef` = 0;
with `klCoef` > 0 the loss gains klCoef · token_mean(k3 estimate of KL(π_θ ‖ π_ref)) as in
GRPO, π_ref being the run's base model, scored once per rollout batch); clip-higher
(separate ε_low/ε_high); token-mean loss. Truncated responses (no EOS
within `maxNewTokens`) follow `rl.truncation`: `zero-reward` (default) scores
them 0 and keeps them in the loss, so the policy learns to stop; `mask` drops
them from the loss (their group still uses them for the mean/std).

The update (`policy_update`, shared with OPD) takes `rl.miniBatches` optimizer steps
per rollout batch; each mini-batch runs as micro-batches of at most
`rl.microBatchTokens` padded tokens whose gradients are accumulated (each
micro-batch's loss is divided by the whole mini-batch's token count), so memory is
traded for time without changing the update. `rl.gradientCheckpointing`
recomputes the layers' activations in backward.

A response is scored by the dataset's verifier unless the caller passes
`reward_fn(response, example)`, e.g. to score a batch that mixes domains, each
example by its own domain's verifier (the comparison's mixed-RLVR baseline).
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch

from copd_core.spec import RLSpec, TruncationRule
from copd_runtime.data.examples import Dataset, Example
from copd_runtime.data.rewards import score
from copd_runtime.maths.losses import clipped_pg_loss, group_advantages_P_G, reference_kl_B_T
from copd_runtime.models import distributed
from copd_runtime.models.optim import clip_grad_norm
from copd_runtime.models.policy import Policy, activation_checkpointing, set_activation_checkpointing
from copd_runtime.rollout import Rollout, response_logprobs, sample

RewardFn = Callable[[str, Example], float]


def rewards_of(rollout: Rollout, dataset: Dataset, rule: TruncationRule, reward_fn: RewardFn | None = None
               ) -> torch.Tensor:
    fn = reward_fn or (lambda text, ex: score(text, ex.answer, dataset.reward))
    r = torch.tensor([fn(text, ex) for text, ex in zip(rollout.responses, rollout.examples)], dtype=torch.float32,
                     device=rollout.device)
    if rule == TruncationRule.ZERO_REWARD:
        r = torch.where(rollout.truncated, torch.zeros_like(r), r)
    return r


def micro_batches(rows: list[int], seq_len: int, token_budget: int | None) -> list[list[int]]:
    """Consecutive slices of `rows` with at most `token_budget` padded tokens each
    (rows × seq_len; at least one row); all rows at once without a budget."""
    per = len(rows) if token_budget is None else max(1, token_budget // seq_len)
    return [rows[i : i + per] for i in range(0, len(rows), per)]


def policy_update(
    policy: Policy, optimizer, rollout: Rollout, advantages_N_T: torch.Tensor, loss_mask_N_T: torch.Tensor,
    rl: RLSpec, ref_logprobs_N_T: torch.Tensor | None = None, kl_coef: float = 0.0,
) -> dict[str, float]:
    """The clipped update shared by RL and OPD: `rl.miniBatches` optimizer steps, each over
    one slice of the batch, accumulated over micro-batches of `rl.microBatchTokens`.

    With `ref_logprobs_N_T` and `kl_coef` > 0 the loss also has kl_coef · token_mean(D_t),
    D_t the per-token reference KL (`reference_kl_B_T`); its mean over the batch is in
    `ref_kl` (measured with the weights before each mini-batch's step)."""
    stats = {"loss": 0.0, "clip_frac": 0.0, "ratio_mean": 1.0, "skipped": 0.0}
    use_kl = ref_logprobs_N_T is not None and kl_coef > 0
    if use_kl:
        stats["ref_kl"] = 0.0
    world = distributed.world_size()  # > 1: this rank's rows only; every rank runs the same passes
    signal = use_kl or bool((advantages_N_T * loss_mask_N_T).abs().gt(0).any())
    if world > 1:
        signal = bool(distributed.all_sum(float(signal)) > 0)
    if not signal:
        # No signal (uniform groups, or a teacher identical to the student): an optimizer
        # step on a zero gradient would still move the weights through Adam's momentum.
        stats["skipped"] = 1.0
        return stats
    model = policy.model
    checkpointing = rl.gradient_checkpointing and not activation_checkpointing(model)
    if checkpointing:
        set_activation_checkpointing(model, True)
    model.train()
    n = len(rollout)
    order = list(range(n))
    chunks = [order[i :: rl.mini_batches] for i in range(rl.mini_batches) if order[i :: rl.mini_batches]]
    stats["ratio_mean"] = 0.0
    if world > 1:
        chunks += [[]] * (rl.mini_batches - len(chunks))  # every rank steps as often
    backward = getattr(optimizer, "backward", None)  # DeepSpeed's engine (models.distributed)
    try:
        for rows in chunks:
            n_tokens = loss_mask_N_T[torch.tensor(rows, dtype=torch.long, device=loss_mask_N_T.device)].sum()
            if world > 1:  # the whole mini-batch's count; DeepSpeed averages the ranks' gradients
                n_tokens = distributed.all_sum(n_tokens).to(n_tokens) / world
            n_tokens = n_tokens.clamp(min=1.0 / world)
            optimizer.zero_grad(set_to_none=True)
            micros = [(m, 1.0) for m in micro_batches(rows, rollout.input_ids.shape[1], rl.micro_batch_tokens)]
            if world > 1:  # a rank short of rows runs zero-weight passes (each backward reduces across ranks)
                micros += [([0], 0.0)] * (distributed.all_max(len(micros)) - len(micros))
            for i, (micro, weight) in enumerate(micros):
                sub = rollout.select(micro)
                idx = torch.tensor(micro, device=loss_mask_N_T.device)
                logprobs = response_logprobs(policy, sub, rl.temperature)
                loss, s = clipped_pg_loss(
                    logprobs, sub.old_logprobs, advantages_N_T[idx], loss_mask_N_T[idx] * weight, rl.clip_eps_low,
                    rl.clip_eps_high, token_count=n_tokens,
                )
                if use_kl:
                    kl = (reference_kl_B_T(logprobs, ref_logprobs_N_T[idx]) * loss_mask_N_T[idx] * weight
                          ).sum() / n_tokens
                    loss = loss + kl_coef * kl
                    stats["ref_kl"] += kl.item() / len(chunks) / world
                if backward is not None:
                    backward(loss, boundary=i == len(micros) - 1)
                else:
                    loss.backward()
                stats["loss"] += loss.item() / len(chunks) / world
                stats["clip_frac"] += s["clip_frac"] / len(chunks) / world
                stats["ratio_mean"] += s["ratio_mean"] / len(chunks) / world
            clip_grad_norm(optimizer, model, 1.0)
            optimizer.step()
        if world > 1:
            for k in ("loss", "clip_frac", "ratio_mean", *(("ref_kl",) if use_kl else ())):
                stats[k] = float(distributed.all_sum(stats[k]))
    finally:
        if checkpointing:
            set_activation_checkpointing(model, False)
        model.eval()
    return stats


def grpo_step(policy: Policy, optimizer, dataset: Dataset, rl: RLSpec, rng: random.Random,
              reward_fn: RewardFn | None = None, reference: Policy | None = None) -> dict[str, float]:
    """One GRPO step. `reference` (the base model) is needed only when `rl.klCoef` > 0."""
    if rl.kl_coef > 0 and reference is None:
        raise ValueError("rl.klCoef > 0 needs the reference policy (the run's base model)")
    prompts: list[Example] = rng.sample(dataset.train, min(rl.batch_size, len(dataset.train)))
    prompts = rank_share(prompts)  # every rank drew the same prompts; it samples and trains its share
    group = [ex for ex in prompts for _ in range(rl.group_size)]  # P*G rows, group-major

    rollout = sample(policy, group, rl.max_new_tokens, rl.temperature)
    rewards_P_G = rewards_of(rollout, dataset, rl.truncation, reward_fn).view(len(prompts), rl.group_size)
    adv_N = group_advantages_P_G(rewards_P_G).reshape(-1)

    loss_mask = rollout.response_mask.clone()
    if rl.truncation == TruncationRule.MASK:
        loss_mask[rollout.truncated] = 0.0
    advantages = adv_N.unsqueeze(1) * loss_mask

    ref_lp = None
    if rl.kl_coef > 0:
        with torch.no_grad():
            reference.model.eval()
            ref_lp = response_logprobs(reference, rollout, rl.temperature)
    stats = policy_update(policy, optimizer, rollout, advantages, loss_mask, rl, ref_lp, rl.kl_coef)
    rows = distributed.all_sum(float(len(rollout)))
    return {
        "reward_mean": float(distributed.all_sum(rewards_P_G.sum().item()) / rows),
        "tokens": int(distributed.all_sum(rollout.response_mask.sum().item())),
        "truncated_frac": float(distributed.all_sum(rollout.truncated.float().sum().item()) / rows),
        **stats,
    }


def rank_share(prompts: list) -> list:
    """This rank's prompts (all of them in one process): whole groups, so advantages stay per rank."""
    if distributed.world_size() == 1:
        return prompts
    mine = distributed.share(prompts)
    if not mine:
        raise ValueError(f"{len(prompts)} prompts per step for {distributed.world_size()} trainer processes: "
                         "rl.batchSize (opd.batchSize) must be at least the number of processes "
                         "(resources.gpu × trainer.nodes)")
    return mine
