"""The maths against slow, obvious references."""

import math

import torch

from copd_runtime.maths.losses import (
    clipped_pg_loss,
    group_advantages_P_G,
    opd_advantages_B_T,
    reference_kl_B_T,
    token_logprobs_B_T,
)


def test_group_advantages_match_loop_reference():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    got = group_advantages_P_G(rewards)
    for p, row in enumerate(rewards.tolist()):
        mean = sum(row) / len(row)
        std = math.sqrt(sum((r - mean) ** 2 for r in row) / len(row))
        for g, r in enumerate(row):
            assert math.isclose(got[p, g].item(), (r - mean) / (std + 1e-6), abs_tol=1e-5)
    assert torch.all(got[2] == 0)  # no signal in a uniform group


def _slow_clipped_loss(lp, old, adv, mask, lo, hi):
    total, n = 0.0, 0
    for b in range(len(lp)):
        for t in range(len(lp[0])):
            if mask[b][t] == 0:
                continue
            ratio = math.exp(lp[b][t] - old[b][t])
            clipped = min(max(ratio, 1 - lo), 1 + hi)
            total += -min(ratio * adv[b][t], clipped * adv[b][t])
            n += 1
    return total / n


def test_clipped_loss_matches_loop_reference_and_token_mean():
    g = torch.Generator().manual_seed(0)
    lp = torch.randn(3, 5, generator=g) * 0.3 - 1
    old = torch.randn(3, 5, generator=g) * 0.3 - 1
    adv = torch.randn(3, 5, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 0, 0, 0]], dtype=torch.float)
    loss, stats = clipped_pg_loss(lp, old, adv, mask, 0.2, 0.28)
    ref = _slow_clipped_loss(lp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), 0.2, 0.28)
    assert math.isclose(loss.item(), ref, rel_tol=1e-5)
    assert 0.0 <= stats["clip_frac"] <= 1.0


def test_clip_is_asymmetric():
    # ratio 1.25 with a positive advantage: inside 1+0.28, outside 1+0.2
    lp, old = torch.tensor([[math.log(1.25)]]), torch.zeros(1, 1)
    adv, mask = torch.ones(1, 1), torch.ones(1, 1)
    loose, _ = clipped_pg_loss(lp, old, adv, mask, eps_low=0.2, eps_high=0.28)
    tight, s = clipped_pg_loss(lp, old, adv, mask, eps_low=0.2, eps_high=0.2)
    assert math.isclose(loose.item(), -1.25, rel_tol=1e-6)
    assert math.isclose(tight.item(), -1.2, rel_tol=1e-6)
    assert s["clip_frac"] == 1.0


def test_clipped_gradient_is_zero_when_clipped():
    lp = torch.tensor([[math.log(2.0)]], requires_grad=True)
    loss, _ = clipped_pg_loss(lp, torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), 0.2, 0.2)
    loss.backward()
    assert lp.grad.abs().item() == 0.0


def test_opd_advantage_is_beta_times_logprob_gap_detached_and_masked():
    t = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    old = torch.tensor([[-1.5, -1.0, -0.5]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    a = opd_advantages_B_T(t, old, beta=2.0, mask_B_T=mask)
    assert a.tolist() == [[1.0, -2.0, 0.0]]
    assert not a.requires_grad


def test_token_logprobs_with_temperature():
    logits = torch.tensor([[[1.0, 2.0, 3.0]]])
    got = token_logprobs_B_T(logits, torch.tensor([[2]]), temperature=2.0)
    z = [x / 2.0 for x in (1.0, 2.0, 3.0)]
    ref = z[2] - math.log(sum(math.exp(v) for v in z))
    assert math.isclose(got.item(), ref, rel_tol=1e-6)


def test_opd_advantage_has_no_tolerance():
    # π_old and the teacher come from the same code: identical weights give a gap of exactly
    # 0 (tests/model), so every non-zero gap, however small, is a real difference
    old = torch.tensor([[-1.0, -2.0]])
    assert torch.all(opd_advantages_B_T(old.clone(), old, beta=1.0, mask_B_T=torch.ones(1, 2)) == 0)
    a = opd_advantages_B_T(old + 1e-6, old, beta=1.0, mask_B_T=torch.ones(1, 2))
    assert torch.all(a != 0)


def test_clipped_loss_of_micro_batches_adds_up_to_the_full_batch():
    g = torch.Generator().manual_seed(4)
    lp = (torch.randn(6, 5, generator=g) * 0.3 - 1).requires_grad_()
    old = torch.randn(6, 5, generator=g) * 0.3 - 1
    adv = torch.randn(6, 5, generator=g)
    mask = (torch.rand(6, 5, generator=g) > 0.3).float()
    full, full_stats = clipped_pg_loss(lp, old, adv, mask, 0.2, 0.28)
    (full_grad,) = torch.autograd.grad(full, lp)
    n = mask.sum()
    parts = [clipped_pg_loss(lp[r], old[r], adv[r], mask[r], 0.2, 0.28, token_count=n) for r in (slice(0, 2),
                                                                                               slice(2, 6))]
    total = sum(p[0] for p in parts)
    (grad,) = torch.autograd.grad(total, lp)
    assert math.isclose(total.item(), full.item(), rel_tol=1e-6)
    assert torch.allclose(grad, full_grad, atol=1e-7)
    for key in ("clip_frac", "ratio_mean"):
        assert math.isclose(sum(p[1][key] for p in parts), full_stats[key], rel_tol=1e-6)


def test_reference_kl_is_grpos_k3_estimator():
    """D = r − log r − 1 with r = π_ref/π_θ: ≥ 0, 0 where the log-probs agree, unbiased for
    KL(π_θ ‖ π_ref) when y ~ π_θ, and its gradient pulls log π_θ toward log π_ref."""
    lp = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    ref = torch.tensor([[-1.0, -1.0, -1.5]])
    d = reference_kl_B_T(lp, ref)
    want = [math.exp(r - p) - (r - p) - 1 for p, r in zip([-1.0, -2.0, -0.5], [-1.0, -1.0, -1.5])]
    assert torch.allclose(d, torch.tensor([want]), atol=1e-6)
    assert d[0, 0] == 0 and torch.all(d >= 0)
    d.sum().backward()
    g = lp.grad[0]
    assert g[0] == 0 and g[1] < 0 and g[2] > 0  # descent raises log π_θ below π_ref, lowers it above
    # unbiased: E_{y~p}[D(y)] = KL(p ‖ q) on a small distribution
    logp = torch.log_softmax(torch.tensor([2.0, 0.5, -1.0, 0.0]), -1)
    logq = torch.log_softmax(torch.tensor([0.0, 1.0, 0.5, -0.5]), -1)
    est = (logp.exp() * reference_kl_B_T(logp, logq)).sum()
    assert math.isclose(est.item(), (logp.exp() * (logp - logq)).sum().item(), rel_tol=1e-5)
