"""DeepSpeed ZeRO data parallel on the CPU: 2 processes under torchrun (gloo, DS_ACCELERATOR=cpu)
give the same update as one process with the whole batch, and resume from their sharded state;
ZeRO-2 (optimizer state sharded) and ZeRO-3 (the weights too, the LM head's included)."""

import os
import subprocess
import sys

import pytest
import torch

from copd_core.spec import RLSpec
from copd_runtime.data.datasets import text_examples
from copd_runtime.maths.losses import group_advantages_P_G
from copd_runtime.models.distributed import PERSISTENCE_ENV
from copd_runtime.models.optim import make_optimizer
from copd_runtime.models.policy import load_policy
from copd_runtime.recipes.grpo import policy_update
from copd_runtime.rollout import sample, teacher_scores
from tests import ROOT

pytest.importorskip("deepspeed")

LR = 1e-3


def _case(tiny_dirs, tmp_path):
    pol = load_policy(tiny_dirs["a"])
    torch.manual_seed(4)
    G = 2
    rollout = sample(pol, [e for e in text_examples("arith", 3, 0) for _ in range(G)], 6, temperature=1.0)
    adv = group_advantages_P_G(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])).reshape(-1)
    L = rollout.input_ids.shape[1]
    # 3 groups over 2 ranks: 4 rows and 2 rows, 2 and 1 micro-batches (the short rank pads)
    rl = {"temperature": 1.0, "micro_batch_tokens": 2 * L}
    torch.save({"rollout": rollout, "advantages": adv, "group_size": G, "rl": rl, "lr": LR}, tmp_path / "case.pt")
    return rollout, adv, rl


def _single_process(tiny_dirs, rollout, adv, rl):
    pol = load_policy(tiny_dirs["a"])
    opt = make_optimizer(pol.model, LR)
    mask = rollout.response_mask
    out = []
    for _ in range(2):
        policy_update(pol, opt, rollout, adv[:, None] * mask, mask, RLSpec(**rl))
        out.append({n: p.detach().clone() for n, p in pol.model.named_parameters()})
    return out


@pytest.mark.slow
@pytest.mark.timeout(2700)  # torchrun subprocesses: minutes each on a loaded 2-core machine
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_two_process_zero_update_equals_one_process_and_resumes(tiny_dirs, tmp_path, zero_stage):
    rollout, adv, rl = _case(tiny_dirs, tmp_path)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "COPD_DEVICE": "cpu",
           "PYTHONPATH": str(ROOT), PERSISTENCE_ENV: "0"}  # ZeRO-3: every weight partitioned, none kept whole
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
           "tests.model.zero_worker", str(tiny_dirs["a"]), str(tmp_path / "case.pt"), str(tmp_path),
           str(zero_stage)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)  # hang guard
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    got = torch.load(tmp_path / "result.pt", weights_only=False)
    assert got["world"] == 2
    # ZeRO-3: each rank held slices of every weight (the LM head's included); ZeRO-2: whole weights
    assert (len(got["partitioned"]) > 0) == (zero_stage == 3)
    assert zero_stage == 2 or "model.embed_tokens.weight" in got["partitioned"]

    want1, want2 = _single_process(tiny_dirs, rollout, adv, rl)
    base = dict(load_policy(tiny_dirs["a"]).model.named_parameters())
    assert any(not torch.equal(want1[n], base[n]) for n in want1)  # the update moved the weights
    for key, want in (("after1", want1), ("after2", want2), ("resumed2", want2)):
        for n, w in want.items():
            assert torch.allclose(got[key][n], w, atol=2e-6, rtol=1e-5), (key, n, (got[key][n] - w).abs().max())
    assert got["stats1"]["skipped"] == 0.0

    # scoring with the (partitioned) trained model equals the 1-process model's on rank 0's rows
    pol = load_policy(tiny_dirs["a"])
    with torch.no_grad():
        for n, p in pol.model.named_parameters():
            p.copy_(want2[n])
    want = teacher_scores(pol, rollout.select(got["rows"]), 1.0, 4)
    assert torch.allclose(got["scores"]["sampled_logprobs"], want["sampled_logprobs"], atol=1e-5)
    assert torch.allclose(got["scores"]["topk_logprobs"], want["topk_logprobs"], atol=1e-5)
    assert torch.equal(got["scores"]["topk_ids"], want["topk_ids"])
