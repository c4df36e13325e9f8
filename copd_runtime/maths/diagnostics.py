"""Alignment diagnostics between a student and a teacher, and merge readiness.

Both are measured on states the STUDENT visits (prefixes of its own rollouts).
Pure: torch maths and plain data, no I/O.
"""

from __future__ import annotations

import torch

from copd_runtime.maths.logprobs import CHUNK_BYTES, LMHead, chunk_rows, head_logits_C_V


def topk_overlap_B_T(student_topk_B_T_K: torch.Tensor, teacher_topk_B_T_K: torch.Tensor) -> torch.Tensor:
    """|TopK(student) ∩ TopK(teacher)| / k at every position (ids within a row are distinct)."""
    k = student_topk_B_T_K.shape[-1]
    hits = (student_topk_B_T_K.unsqueeze(-1) == teacher_topk_B_T_K.unsqueeze(-2)).any(-1)
    return hits.float().sum(-1) / k


def symmetric_kl_B_T(logp_B_T_V: torch.Tensor, logq_B_T_V: torch.Tensor) -> torch.Tensor:
    """KL(p‖q) + KL(q‖p) = Σ (p − q)(log p − log q), over the full vocabulary."""
    p, q = logp_B_T_V.exp(), logq_B_T_V.exp()
    return ((p - q) * (logp_B_T_V - logq_B_T_V)).sum(-1)


def bucketed_symmetric_kl_B_T(
    logp_on_support_B_T_S: torch.Tensor,
    logq_on_support_B_T_S: torch.Tensor,
    support_valid_B_T_S: torch.Tensor,
) -> torch.Tensor:
    """Symmetric KL of both distributions coarsened to a support plus one tail bucket.

    Used where only top-k of the teacher travels (the hub returns top-k, not the
    whole vocabulary). The support is the union of both top-k sets; everything
    else is lumped into one bucket. Coarsening never increases a KL, so this is a
    lower bound of `symmetric_kl_B_T`, exact when the support covers the
    vocabulary. `support_valid` masks padding/duplicate slots of the support.
    """
    valid = support_valid_B_T_S.float()
    p = logp_on_support_B_T_S.exp() * valid
    q = logq_on_support_B_T_S.exp() * valid
    p_tail = (1.0 - p.sum(-1)).clamp(min=1e-12)
    q_tail = (1.0 - q.sum(-1)).clamp(min=1e-12)
    lp = torch.where(valid > 0, logp_on_support_B_T_S, torch.zeros_like(p))
    lq = torch.where(valid > 0, logq_on_support_B_T_S, torch.zeros_like(q))
    head = ((p - q) * (lp - lq) * valid).sum(-1)
    tail = (p_tail - q_tail) * (p_tail.log() - q_tail.log())
    return head + tail


def mass_overlap_B_T(
    logp_on_support_B_T_S: torch.Tensor, logq_on_support_B_T_S: torch.Tensor, support_valid_B_T_S: torch.Tensor,
) -> torch.Tensor:
    """Σ_v min(p_v, q_v) over a support (the union of both top-k sets): the probability mass the
    two distributions share there, in [0, 1] (1 − total variation when the support is the whole
    vocabulary; a lower bound of that otherwise). Unlike top-k overlap it ignores how tokens of
    negligible probability are ranked."""
    valid = support_valid_B_T_S.float()
    return (torch.minimum(logp_on_support_B_T_S, logq_on_support_B_T_S).exp() * valid).sum(-1)


@torch.no_grad()
def alignment_M(
    student: LMHead, student_hidden_M_H: torch.Tensor, teacher: LMHead, teacher_hidden_M_H: torch.Tensor,
    temperature: float, k: int, rows: int | None = None, with_mass_overlap: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Exact top-k overlap and exact symmetric KL (full vocabulary) at M visited states,
    given both models' hidden states there; a few rows at a time, never [M, V] at once.
    `with_mass_overlap`: also Σ min(p, q) over the union of both top-k sets (`topk_union_mass_overlap_C`,
    the quantity an OPD step logs as mass_overlap/<teacher>), as a third tensor."""
    rows = rows or chunk_rows(student.vocab, CHUNK_BYTES // 2, student.weight_V_H.device)  # two distributions per chunk
    k = min(k, student.vocab)
    overlap, skl, mass = [], [], []
    for s in range(0, student_hidden_M_H.shape[0], rows):
        lp = torch.log_softmax(head_logits_C_V(student, student_hidden_M_H[s : s + rows], temperature), -1)
        lq = torch.log_softmax(head_logits_C_V(teacher, teacher_hidden_M_H[s : s + rows], temperature), -1)
        s_top, t_top = lp.topk(k, -1).indices, lq.topk(k, -1).indices
        overlap.append(topk_overlap_B_T(s_top, t_top))
        skl.append(symmetric_kl_B_T(lp, lq))
        if with_mass_overlap:
            mass.append(topk_union_mass_overlap_C(lp, lq, s_top, t_top))
        del lp, lq
    if not overlap:
        return (torch.zeros(0),) * (3 if with_mass_overlap else 2)
    out = (torch.cat(overlap), torch.cat(skl))
    return out + (torch.cat(mass),) if with_mass_overlap else out


def topk_union_mass_overlap_C(logp_C_V: torch.Tensor, logq_C_V: torch.Tensor, p_topk_C_K: torch.Tensor,
                              q_topk_C_K: torch.Tensor) -> torch.Tensor:
    """Σ_v min(p_v, q_v) over v in TopK(p) ∪ TopK(q), from full distributions: the same number
    `mass_overlap_B_T` gives on that union when only top-k travels (the OPD step, via the hub)."""
    union = torch.zeros_like(logp_C_V, dtype=torch.bool)
    union.scatter_(-1, p_topk_C_K, True)
    union.scatter_(-1, q_topk_C_K, True)
    return (torch.minimum(logp_C_V, logq_C_V).exp() * union).sum(-1)


def masked_mean(values_B_T: torch.Tensor, mask_B_T: torch.Tensor) -> float:
    n = mask_B_T.sum()
    return float((values_B_T * mask_B_T).sum() / n) if n > 0 else float("nan")
