"""Bounded-memory log-probs on a real tiny Qwen3: the chunked path equals the naive
full-logits one, micro-batch accumulation (and gradient checkpointing) give the same
update as one pass, and identical weights give exactly zero OPD gap."""

import random

import pytest
import torch

from copd_core.spec import DiagnosticsSpec, OPDSpec, RewardSpec, RLSpec
from copd_runtime.data.datasets import text_examples
from copd_runtime.data.examples import Dataset
from copd_runtime.hub import InProcessHub
from copd_runtime.maths.diagnostics import masked_mean, symmetric_kl_B_T, topk_overlap_B_T
from copd_runtime.maths.losses import group_advantages_P_G, token_logprobs_B_T
from copd_runtime.models.policy import activation_checkpointing, load_policy
from copd_runtime.recipes.diagnose import measure_direction
from copd_runtime.recipes.grpo import policy_update
from copd_runtime.recipes.opd import opd_step
from copd_runtime.rollout import _backbone, forward_logits, response_logprobs, sample, teacher_scores


def _naive_logp(policy, r, temperature):
    with torch.no_grad():
        logits = forward_logits(policy, r.input_ids, r.attention_mask, r.vision)[:, :-1]
    return torch.nn.functional.pad(torch.log_softmax(logits.float() / temperature, -1), (0, 0, 1, 0))


@pytest.fixture(scope="module")
def rollout(tiny_dirs):
    pol = load_policy(tiny_dirs["a"])
    torch.manual_seed(0)
    ex = [e for e in text_examples("arith", 4, 0) + text_examples("reverse", 4, 0) for _ in range(2)]
    return sample(pol, ex, 8, temperature=0.7)


def test_response_logprobs_and_teacher_scores_equal_the_naive_full_logits(tiny_dirs, rollout):
    pol = load_policy(tiny_dirs["b"])
    r, m = rollout, rollout.response_mask.bool()
    logp = _naive_logp(pol, r, 0.7)
    lp = response_logprobs(pol, r, 0.7)
    want = token_logprobs_B_T(forward_logits(pol, r.input_ids, r.attention_mask)[:, :-1], r.input_ids[:, 1:], 0.7)
    assert torch.allclose(lp[m], torch.nn.functional.pad(want, (1, 0))[m].detach(), atol=1e-5)
    assert torch.all(lp[~m] == 0)

    q = torch.randint(0, logp.shape[-1], r.input_ids.shape + (3,))
    got = teacher_scores(pol, r, 0.7, 4, q)
    assert torch.equal(got["sampled_logprobs"], lp.detach())  # one code for π_old, the update, the hub
    top = logp.topk(4, -1)
    assert torch.equal(got["topk_ids"][m], top.indices[m])
    assert torch.allclose(got["topk_logprobs"][m], top.values[m], atol=1e-5)
    assert torch.allclose(got["query_logprobs"][m], logp.gather(-1, q)[m], atol=1e-5)
    assert torch.all(got["topk_ids"][~m] == 0) and torch.all(got["query_logprobs"][~m] == 0)


def test_diagnose_equals_the_full_vocabulary_computation(tiny_dirs):
    s, t = load_policy(tiny_dirs["a"]), load_policy(tiny_dirs["b"])
    probe = text_examples("maxbox", 6, 0)
    ov, kl = measure_direction(s, t, probe, 4, 8, 1.0, seed=3)
    torch.manual_seed(3)
    r = sample(s, probe, 8, 1.0)
    ls, lt = _naive_logp(s, r, 1.0), _naive_logp(t, r, 1.0)
    want_ov = masked_mean(topk_overlap_B_T(ls.topk(4, -1).indices, lt.topk(4, -1).indices), r.response_mask)
    want_kl = masked_mean(symmetric_kl_B_T(ls, lt), r.response_mask)
    assert ov == pytest.approx(want_ov, abs=1e-6) and kl == pytest.approx(want_kl, rel=1e-4)
    assert 0.0 < kl and 0.0 < ov <= 1.0


def _update(tiny_dirs, rollout, **rl):
    pol = load_policy(tiny_dirs["a"])
    opt = torch.optim.SGD(pol.model.parameters(), lr=0.5)  # the parameter change is the clipped gradient
    g = torch.Generator().manual_seed(1)
    adv = group_advantages_P_G(torch.randint(0, 2, (len(rollout) // 2, 2), generator=g).float()).reshape(-1)
    mask = rollout.response_mask
    stats = policy_update(pol, opt, rollout, adv[:, None] * mask, mask, RLSpec(temperature=0.7, **rl))
    return [p.detach().clone() for p in pol.model.parameters()], stats, pol


@pytest.mark.parametrize("mini_batches", [1, 2])
def test_micro_batch_accumulation_and_checkpointing_equal_one_pass(tiny_dirs, rollout, mini_batches):
    L = rollout.input_ids.shape[1]
    base = load_policy(tiny_dirs["a"])
    one, one_stats, _ = _update(tiny_dirs, rollout, mini_batches=mini_batches)
    assert any(not torch.equal(a, b) for a, b in zip(one, base.model.parameters()))
    for extra in ({"micro_batch_tokens": 3 * L}, {"micro_batch_tokens": 1},
                  {"micro_batch_tokens": 2 * L, "gradient_checkpointing": True}):
        got, stats, pol = _update(tiny_dirs, rollout, mini_batches=mini_batches, **extra)
        for a, b in zip(got, one):
            assert torch.allclose(a, b, atol=1e-6), extra
        for key in ("loss", "clip_frac", "ratio_mean"):
            assert stats[key] == pytest.approx(one_stats[key], rel=1e-5, abs=1e-7), (extra, key)
        assert not activation_checkpointing(pol.model) and not pol.model.training  # left as found


def test_identical_weights_give_exactly_zero_opd_gap(tiny_dirs):
    """No tolerance: the student's π_old and the teacher's scores are the same forward."""
    student = load_policy(tiny_dirs["a"])
    hub = InProcessHub({"a": tiny_dirs["a"], "b": tiny_dirs["a"]}, temperature=0.7)
    before = [p.detach().clone() for p in student.model.parameters()]
    opt = torch.optim.AdamW(student.model.parameters(), lr=1e-3)
    peers = {n: Dataset(d, text_examples(d, 16, 0), [], RewardSpec()) for n, d in (("a", "arith"), ("b", "reverse"))}
    torch.manual_seed(0)
    m = opd_step(student, opt, peers, hub, beta=1.0, rl=RLSpec(batch_size=4, max_new_tokens=6, temperature=0.7),
                 opd=OPDSpec(samples_per_prompt=2), diag=DiagnosticsSpec(top_k=4), rng=random.Random(0))
    assert m["tokens"] > 0 and m["advantage_mean"] == 0.0 and m["skipped"] == 1.0
    assert m["topk_overlap/a"] == m["topk_overlap/b"] == 1.0 and m["topk_union_symmetric_kl/b"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, student.model.parameters()))


def test_an_unknown_model_layout_is_refused():
    class NoBackbone(torch.nn.Module):
        config = None

        def get_output_embeddings(self):
            return torch.nn.Linear(2, 3)

    with pytest.raises(ValueError, match="backbone at `.model`"):
        _backbone(NoBackbone())
