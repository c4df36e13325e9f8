"""`spec.trainer.compile` on a real tiny Qwen3 on the CPU (TorchInductor's CPU backend): the
compiled blocks give the eager update and π_old, generation runs the eager blocks, and a stage with
`compile: true` trains, checkpoints and resumes."""

import torch

from copd_core.cycle import Stage
from copd_core.spec import RLSpec, parse_manifest
from copd_runtime.checkpoint import latest_checkpoint
from copd_runtime.data.datasets import text_examples
from copd_runtime.maths.losses import group_advantages_P_G
from copd_runtime.models.compile import compile_blocks, eager_blocks, repeated_blocks
from copd_runtime.models.policy import load_policy
from copd_runtime.recipes.grpo import policy_update
from copd_runtime.recipes.stage import run_branch_stage
from copd_runtime.rollout import response_logprobs, sample


def _update(pol, r, adv):
    opt = torch.optim.SGD(pol.model.parameters(), lr=1.0)  # the weights move by the (clipped) gradient
    mask = r.response_mask
    stats = policy_update(pol, opt, r, adv[:, None] * mask, mask, RLSpec(temperature=1.0))
    return stats


def test_compiled_blocks_give_the_eager_update_and_pi_old(tiny_dirs):
    eager, compiled = load_policy(tiny_dirs["a"]), load_policy(tiny_dirs["a"])
    layers = compiled.model.model.layers
    assert repeated_blocks(compiled.model) == list(layers)  # Qwen3DecoderLayer, from _no_split_modules
    assert compile_blocks(compiled.model) == len(layers) and all("forward" in vars(b) for b in layers)
    assert compile_blocks(compiled.model) == len(layers)  # twice is once: no compile of a compiled forward
    with eager_blocks(compiled.model):
        assert not any("forward" in vars(b) for b in layers)
    assert all("forward" in vars(b) for b in layers)  # put back

    torch.manual_seed(3)
    r = sample(compiled, [e for e in text_examples("arith", 4, 0) for _ in range(2)], 6, temperature=1.0)
    torch.manual_seed(3)
    r_eager = sample(eager, [e for e in text_examples("arith", 4, 0) for _ in range(2)], 6, temperature=1.0)
    assert torch.equal(r.input_ids, r_eager.input_ids)  # generation ran the same (eager) blocks
    m = r.response_mask.bool()
    assert (r.old_logprobs[m] - r_eager.old_logprobs[m]).abs().max() < 1e-5  # π_old through compiled blocks

    adv = group_advantages_P_G(torch.tensor([[1.0, 0.0]] * 4)).reshape(-1)
    start = [p.detach().clone() for p in eager.model.parameters()]
    s_eager, s_compiled = _update(eager, r, adv), _update(compiled, r, adv)
    assert abs(s_eager["loss"] - s_compiled["loss"]) < 1e-5
    # SGD with lr 1: each weight moves by its gradient; Inductor sums in another order
    step_e = [pe.detach() - p0 for pe, p0 in zip(eager.model.parameters(), start)]
    step_c = [pc.detach() - p0 for pc, p0 in zip(compiled.model.parameters(), start)]
    biggest = max(float(d.abs().max()) for d in step_e)
    assert biggest > 1e-3
    assert max(float((a - b).abs().max()) for a, b in zip(step_e, step_c)) < 1e-4 * biggest
    after = response_logprobs(compiled, r, 1.0)
    assert (after[m] - response_logprobs(eager, r, 1.0)[m]).abs().max() < 1e-4


def test_a_compiled_stage_trains_checkpoints_and_resumes(tmp_path):
    spec = parse_manifest({
        "apiVersion": "copd.io/v1alpha1", "kind": "CoPDRun", "metadata": {"name": "c"},
        "spec": {"baseModel": {"uri": "builtin://tiny-qwen3"},
                 "branches": [{"name": "a", "dataset": {"builtin": "arith"}},
                              {"name": "b", "dataset": {"builtin": "reverse"}}],
                 "schedule": {"cycles": 1, "rlStepsPerCycle": 2, "opdStepsPerCycle": 0},
                 "rl": {"groupSize": 2, "batchSize": 2, "maxNewTokens": 4},
                 "trainer": {"compile": True}}}).spec
    assert spec.trainer.compile
    rep = run_branch_stage(spec, tmp_path, "a", 1, Stage.RL, checkpoint_every=1)
    assert rep["done"] and rep["step"] == 2 and rep["reward"] is not None
    ck, path = latest_checkpoint(tmp_path, "a")
    assert (ck.cycle, ck.stage, ck.step) == (1, "RL", 2)
    names = {p.name for p in path.iterdir()}
    assert "config.json" in names and not any("_orig_mod" in n for n in names)
    again = run_branch_stage(spec, tmp_path, "a", 1, Stage.RL, checkpoint_every=1)
    assert again["done"] and again["message"] == "already complete"
