"""Device and precision on a real tiny Qwen3, on the CPU (torch runs bf16 kernels there):
`spec.trainer.precision`, bf16 weights with fp32 master weights in the optimizer, identical
bf16 weights give exactly zero OPD gap, and a bf16 stage checkpoints and resumes."""

import random

import pytest
import torch

from copd_core.cycle import Stage
from copd_core.spec import DiagnosticsSpec, OPDSpec, RewardSpec, RLSpec, SpecError, parse_manifest
from copd_runtime.checkpoint import latest_checkpoint, load_optimizer_and_rng
from copd_runtime.data.datasets import text_examples
from copd_runtime.data.examples import Dataset
from copd_runtime.hub import InProcessHub
from copd_runtime.maths.losses import group_advantages_P_G
from copd_runtime.models.device import CPU_FP32, Placement, placement, resolve_precision
from copd_runtime.models.optim import MasterWeightsAdamW, make_optimizer
from copd_runtime.models.policy import load_policy
from copd_runtime.recipes.grpo import policy_update
from copd_runtime.recipes.opd import opd_step
from copd_runtime.recipes.stage import run_branch_stage
from copd_runtime.rollout import response_logprobs, sample, teacher_scores

BF16_CPU = Placement(torch.device("cpu"), torch.bfloat16)


def _manifest(**trainer):
    return {"apiVersion": "copd.io/v1alpha1", "kind": "CoPDRun", "metadata": {"name": "p"},
            "spec": {"baseModel": {"uri": "builtin://tiny-qwen3"},
                     "branches": [{"name": "a", "dataset": {"builtin": "arith"}},
                                  {"name": "b", "dataset": {"builtin": "reverse"}}],
                     "trainer": trainer}}


def test_precision_field_and_its_resolution():
    assert parse_manifest(_manifest()).spec.trainer.precision == "auto"
    assert parse_manifest(_manifest(precision="bf16")).spec.trainer.precision == "bf16"
    with pytest.raises(SpecError, match="trainer.precision"):
        parse_manifest(_manifest(precision="fp16"))
    assert parse_manifest(_manifest(zeroStage=3)).spec.trainer.zero_stage == 3
    with pytest.raises(SpecError, match="trainer.zeroStage"):  # only stages 2 and 3 at admission
        parse_manifest(_manifest(zeroStage=1))
    assert resolve_precision("auto", cuda=True) == "bf16"
    assert resolve_precision("auto", cuda=False) == "fp32"
    assert resolve_precision("fp32", cuda=True) == "fp32"
    if not torch.cuda.is_available():  # this machine: the CPU demo stays fp32
        assert placement("auto") == CPU_FP32
        assert placement("bf16").dtype == torch.bfloat16 and placement("bf16").device.type == "cpu"


def test_rank_environment_sets_the_placement(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    p = placement("fp32", device="cpu")
    assert (p.rank, p.world_size, p.local_rank, p.device.type) == (3, 4, 1, "cpu")


def test_bf16_policy_samples_and_scores_in_bf16(tiny_dirs):
    pol = load_policy(tiny_dirs["a"], placement=BF16_CPU)
    assert all(p.dtype == torch.bfloat16 for p in pol.model.parameters())
    torch.manual_seed(0)
    r = sample(pol, text_examples("arith", 4, 0), 6, temperature=1.0)
    m = r.response_mask.bool()
    assert r.old_logprobs.dtype == torch.float32 and torch.all(r.old_logprobs[m] < 0)
    assert torch.all(r.old_logprobs[~m] == 0)
    # bf16 log-probs are close to the fp32 model's on the same rows (bf16 has ~3 significant digits)
    lp32 = response_logprobs(load_policy(tiny_dirs["a"]), r, 1.0)
    assert (r.old_logprobs[m] - lp32[m]).abs().max() < 0.1
    assert torch.equal(teacher_scores(pol, r, 1.0, 2)["sampled_logprobs"], r.old_logprobs)


def test_bf16_identical_weights_give_exactly_zero_opd_gap(tiny_dirs):
    student = load_policy(tiny_dirs["a"], placement=BF16_CPU)
    hub = InProcessHub({"a": tiny_dirs["a"], "b": tiny_dirs["a"]}, temperature=0.7, placement=BF16_CPU)
    opt = make_optimizer(student.model, 1e-3)
    assert isinstance(opt, MasterWeightsAdamW)
    before = [p.detach().clone() for p in student.model.parameters()]
    peers = {n: Dataset(d, text_examples(d, 16, 0), [], RewardSpec()) for n, d in (("a", "arith"), ("b", "reverse"))}
    torch.manual_seed(0)
    m = opd_step(student, opt, peers, hub, beta=1.0, rl=RLSpec(batch_size=4, max_new_tokens=6, temperature=0.7),
                 opd=OPDSpec(samples_per_prompt=2), diag=DiagnosticsSpec(top_k=4), rng=random.Random(0))
    assert m["tokens"] > 0 and m["advantage_mean"] == 0.0 and m["skipped"] == 1.0
    assert all(torch.equal(a, b) for a, b in zip(before, student.model.parameters()))


def _bf16_update(tiny_dirs, rollout, adv, lr, **rl):
    pol = load_policy(tiny_dirs["a"], placement=BF16_CPU)
    opt = make_optimizer(pol.model, lr)
    mask = rollout.response_mask
    policy_update(pol, opt, rollout, adv[:, None] * mask, mask, RLSpec(temperature=1.0, **rl))
    return pol, opt


def test_master_weights_keep_small_updates_and_accumulate_micro_batches_in_fp32(tiny_dirs):
    pol = load_policy(tiny_dirs["a"], placement=BF16_CPU)
    torch.manual_seed(1)
    r = sample(pol, [e for e in text_examples("arith", 4, 0) for _ in range(2)], 6, temperature=1.0)
    adv = group_advantages_P_G(torch.tensor([[1.0, 0.0]] * 4)).reshape(-1)
    L = r.input_ids.shape[1]

    one, opt1 = _bf16_update(tiny_dirs, r, adv, 1e-6)
    micro, opt2 = _bf16_update(tiny_dirs, r, adv, 1e-6, micro_batch_tokens=2 * L)
    start = [p.detach().float() for p in load_policy(tiny_dirs["a"]).model.parameters()]
    moved = [not torch.equal(m, s) for m, s in zip(opt1.master, start)]
    assert sum(moved) > len(moved) // 2  # a 1e-6 step moves the fp32 masters...
    # ...and the bf16 weights are the masters rounded once
    assert all(torch.equal(p, m.to(torch.bfloat16)) for p, m in zip(one.model.parameters(), opt1.master))
    # micro-batches (gradients summed in fp32) give the same update as one pass, up to bf16 forward noise
    for a, b in zip(opt1.master, opt2.master):
        assert torch.allclose(a, b, atol=5e-6)


def test_master_weights_state_round_trips(tiny_dirs, tmp_path):
    pol, opt = None, None
    pol = load_policy(tiny_dirs["a"], placement=BF16_CPU)
    torch.manual_seed(2)
    r = sample(pol, [e for e in text_examples("reverse", 2, 0) for _ in range(2)], 6, temperature=1.0)
    adv = group_advantages_P_G(torch.tensor([[1.0, 0.0]] * 2)).reshape(-1)
    pol, opt = _bf16_update(tiny_dirs, r, adv, 1e-3)
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    other = load_policy(tiny_dirs["b"], placement=BF16_CPU)
    opt2 = make_optimizer(other.model, 1e-3)
    opt2.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=False))
    assert all(torch.equal(a, b) for a, b in zip(opt.master, opt2.master))
    assert all(torch.equal(a, b) for a, b in zip(pol.model.parameters(), other.model.parameters()))


def test_a_bf16_stage_checkpoints_and_resumes(tmp_path):
    spec = parse_manifest({**_manifest(precision="bf16"), "spec": {
        **_manifest(precision="bf16")["spec"],
        "schedule": {"cycles": 1, "rlStepsPerCycle": 3, "opdStepsPerCycle": 1},
        "rl": {"groupSize": 2, "batchSize": 2, "maxNewTokens": 4, "learningRate": 1e-3}}}).spec
    stopped = {"n": 0}

    def stop_after_two():
        stopped["n"] += 1
        return stopped["n"] == 3

    rep = run_branch_stage(spec, tmp_path, "a", 1, Stage.RL, should_stop=stop_after_two)
    assert rep["done"] is False and rep["step"] == 2
    ck, path = latest_checkpoint(tmp_path, "a")
    saved = load_policy(path, placement=BF16_CPU)
    assert all(p.dtype == torch.bfloat16 for p in saved.model.parameters())  # a bf16 HF checkpoint
    opt = make_optimizer(saved.model, 1e-3)
    load_optimizer_and_rng(path, opt)
    assert all(torch.equal(p, m.to(torch.bfloat16)) for p, m in zip(saved.model.parameters(), opt.master))
    rep = run_branch_stage(spec, tmp_path, "a", 1, Stage.RL)
    assert rep["done"] is True and latest_checkpoint(tmp_path, "a")[0].step == 3
