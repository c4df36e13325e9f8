"""Chunked LM-head log-probs against the naive full-vocabulary path."""

import pytest
import torch

from copd_runtime.maths.diagnostics import alignment_M, symmetric_kl_B_T, topk_overlap_B_T
from copd_runtime.maths.logprobs import (
    CPU_MAX_ROWS,
    MASKED_LOGIT,
    LMHead,
    chunk_rows,
    scores_M,
    token_logprobs_M,
    topk_logprobs_M_K,
)
from copd_runtime.maths.losses import token_logprobs_B_T
from copd_runtime.recipes.grpo import micro_batches

M, H, V = 11, 6, 17


def _head(g, bias=True, masked=(3, 9), dtype=torch.float32):
    w = (torch.randn(V, H, generator=g) * 0.7).to(dtype).requires_grad_()
    b = (torch.randn(V, generator=g) * 0.3).to(dtype).requires_grad_() if bias else None
    return LMHead(w, b, masked)


def _naive_logits(head, hidden):
    z = torch.nn.functional.linear(hidden, head.weight_V_H, head.bias_V).float()
    if head.masked_ids:  # as models.vlm.mask_vision_logits: a constant, no gradient
        keep = torch.ones(V, dtype=torch.bool)
        keep[list(head.masked_ids)] = False
        z = torch.where(keep, z, torch.full_like(z, MASKED_LOGIT))
    return z


@pytest.mark.parametrize("rows", [1, 3, 4, M, 100])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("bias", [True, False])
def test_chunked_logprobs_and_gradients_equal_the_naive_ones(rows, temperature, bias):
    g = torch.Generator().manual_seed(0)
    head = _head(g, bias)
    hidden = torch.randn(M, H, generator=g, requires_grad=True)
    targets = torch.randint(0, V, (M,), generator=g)
    targets[0] = 4
    coef = torch.randn(M, generator=g)  # an arbitrary upstream gradient

    got = token_logprobs_M(head, hidden, targets, temperature, rows=rows)
    want = token_logprobs_B_T(_naive_logits(head, hidden)[None], targets[None], temperature)[0]
    assert got.dtype == torch.float32 and got.shape == (M,)
    assert torch.allclose(got, want, atol=1e-6)

    params = [hidden, head.weight_V_H] + ([head.bias_V] if bias else [])
    g_got = torch.autograd.grad((got * coef).sum(), params)
    g_want = torch.autograd.grad((want * coef).sum(), params)
    for a, b in zip(g_got, g_want):
        assert torch.allclose(a, b, atol=1e-5)
    # the masked ids are constants
    assert torch.all(g_got[1][list(head.masked_ids)] == 0)


def test_backward_equals_autograd_of_the_float64_maths():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(V, generator=g, dtype=torch.float64, requires_grad=True)
    h = torch.randn(5, H, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, V, (5,), generator=g)
    got = torch.autograd.grad(token_logprobs_M(LMHead(w, b, (2,)), h, t, 0.9, rows=2).sum(), (h, w, b))
    z = torch.nn.functional.linear(h, w, b)
    z = torch.where(torch.arange(V) == 2, torch.full_like(z, MASKED_LOGIT), z) / 0.9
    want = torch.autograd.grad(torch.log_softmax(z, -1).gather(-1, t[:, None]).sum(), (h, w, b))
    for a, c in zip(got, want):  # our logits are fp32 by design: fp32 agreement
        assert a.dtype == torch.float64 and torch.allclose(a, c, atol=1e-5)


def test_a_tied_head_gets_the_gradient_of_both_uses():
    g = torch.Generator().manual_seed(2)
    emb = torch.nn.Embedding(V, H)
    ids = torch.randint(0, V, (M,), generator=g)
    targets = torch.randint(0, V, (M,), generator=g)
    for chunked in (True, False):
        emb.zero_grad()
        hidden = torch.tanh(emb(ids))
        head = LMHead(emb.weight)
        lp = (token_logprobs_M(head, hidden, targets, rows=4) if chunked
              else token_logprobs_B_T(_naive_logits(head, hidden)[None], targets[None])[0])
        lp.sum().backward()
        if chunked:
            first = emb.weight.grad.clone()
    assert torch.allclose(first, emb.weight.grad, atol=1e-5)


def test_bf16_head_matches_the_naive_bf16_path():
    g = torch.Generator().manual_seed(3)
    head = _head(g, bias=False, masked=(), dtype=torch.bfloat16)
    hidden = torch.randn(M, H, generator=g).bfloat16()
    targets = torch.randint(0, V, (M,), generator=g)
    got = token_logprobs_M(head, hidden, targets, rows=3)
    want = token_logprobs_B_T(_naive_logits(head, hidden)[None], targets[None])[0]
    assert torch.allclose(got, want, atol=1e-5)  # same bf16 matmul, then fp32 softmax


@pytest.mark.parametrize("rows", [1, 4, 100])
def test_topk_and_query_logprobs_equal_the_naive_ones(rows):
    g = torch.Generator().manual_seed(4)
    head = _head(g)
    hidden = torch.randn(M, H, generator=g)
    query = torch.randint(0, V, (M, 5), generator=g)
    ids, lps, q = topk_logprobs_M_K(head, hidden, 0.8, 4, query, rows=rows)
    logp = torch.log_softmax(_naive_logits(head, hidden).detach() / 0.8, -1)
    top = logp.topk(4, -1)
    assert torch.equal(ids, top.indices)
    assert torch.allclose(lps, top.values, atol=1e-6)
    assert torch.allclose(q, logp.gather(-1, query), atol=1e-6)
    assert not set(ids.flatten().tolist()) & set(head.masked_ids)
    ids0, lps0, none = topk_logprobs_M_K(head, hidden, 0.8, 0)
    assert ids0.shape == (M, 0) and lps0.shape == (M, 0) and none is None
    assert topk_logprobs_M_K(head, hidden, 1.0, 10 * V)[0].shape == (M, V)


@pytest.mark.parametrize("rows, temperature", [(1, 0.8), (4, 1.0), (100, 0.7), (100, 1.0)])
def test_one_pass_scores_are_the_separate_passes_bit_for_bit(rows, temperature):
    """The hub's (and OPD's) single head pass gives exactly what the sampled-token path (π_old, the
    update) and the top-k/query path give, so identical weights still give a zero OPD gap."""
    g = torch.Generator().manual_seed(6)
    head = _head(g)
    hidden = torch.randn(M, H, generator=g)
    targets = torch.randint(0, V, (M,), generator=g)
    query = torch.randint(0, V, (M, 5), generator=g)
    lp, ids, lps, q = scores_M(head, hidden, targets, temperature, 4, query, rows=rows)
    assert torch.equal(lp, token_logprobs_M(head, hidden, targets, temperature, rows=rows))
    ids2, lps2, q2 = topk_logprobs_M_K(head, hidden, temperature, 4, query, rows=rows)
    assert torch.equal(ids, ids2) and torch.equal(lps, lps2) and torch.equal(q, q2)
    lp0, ids0, lps0, none = scores_M(head, hidden, targets, temperature, 0, rows=rows)
    assert torch.equal(lp0, lp) and ids0.shape == (M, 0) and none is None


def test_alignment_equals_full_vocabulary_overlap_and_kl():
    g = torch.Generator().manual_seed(5)
    s_head, t_head = _head(g), _head(g)
    hs, ht = torch.randn(M, H, generator=g), torch.randn(M, H, generator=g)
    overlap, skl = alignment_M(s_head, hs, t_head, ht, 0.9, 3, rows=4)
    lp = torch.log_softmax(_naive_logits(s_head, hs).detach() / 0.9, -1)
    lq = torch.log_softmax(_naive_logits(t_head, ht).detach() / 0.9, -1)
    assert torch.allclose(overlap, topk_overlap_B_T(lp.topk(3, -1).indices, lq.topk(3, -1).indices))
    assert torch.allclose(skl, symmetric_kl_B_T(lp, lq), atol=1e-5)
    same_o, same_kl = alignment_M(s_head, hs, s_head, hs, 0.9, 3)
    assert torch.all(same_o == 1.0) and torch.all(same_kl == 0.0)
    empty = alignment_M(s_head, hs[:0], t_head, ht[:0], 1.0, 3)
    assert empty[0].numel() == 0 and empty[1].numel() == 0


def test_chunk_rows_follow_the_byte_budget():
    assert chunk_rows(151_936, 128 * 2**20) == 220 == chunk_rows(151_936, 128 * 2**20, "cpu")
    assert chunk_rows(10**9, 1) == 1
    assert chunk_rows(8192, 128 * 2**20) == 4096 and chunk_rows(8192, 128 * 2**20, "cpu") == CPU_MAX_ROWS
    assert chunk_rows(64, 128 * 2**20, "cpu") == 32_768  # a tiny vocabulary: 8 MB blocks


def test_micro_batches_respect_the_token_budget():
    rows = [0, 3, 6, 9, 12]
    assert micro_batches(rows, 10, None) == [rows]
    assert micro_batches(rows, 10, 25) == [[0, 3], [6, 9], [12]]
    assert micro_batches(rows, 10, 5) == [[r] for r in rows]  # at least one row
    assert micro_batches(rows, 10, 1000) == [rows]
