"""The mutual OPD phase: one on-policy distillation step of a student branch.

The student samples on its PEERS' prompts; each peer (teacher, frozen at the
start of the phase, served by the hub) scores every sampled token on the
student's own prefix. Per-token advantage

    A_t = β_k · (log π_T(y_t | x', y_<t) − log π_old(y_t | x', y_<t))     (detached)

goes into the same clipped update as RL. Which peers teach whom is the topology
(`CoPDRunSpec.teachers_of`). Alongside, on the same visited states, we record the
top-k overlap with each teacher and the symmetric KL on the union of both top-k
sets plus a tail bucket (the hub returns top-k, not the whole vocabulary).
"""

from __future__ import annotations

import random

import torch

from copd_core.spec import DiagnosticsSpec, OPDSpec, RLSpec
from copd_runtime.data.examples import Dataset, Example
from copd_runtime.data.rewards import score
from copd_runtime.maths.diagnostics import bucketed_symmetric_kl_B_T, masked_mean, topk_overlap_B_T
from copd_runtime.maths.losses import opd_advantages_B_T
from copd_runtime.models.policy import Policy
from copd_runtime.recipes.grpo import policy_update
from copd_runtime.rollout import forward_logits, sample


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
) -> dict[str, float]:
    teachers = sorted(peer_data)
    n_prompts = opd.batch_size or rl.batch_size
    prompts: list[tuple[str, Example]] = []
    for i in range(n_prompts):
        t = teachers[i % len(teachers)]
        prompts.append((t, rng.choice(peer_data[t].train)))
    rows = [(t, ex) for t, ex in prompts for _ in range(opd.samples_per_prompt)]

    rollout = sample(policy, [ex for _, ex in rows], rl.max_new_tokens, rl.temperature)
    mask = rollout.response_mask

    # The student's own top-k on the states it visits (for overlap / KL only).
    with torch.no_grad():
        logits = forward_logits(policy, rollout.input_ids, rollout.attention_mask, rollout.vision)[:, :-1]
        student_logp = torch.nn.functional.pad(torch.log_softmax(logits.float() / rl.temperature, -1), (0, 0, 1, 0))
    k = min(diag.top_k, student_logp.shape[-1])
    student_topk_ids = student_logp.topk(k, -1).indices

    teacher_lp = torch.zeros_like(rollout.old_logprobs)
    out: dict[str, float] = {}
    for t in teachers:
        idx = [i for i, (tt, _) in enumerate(rows) if tt == t]
        sub = rollout.select(idx)
        it = torch.tensor(idx)
        scores = hub.score(t, sub, k=k, query_ids=student_topk_ids[it])
        teacher_lp[it] = scores["sampled_logprobs"]

        # diagnostics on the visited states
        s_top = student_topk_ids[it]
        overlap = topk_overlap_B_T(s_top, scores["topk_ids"])
        support = torch.cat([scores["topk_ids"], s_top], -1)
        slp = student_logp[it].gather(-1, support)
        tlp = torch.cat([scores["topk_logprobs"], scores["query_logprobs"]], -1)
        valid = _first_occurrence(support)
        skl = bucketed_symmetric_kl_B_T(slp, tlp, valid)
        out[f"topk_overlap/{t}"] = masked_mean(overlap, mask[it])
        out[f"symmetric_kl/{t}"] = masked_mean(skl, mask[it])
        out[f"peer_reward/{t}"] = sum(
            score(r, ex.answer, peer_data[t].reward) for r, ex in zip(sub.responses, sub.examples)
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
    earlier = torch.tril(torch.ones(S, S, dtype=torch.bool), diagonal=-1)
    return ~(same & earlier).any(-1)
