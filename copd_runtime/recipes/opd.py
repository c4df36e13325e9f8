"""The mutual OPD phase: one on-policy distillation step of a student branch.

The student samples on its PEERS' prompts; each peer (teacher, frozen at the
start of the phase, served by the hub) scores every sampled token on the
student's own prefix. Per-token advantage

    A_t = β_k · (log π_T(y_t | x', y_<t) − log π_old(y_t | x', y_<t))     (detached)

goes into the same clipped update as RL. Which peers teach whom is the topology
(`CoPDRunSpec.teachers_of`); in hub-and-spoke a spoke samples on every other branch's
prompts and the hub scores them all (`CoPDRunSpec.opd_prompt_branches`).

Alongside, on the same visited states, we record per teacher t (the hub returns
top-k, not the whole vocabulary): `topk_overlap/t`; `topk_union_symmetric_kl/t`,
the symmetric KL of both distributions coarsened to the union of both top-k sets
plus a tail bucket (a LOWER BOUND of the exact symmetric KL, which only the
per-cycle Diagnose stage measures, as `symmetric_kl`); and `mass_overlap/t`,
Σ_v min(p_v, q_v) over that union.

π_old is computed here, per teacher, on exactly the rows sent to that teacher and
by the same code the hub runs (`rollout.response_logprobs`): a teacher whose weights
equal the student's gives a gap of exactly 0, and no update. The student's hidden
states at the response positions are kept (small: [M, H]) for its top-k and its
log-probs at the teacher's top-k; no [N, L, V] tensor is made.
"""

from __future__ import annotations

import random

import torch

from copd_core.spec import DiagnosticsSpec, OPDSpec, RewardSpec, RLSpec
from copd_runtime.data.examples import Dataset, Example
from copd_runtime.data.rewards import score
from copd_runtime.maths.diagnostics import (
    bucketed_symmetric_kl_B_T,
    masked_mean,
    mass_overlap_B_T,
    topk_overlap_B_T,
)
from copd_runtime.maths.losses import opd_advantages_B_T
from copd_runtime.models.policy import Policy
from copd_runtime.recipes.grpo import policy_update, rank_share
from copd_runtime.rollout import (
    head_scores_M,
    head_topk_M_K,
    predicts_response_N_L,
    response_hidden_M_H,
    sample,
    spread_N_L,
    vocab_of,
)


def opd_step(
    policy: Policy,
    optimizer,
    peer_data: dict[str, Dataset],
    hub,
    beta: float,
    rl: RLSpec,
    opd: OPDSpec,
    diag: DiagnosticsSpec,
    rng: random.Random,
    verifiers: dict[str, RewardSpec] | None = None,
) -> dict[str, float]:
    """`peer_data[t]`: the prompts sampled for teacher t. `verifiers` (domain → reward spec) scores the
    peer_reward diagnostic of an example by its own domain's verifier (a hub relaying several
    domains); without it, by `peer_data[t].reward`."""
    teachers = sorted(peer_data)
    n_prompts = opd.batch_size or rl.batch_size
    prompts: list[tuple[str, Example]] = []
    for i in range(n_prompts):
        t = teachers[i % len(teachers)]
        prompts.append((t, rng.choice(peer_data[t].train)))
    prompts = rank_share(prompts)
    rows = [(t, ex) for t, ex in prompts for _ in range(opd.samples_per_prompt)]

    rollout = sample(policy, [ex for _, ex in rows], rl.max_new_tokens, rl.temperature, logprobs=False)
    mask = rollout.response_mask
    k = min(diag.top_k, vocab_of(policy))

    teacher_lp = torch.zeros_like(rollout.old_logprobs)
    out: dict[str, float] = {}
    for t in teachers:
        idx = [i for i, (tt, _) in enumerate(rows) if tt == t]
        sub = rollout.select(idx)
        it = torch.tensor(idx, device=rollout.device)
        at = predicts_response_N_L(sub)
        with torch.no_grad():  # the student on these rows: π_old and its own top-k (one pass of the head)
            hidden = response_hidden_M_H(policy, sub)
            old_lp, s_top, s_top_lp, _ = head_scores_M(policy, hidden, sub.input_ids[:, 1:][at], rl.temperature, k)
            rollout.old_logprobs[it] = spread_N_L(old_lp, sub)
        scores = {n: v.to(rollout.device) for n, v in hub.score(t, sub, k=k, query_ids=spread_N_L(s_top, sub)).items()}
        teacher_lp[it] = scores["sampled_logprobs"]

        # diagnostics on the visited states ([M, ...]: response positions only)
        t_top = scores["topk_ids"][:, 1:][at]
        _, _, s_at_t_top = head_topk_M_K(policy, hidden, rl.temperature, 0, query_ids_M_Q=t_top)
        overlap = topk_overlap_B_T(s_top, t_top)
        support = torch.cat([t_top, s_top], -1)
        slp = torch.cat([s_at_t_top, s_top_lp], -1)
        tlp = torch.cat([scores["topk_logprobs"][:, 1:][at], scores["query_logprobs"][:, 1:][at]], -1)
        first = _first_occurrence(support)
        skl = bucketed_symmetric_kl_B_T(slp, tlp, first)
        ones = torch.ones_like(overlap)
        out[f"topk_overlap/{t}"] = masked_mean(overlap, ones)
        out[f"topk_union_symmetric_kl/{t}"] = masked_mean(skl, ones)
        out[f"mass_overlap/{t}"] = masked_mean(mass_overlap_B_T(slp, tlp, first), ones)
        out[f"peer_reward/{t}"] = sum(
            score(r, ex.answer, (verifiers or {}).get(ex.domain, peer_data[t].reward))
            for r, ex in zip(sub.responses, sub.examples)
        ) / len(idx)

    advantages = opd_advantages_B_T(teacher_lp, rollout.old_logprobs, beta, mask)
    stats = policy_update(policy, optimizer, rollout, advantages, mask, rl)
    return {
        "reward_mean": sum(out[f"peer_reward/{t}"] for t in teachers) / len(teachers),
        "advantage_mean": masked_mean(advantages, mask),
        "tokens": int(mask.sum().item()),
        **out,
        **stats,
    }


def _first_occurrence(ids_B_T_S: torch.Tensor) -> torch.Tensor:
    """True where an id appears for the first time along the last axis."""
    S = ids_B_T_S.shape[-1]
    same = ids_B_T_S.unsqueeze(-1) == ids_B_T_S.unsqueeze(-2)  # [.., S, S]
    earlier = torch.tril(torch.ones(S, S, dtype=torch.bool, device=ids_B_T_S.device), diagonal=-1)
    return ~(same & earlier).any(-1)
