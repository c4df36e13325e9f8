"""The maths of GRPO and on-policy distillation, as small pure functions.

Shape suffixes: B = sequences in a batch, P = prompts, G = group size, T = token
positions. Masks are float tensors of 0/1.

Where this departs from textbook GRPO (and why):
- no reference-KL term by default (CoPD trains from a warm base; the paper uses none);
  `rl.klCoef` > 0 adds GRPO's per-token k3 estimator of KL(π_θ ‖ π_ref) to the loss
  (`reference_kl_B_T`), π_ref being the run's base model;
- the loss is a token mean over the whole batch (DAPO style), not a per-sequence
  mean, so long responses are not down-weighted;
- clipping has separate low/high ε ("clip-higher") to keep exploration alive.
"""

from __future__ import annotations

import torch


def group_advantages_P_G(rewards_P_G: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """A_i = (r_i − mean(r)) / (std(r) + eps) within each prompt's group.

    std is the population std (divide by G). A group whose rewards are all equal
    carries no signal and gets advantage 0 everywhere.
    """
    mean = rewards_P_G.mean(dim=-1, keepdim=True)
    std = rewards_P_G.std(dim=-1, keepdim=True, unbiased=False)
    return (rewards_P_G - mean) / (std + eps)


def opd_advantages_B_T(
    teacher_logprobs_B_T: torch.Tensor,
    old_logprobs_B_T: torch.Tensor,
    beta: float,
    mask_B_T: torch.Tensor,
) -> torch.Tensor:
    """A_t = β·(log π_T(y_t) − log π_old(y_t)), detached, zero outside the response.

    No tolerance: π_old and the teacher's log-probs come from the same code
    (`rollout.response_logprobs` on the same rows), so a teacher identical to the
    student gives a gap of exactly 0, and any non-zero gap is a real difference.
    """
    gap = teacher_logprobs_B_T - old_logprobs_B_T
    return (beta * gap * mask_B_T).detach()


def clipped_pg_loss(
    logprobs_B_T: torch.Tensor,
    old_logprobs_B_T: torch.Tensor,
    advantages_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
    eps_low: float,
    eps_high: float,
    token_count: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """−token_mean( min(ρ·A, clip(ρ, 1−ε_low, 1+ε_high)·A) ), ρ = exp(logπ − logπ_old).

    Returns the scalar loss and a few statistics (clip fraction, mean ratio).
    `token_count` is the mean's denominator, by default the mask's sum. A micro-batch
    of a larger batch passes the whole batch's count: then the micro-batches' losses
    (and statistics) add up to the whole batch's, and so do their gradients.
    """
    ratio = torch.exp(logprobs_B_T - old_logprobs_B_T)
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    per_token = -torch.minimum(ratio * advantages_B_T, clipped * advantages_B_T)
    n_tokens = mask_B_T.sum().clamp(min=1.0) if token_count is None else token_count
    loss = (per_token * mask_B_T).sum() / n_tokens
    with torch.no_grad():
        was_clipped = ((ratio * advantages_B_T) > (clipped * advantages_B_T)).float()
        stats = {
            "clip_frac": float((was_clipped * mask_B_T).sum() / n_tokens),
            "ratio_mean": float((ratio * mask_B_T).sum() / n_tokens),
        }
    return loss, stats


def reference_kl_B_T(logprobs_B_T: torch.Tensor, ref_logprobs_B_T: torch.Tensor) -> torch.Tensor:
    """GRPO's per-token KL penalty (Shao et al. 2024, eq. 4; Schulman's k3 estimator):

        D_t = π_ref/π_θ − log(π_ref/π_θ) − 1  ≥ 0,

    evaluated on sampled tokens y_t ~ π_θ: an unbiased estimate of KL(π_θ ‖ π_ref), 0 exactly
    where the two log-probs agree, with gradient ∂D/∂logπ_θ = 1 − π_ref/π_θ (pushes log π_θ
    down where it exceeds log π_ref and up where it is below)."""
    d = ref_logprobs_B_T - logprobs_B_T
    return torch.exp(d) - d - 1.0


def token_logprobs_B_T(logits_B_T_V: torch.Tensor, targets_B_T: torch.Tensor, temperature: float = 1.0):
    """log softmax(logits / temperature) gathered at the target ids.

    The naive path over full-vocabulary logits: the reference that
    `maths.logprobs.token_logprobs_M` (what the runtime uses) is tested against."""
    logp = torch.log_softmax(logits_B_T_V.float() / temperature, dim=-1)
    return logp.gather(-1, targets_B_T.unsqueeze(-1)).squeeze(-1)
