"""Log-probs through an LM head without ever holding [N, L, V].

A policy's next-token distribution is `log_softmax(h @ Wᵀ + b)` over a vocabulary
of V ids (151,936 for Qwen3). Materialising it for a whole batch costs
N·L·V·4 bytes per copy (64 × 2048 × 151,936 fp32 ≈ 80 GB), and autograd keeps
several copies alive through backward. Everything here instead takes the hidden
states of the M positions that matter (those that predict a response token) and
runs the head over a few rows at a time:

- `token_logprobs_M`: log π(y) of the sampled token, via logsumexp per chunk; an
  autograd Function whose backward recomputes each chunk's logits, so training
  keeps only [M] log-sum-exps between forward and backward (the naive path keeps
  [M, V] log-probs, and more).
- `topk_logprobs_M_K`: the top-k ids and log-probs, and the log-probs of given
  query ids, for diagnostics (no gradient).

Peak memory is a few [chunk, V] fp32 blocks (`CHUNK_BYTES` each) plus, in
backward, the head's own weight gradient.

Shape suffixes: M = response positions (flattened over the batch), H = hidden
size, V = vocabulary, C = rows of one chunk, K = top-k, Q = query ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MASKED_LOGIT = -1e4  # finite, so that p·log p stays finite; as `models.vlm.mask_vision_logits`
CHUNK_BYTES = 128 * 2**20  # one [C, V] fp32 block of logits
# On a CPU a [C, V] block that outgrows the caches makes each pass over it (max, exp, sum, top-k)
# run from main memory: there a chunk has at most max(CPU_MAX_ROWS, CPU_BLOCK_BYTES / 4V) rows.
# V = 8,192: 256 rows instead of the byte budget's 4,096 (a 128 MB block; it ran the hub's head
# 1.9x slower than 256-row chunks). A Qwen3 vocabulary gets 220 rows either way (fewer rows would
# read the [V, H] weight once per few rows); a tiny character vocabulary keeps one chunk.
CPU_MAX_ROWS = 256
CPU_BLOCK_BYTES = 8 * 2**20


@dataclass(frozen=True)
class LMHead:
    """`logits = hidden @ weight_V_Hᵀ + bias_V`, with `masked_ids` forced to MASKED_LOGIT
    (ids the policy never emits, e.g. a VLM's vision special tokens)."""

    weight_V_H: torch.Tensor
    bias_V: torch.Tensor | None = None
    masked_ids: tuple[int, ...] = ()

    @property
    def vocab(self) -> int:
        return self.weight_V_H.shape[0]


def chunk_rows(vocab: int, chunk_bytes: int | None = None, device: torch.device | str | None = None) -> int:
    """Rows per chunk so that one [C, V] fp32 block is about `chunk_bytes` (default: this module's
    CHUNK_BYTES, read at the call; on a CPU device: fewer for a small vocabulary, see CPU_MAX_ROWS)."""
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    rows = max(1, chunk_bytes // (4 * vocab))
    if device is not None and torch.device(device).type == "cpu":
        rows = min(rows, max(CPU_MAX_ROWS, CPU_BLOCK_BYTES // (4 * vocab)))
    return rows


def head_logits_C_V(head: LMHead, hidden_C_H: torch.Tensor, temperature: float) -> torch.Tensor:
    """fp32 logits of a few rows, masked ids set, divided by the temperature (a fresh tensor).

    The matmul runs in the head's dtype (as the model's own `lm_head` does), then
    the logits are upcast: an fp32 copy of a bf16 head would cost V·H·4 bytes."""
    z = torch.nn.functional.linear(hidden_C_H, head.weight_V_H, head.bias_V).float()
    if head.masked_ids:
        z[:, list(head.masked_ids)] = MASKED_LOGIT
    return z.div_(temperature) if temperature != 1.0 else z  # x / 1.0 == x: the same bits, one [C, V] pass less


def logsumexp_destroying_C(z_C_V: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last axis, computed in place in `z` (which it overwrites):
    `torch.logsumexp` would allocate a second [C, V] block for exp(z − max)."""
    m = z_C_V.amax(-1, keepdim=True)
    return z_C_V.sub_(m).exp_().sum(-1).log_().add_(m.squeeze(-1))


class _TokenLogprobs(torch.autograd.Function):
    """log_softmax(head(h) / T)[y], chunk by chunk; backward recomputes the chunks.

    d lp_i / d z_ij = 1[j = y_i] − p_ij, so dL/dz = g_i·(onehot − p) / T per row; the
    masked ids are constants (no gradient)."""

    @staticmethod
    def forward(ctx, hidden_M_H, weight_V_H, bias_V, targets_M, temperature, masked_ids, rows):
        head = LMHead(weight_V_H, bias_V, masked_ids)
        M = hidden_M_H.shape[0]
        lp_M = torch.empty(M, dtype=torch.float32, device=hidden_M_H.device)
        lse_M = torch.empty(M, dtype=torch.float32, device=hidden_M_H.device)
        for s in range(0, M, rows):
            z = head_logits_C_V(head, hidden_M_H[s : s + rows], temperature)
            picked = z.gather(-1, targets_M[s : s + rows, None]).squeeze(-1)
            lse = logsumexp_destroying_C(z)
            lp_M[s : s + rows] = picked - lse
            lse_M[s : s + rows] = lse
            del z
        ctx.save_for_backward(hidden_M_H, weight_V_H, bias_V, targets_M, lse_M)
        ctx.temperature, ctx.masked_ids, ctx.rows = temperature, masked_ids, rows
        return lp_M

    @staticmethod
    def backward(ctx, grad_M):
        hidden_M_H, weight_V_H, bias_V, targets_M, lse_M = ctx.saved_tensors
        head = LMHead(weight_V_H, bias_V, ctx.masked_ids)
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        grad_h = torch.empty_like(hidden_M_H) if need_h else None
        # accumulated over chunks in fp32 (a bf16 running sum would round at every chunk)
        grad_w = torch.zeros(weight_V_H.shape, dtype=torch.float32, device=weight_V_H.device) if need_w else None
        grad_b = torch.zeros(bias_V.shape, dtype=torch.float32, device=bias_V.device) if need_b else None
        rows, grad_M = ctx.rows, grad_M.float()
        for s in range(0, hidden_M_H.shape[0], rows):
            h = hidden_M_H[s : s + rows]
            g = grad_M[s : s + rows, None]
            dz = head_logits_C_V(head, h, ctx.temperature)
            dz.sub_(lse_M[s : s + rows, None]).exp_().mul_(-g)  # −g·p
            dz.scatter_add_(-1, targets_M[s : s + rows, None], g)  # + g·onehot
            if ctx.masked_ids:
                dz[:, list(ctx.masked_ids)] = 0.0
            dz.div_(ctx.temperature)
            dz_w = dz.to(weight_V_H.dtype)
            if need_h:
                grad_h[s : s + rows] = (dz_w @ weight_V_H).to(hidden_M_H.dtype)
            if need_w:
                grad_w.addmm_(dz.t(), h.float() if h.dtype != torch.float32 else h)
            if need_b:
                grad_b += dz.sum(0)
            del dz, dz_w
        grad_w = grad_w.to(weight_V_H.dtype) if need_w else None
        grad_b = grad_b.to(bias_V.dtype) if need_b else None
        return grad_h, grad_w, grad_b, None, None, None, None


def token_logprobs_M(
    head: LMHead, hidden_M_H: torch.Tensor, targets_M: torch.Tensor, temperature: float = 1.0,
    rows: int | None = None,
) -> torch.Tensor:
    """log softmax(head(hidden) / temperature) at the target ids: [M] fp32, differentiable
    in the hidden states and the head, never holding more than a [rows, V] block."""
    rows = rows or chunk_rows(head.vocab, device=head.weight_V_H.device)
    return _TokenLogprobs.apply(
        hidden_M_H, head.weight_V_H, head.bias_V, targets_M, float(temperature), tuple(head.masked_ids), rows
    )


@torch.no_grad()
def scores_M(
    head: LMHead, hidden_M_H: torch.Tensor, targets_M: torch.Tensor, temperature: float, k: int,
    query_ids_M_Q: torch.Tensor | None = None, rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """What a teacher returns, from ONE pass of the head over each chunk: the log-prob of the target
    ids [M] (bit-identical to `token_logprobs_M`'s forward: the same ops on the same chunks), the
    top-k ids and log-probs [M, K] and the log-probs at `query_ids_M_Q` [M, Q]. No gradient.
    (`token_logprobs_M` then `topk_logprobs_M_K` would run the head and the log-sum-exp twice.)"""
    rows = rows or chunk_rows(head.vocab, device=head.weight_V_H.device)
    M, k = hidden_M_H.shape[0], min(k, head.vocab)
    dev = hidden_M_H.device
    lp = torch.empty(M, dtype=torch.float32, device=dev)
    ids = torch.zeros(M, k, dtype=torch.long, device=dev)
    lps = torch.zeros(M, k, dtype=torch.float32, device=dev)
    query = None if query_ids_M_Q is None else torch.zeros(query_ids_M_Q.shape, dtype=torch.float32, device=dev)
    for s in range(0, M, rows):
        z = head_logits_C_V(head, hidden_M_H[s : s + rows], temperature)
        picked = z.gather(-1, targets_M[s : s + rows, None]).squeeze(-1)
        top = z.topk(k, -1) if k else None
        qpicked = None if query is None else z.gather(-1, query_ids_M_Q[s : s + rows])
        lse = logsumexp_destroying_C(z)
        lp[s : s + rows] = picked - lse
        if top is not None:
            lps[s : s + rows], ids[s : s + rows] = top.values - lse[:, None], top.indices
        if query is not None:
            query[s : s + rows] = qpicked - lse[:, None]
        del z
    return lp, ids, lps, query


@torch.no_grad()
def topk_logprobs_M_K(
    head: LMHead, hidden_M_H: torch.Tensor, temperature: float, k: int,
    query_ids_M_Q: torch.Tensor | None = None, rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The k most likely ids and their log-probs [M, K] (k may be 0), and the log-probs
    at `query_ids_M_Q` [M, Q] when given. No gradient."""
    rows = rows or chunk_rows(head.vocab, device=head.weight_V_H.device)
    M, k = hidden_M_H.shape[0], min(k, head.vocab)
    dev = hidden_M_H.device
    ids = torch.zeros(M, k, dtype=torch.long, device=dev)
    lps = torch.zeros(M, k, dtype=torch.float32, device=dev)
    query = None if query_ids_M_Q is None else torch.zeros(query_ids_M_Q.shape, dtype=torch.float32, device=dev)
    for s in range(0, M, rows):
        z = head_logits_C_V(head, hidden_M_H[s : s + rows], temperature)
        top = z.topk(k, -1) if k else None  # the same ids as the log-probs' top-k
        picked = None if query is None else z.gather(-1, query_ids_M_Q[s : s + rows])
        lse = logsumexp_destroying_C(z)[:, None]
        if top is not None:
            lps[s : s + rows], ids[s : s + rows] = top.values - lse, top.indices
        if query is not None:
            query[s : s + rows] = picked - lse
        del z
    return ids, lps, query
