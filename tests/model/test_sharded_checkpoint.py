"""Checkpoints hold the model as sharded Hugging Face safetensors in the training dtype: a bf16
stage writes bf16 shards (fp32 master weights only in the optimizer state), every shard and the
index are in the manifest, `from_pretrained` and the trainer's resume both load them."""

import json

import torch
from transformers import AutoModelForCausalLM

from copd_core.cycle import Stage
from copd_core.spec import parse_manifest
from copd_runtime import checkpoint
from copd_runtime.checkpoint import latest_checkpoint, load_optimizer_and_rng, verify_checkpoint
from copd_runtime.models.optim import make_optimizer
from copd_runtime.models.policy import load_policy
from copd_runtime.recipes.merge import INDEX, _header
from copd_runtime.recipes.stage import run_branch_stage
from tests.model.test_precision import BF16_CPU, _manifest


def test_a_bf16_checkpoint_is_sharded_bf16_safetensors_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "MAX_SHARD_BYTES", 40_000)  # the tiny model: ~10 shards
    m = _manifest(precision="bf16")
    spec = parse_manifest({**m, "spec": {**m["spec"], "schedule": {"cycles": 1, "rlStepsPerCycle": 3,
                                                                   "opdStepsPerCycle": 1},
                                         "rl": {"groupSize": 2, "batchSize": 2, "maxNewTokens": 4,
                                                "learningRate": 1e-3}}}).spec
    calls = {"n": 0}

    def stop_after_two():
        calls["n"] += 1
        return calls["n"] == 3

    rep = run_branch_stage(spec, tmp_path, "a", 1, Stage.RL, should_stop=stop_after_two)
    assert rep["done"] is False and rep["step"] == 2
    ck, path = latest_checkpoint(tmp_path, "a")
    shards = sorted(path.glob("model-*-of-*.safetensors"))
    index = json.loads((path / INDEX).read_text())
    assert len(shards) > 2 and set(index["weight_map"].values()) == {s.name for s in shards}
    assert not (path / "model.safetensors").exists()
    for s in shards:  # the training dtype on disk, every tensor
        assert s.stat().st_size <= 40_000 + 8192 or len(_header(s)) == 1, s.name
        assert {h["dtype"] for h in _header(s).values()} == {"BF16"}, s.name
    files = json.loads((path / checkpoint.MANIFEST).read_text())["files"]
    assert {s.name for s in shards} | {INDEX, "optimizer.pt", "rng.pt", "state.json"} <= set(files)

    # transformers loads the shards as they are
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    ours = load_policy(path, placement=BF16_CPU)
    for (n, a), (_, b) in zip(hf.state_dict().items(), ours.model.state_dict().items()):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b), n
    # the fp32 master weights are the optimizer's, and round to the bf16 shards
    opt = make_optimizer(ours.model, 1e-3)
    load_optimizer_and_rng(path, opt)
    assert all(m.dtype == torch.float32 for m in opt.master)
    assert all(torch.equal(p, m.to(torch.bfloat16)) for p, m in zip(ours.model.parameters(), opt.master))

    # one shard damaged: the manifest catches it
    assert verify_checkpoint(path) is None
    data = bytearray(shards[1].read_bytes())
    data[-1] ^= 0xFF
    shards[1].write_bytes(bytes(data))
    assert "does not match" in verify_checkpoint(path)
    shards[1].write_bytes(bytes(data[:-1]) + bytes([data[-1] ^ 0xFF]))
    assert verify_checkpoint(path) is None

    rep = run_branch_stage(spec, tmp_path, "a", 1, Stage.RL)
    assert rep["done"] is True and rep["resumed_step"] == 2 and latest_checkpoint(tmp_path, "a")[0].step == 3
