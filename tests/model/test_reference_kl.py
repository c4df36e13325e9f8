"""`rl.klCoef`: GRPO's reference-KL penalty on a real tiny Qwen3 (the reference is the base model)."""

import random

import pytest
import torch

from copd_core.spec import RewardSpec, RLSpec
from copd_runtime.data.datasets import text_examples
from copd_runtime.data.examples import Dataset
from copd_runtime.models.policy import load_policy
from copd_runtime.recipes.grpo import grpo_step
from copd_runtime.rollout import forward_logits, predicts_response_N_L, sample


def odd_length(text, ex):
    """A reward that does not aim at the base: odd-length responses."""
    return float(len(text) % 2)


def _step(tiny_dirs, kl_coef: float, with_reference: bool, reward_fn=odd_length, lr: float = 0.05,
          examples: int = 16, batch_size: int = 4):
    """One GRPO step of branch `a` (a perturbed copy of the base) from the same seed."""
    policy = load_policy(tiny_dirs["a"])
    ref = load_policy(tiny_dirs["base"]) if with_reference else None
    # plain SGD: the step is along the (clipped) gradient, so its direction is what we test
    opt = torch.optim.SGD(policy.model.parameters(), lr=lr)
    ds = Dataset("arith", text_examples("arith", examples, 0), [], RewardSpec())
    rl = RLSpec(batch_size=batch_size, group_size=4, max_new_tokens=6, kl_coef=kl_coef)
    torch.manual_seed(7)
    stats = grpo_step(policy, opt, ds, rl, random.Random(7), reward_fn, reference=ref)
    return policy, stats


def _probe_kls(tiny_dirs, *policies) -> list[float]:
    """Exact KL to the base on fixed states sampled from the unchanged branch: start, then each policy."""
    base = load_policy(tiny_dirs["base"])
    torch.manual_seed(11)
    probe = sample(load_policy(tiny_dirs["a"]), text_examples("arith", 24, 5), 6, 1.0)
    return [_kl_to_base(p, base, probe) for p in (load_policy(tiny_dirs["a"]), *policies)]


def _kl_to_base(policy, base, rollout) -> float:
    """Exact KL(π_θ ‖ π_base) over the whole vocabulary, averaged over fixed response states."""
    at = predicts_response_N_L(rollout)
    with torch.no_grad():
        lp, lb = (torch.log_softmax(forward_logits(p, rollout.input_ids, rollout.attention_mask)[:, :-1][at], -1)
                  for p in (policy, base))
    return float((lp.exp() * (lp - lb)).sum(-1).mean())


def test_kl_coef_zero_is_the_plain_update_and_positive_pulls_toward_the_base(tiny_dirs):
    plain, s0 = _step(tiny_dirs, 0.0, with_reference=False)
    zero, sz = _step(tiny_dirs, 0.0, with_reference=True)
    for (n, p), (_, q) in zip(plain.model.named_parameters(), zero.model.named_parameters()):
        assert torch.equal(p, q), n  # klCoef 0: the reference changes nothing
    assert "ref_kl" not in s0 and "ref_kl" not in sz and s0["loss"] == sz["loss"]

    kl, sk = _step(tiny_dirs, 1.0, with_reference=True)
    assert sk["ref_kl"] > 0  # a: base + noise, so it starts away from the reference
    changed = [n for (n, p), (_, q) in zip(plain.model.named_parameters(), kl.model.named_parameters())
               if not torch.equal(p, q)]
    assert changed
    start, after_plain, after_kl = _probe_kls(tiny_dirs, plain, kl)
    print(f"KL(π‖π_base): start {start:.4f}, after a step with klCoef 0 {after_plain:.4f}, klCoef 1 {after_kl:.4f}")
    # the same reward step, with the penalty: it ends closer to the base than without it
    assert after_kl < after_plain, (start, after_plain, after_kl)


def test_with_no_reward_signal_the_penalty_alone_pulls_toward_the_base(tiny_dirs):
    """Uniform rewards: no advantage, so a klCoef 0 step is skipped and a klCoef > 0 step is the
    penalty's gradient alone, which must lower the exact KL to the base."""
    plain, s0 = _step(tiny_dirs, 0.0, with_reference=False, reward_fn=lambda text, ex: 1.0)
    assert s0["skipped"] == 1.0
    kl, sk = _step(tiny_dirs, 1.0, with_reference=True, reward_fn=lambda text, ex: 1.0, lr=0.02,
                   examples=64, batch_size=16)  # 64 sequences: the sampled estimate is not too noisy
    assert sk["skipped"] == 0.0 and sk["ref_kl"] > 0
    start, after_plain, after_kl = _probe_kls(tiny_dirs, plain, kl)
    print(f"KL(π‖π_base), no reward signal: start {start:.4f}, klCoef 0 {after_plain:.4f}, klCoef 1 {after_kl:.4f}")
    assert after_plain == start  # nothing moved
    assert after_kl < start, (start, after_kl)


def test_kl_coef_needs_the_reference(tiny_dirs):
    with pytest.raises(ValueError, match="klCoef"):
        _step(tiny_dirs, 0.1, with_reference=False)
