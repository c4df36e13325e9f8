"""The streaming merge (one tensor at a time, sharded output) equals the in-memory merge exactly."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from copd_runtime.models.policy import load_policy, save_policy
from copd_runtime.recipes import merge
from copd_runtime.recipes.merge import INDEX, merge_dirs, merge_in_memory, read_state


@pytest.fixture(scope="module")
def bf16_dirs(tiny_dirs, tmp_path_factory):
    """The tiny branches and base saved in bf16 and sharded (several input files per model)."""
    root = tmp_path_factory.mktemp("bf16")
    out = {}
    for name, d in tiny_dirs.items():
        pol = load_policy(d)
        pol.model.to(torch.bfloat16)
        pol.model.save_pretrained(root / name, max_shard_size=20_000)
        (pol.processor or pol.tokenizer).save_pretrained(root / name)
        out[name] = root / name
    assert len(list(out["a"].glob("*.safetensors"))) > 1
    return out


def _three_branches(dirs, tmp_path):
    """a, b and a third branch c = a copy of a, shifted (three distinct inputs)."""
    pol = load_policy(dirs["a"])
    with torch.no_grad():
        for p in pol.model.parameters():
            p.add_(0.01)
    save_policy(pol, tmp_path / "c")
    return [dirs["a"], dirs["b"], tmp_path / "c"]


@pytest.mark.parametrize("method", ["linear", "task-arithmetic"])
def test_streaming_merge_equals_in_memory_merge_exactly(tiny_dirs, bf16_dirs, tmp_path, method, monkeypatch):
    monkeypatch.setattr(merge, "BLOCK_ELEMENTS", 1000)  # several blocks of rows per matrix, a ragged last one
    for dirs, tag in ((tiny_dirs, "fp32"), (bf16_dirs, "bf16")):
        branches = [dirs["a"], dirs["b"]] if tag == "bf16" else _three_branches(dirs, tmp_path)
        weights = [1.0, 3.0, 0.5][: len(branches)]
        kw = {"method": method, "base_dir": dirs["base"], "scale": 0.7}
        want = merge_in_memory(branches, weights, **kw)
        out = merge_dirs(branches, weights, tmp_path / f"{tag}-{method}", max_shard_bytes=30_000, **kw)
        index = json.loads((out / INDEX).read_text())
        shards = sorted(out.glob("model-*-of-*.safetensors"))
        assert len(shards) > 2 and set(index["weight_map"].values()) == {s.name for s in shards}
        assert not (out / "model.safetensors").exists() and not (out / "manifest.json").exists()
        got = read_state(out)
        assert set(got) == set(want) == set(index["weight_map"])
        for n, t in want.items():
            assert got[n].dtype == t.dtype == (torch.bfloat16 if tag == "bf16" else torch.float32), n
            assert torch.equal(got[n], t), (tag, n)
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in want.values())
        model = AutoModelForCausalLM.from_pretrained(out, dtype=want[next(iter(want))].dtype)
        sd = model.state_dict()
        for n, t in want.items():
            assert torch.equal(sd[n], t), n
        assert (out / "tokenizer.json").exists()


def test_streaming_merge_one_shard_is_model_safetensors(tiny_dirs, tmp_path):
    out = merge_dirs([tiny_dirs["a"], tiny_dirs["b"]], [1, 1], tmp_path / "m")
    assert [p.name for p in out.glob("*.safetensors")] == ["model.safetensors"] and not (out / INDEX).exists()


def test_streaming_merge_rejects_different_tensors(tiny_dirs, bf16_dirs, tmp_path):
    pol = load_policy(tiny_dirs["a"])
    pol.model.config.tie_word_embeddings = False  # an extra lm_head.weight
    pol.model.lm_head.weight = torch.nn.Parameter(pol.model.lm_head.weight.detach().clone())
    save_policy(pol, tmp_path / "untied")
    with pytest.raises(ValueError, match="differ"):
        merge_dirs([tiny_dirs["a"], tmp_path / "untied"], [1, 1], tmp_path / "m")
    assert not (tmp_path / "m").exists()
