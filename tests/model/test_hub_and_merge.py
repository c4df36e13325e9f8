"""Hub scoring (in-process and over HTTP) and merging, on real tiny Qwen3 models."""

import random
import threading

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from copd_core.spec import DiagnosticsSpec, OPDSpec, RewardSpec, RLSpec
from copd_runtime.data.datasets import text_examples
from copd_runtime.data.examples import Dataset
from copd_runtime.hub import HttpHub, InProcessHub, make_server
from copd_runtime.models.policy import load_policy
from copd_runtime.recipes.merge import linear_merge, merge_dirs, task_arithmetic_merge
from copd_runtime.recipes.opd import opd_step
from copd_runtime.rollout import response_logprobs, sample
from tests.model.helpers import SamplerLogits


def test_behaviour_logprobs_equal_the_samplers_own(tiny_dirs):
    """π_old is the trainer's forward: it must be the distribution generate() sampled from."""
    pol = load_policy(tiny_dirs["a"])
    torch.manual_seed(0)
    ex = text_examples("arith", 6, 0) + text_examples("reverse", 6, 0)  # different prompt lengths
    with SamplerLogits(pol) as sampler:
        r = sample(pol, ex, 8, temperature=0.7)
    assert r.response_mask.sum() > 0
    assert torch.allclose(r.old_logprobs, sampler.behaviour_logprobs(r, 0.7), atol=1e-4)
    assert torch.all(r.old_logprobs[r.response_mask == 0] == 0)
    with torch.no_grad():
        assert torch.equal(response_logprobs(pol, r, 0.7), r.old_logprobs)  # deterministic


@pytest.fixture
def http_hub(tiny_dirs):
    hub = InProcessHub({"a": tiny_dirs["a"], "b": tiny_dirs["b"]}, temperature=1.0)
    server = make_server(hub, "127.0.0.1", 0)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield hub, HttpHub(f"http://127.0.0.1:{server.server_address[1]}", wait_ready_s=10)
    server.shutdown()


def test_http_hub_returns_what_the_in_process_hub_returns(tiny_dirs, http_hub):
    local, remote = http_hub
    student = load_policy(tiny_dirs["a"])
    torch.manual_seed(1)
    r = sample(student, text_examples("maxbox", 5, 0), 8, 1.0)
    q = torch.randint(0, 60, r.input_ids.shape + (3,))
    want = local.score("b", r, k=4, query_ids=q)
    got = remote.score("b", r, k=4, query_ids=q)
    assert set(got) == {"sampled_logprobs", "topk_ids", "topk_logprobs", "query_logprobs"}
    for key in want:
        assert torch.allclose(got[key].float(), want[key].float(), atol=1e-6), key
    assert got["topk_ids"].shape[-1] == 4
    # the teacher's sampled-token log-prob is one of its own distribution's values
    assert torch.all(got["sampled_logprobs"] <= 0)
    with pytest.raises(RuntimeError, match="no teacher 'ghost'"):
        remote.score("ghost", r, k=4)


def test_opd_step_through_the_http_hub_changes_the_student(tiny_dirs, http_hub):
    _, remote = http_hub
    student = load_policy(tiny_dirs["a"])
    before = [p.detach().clone() for p in student.model.parameters()]
    opt = torch.optim.AdamW(student.model.parameters(), lr=1e-3)
    peer = {"b": Dataset("reverse", text_examples("reverse", 32, 0), [], RewardSpec())}
    torch.manual_seed(0)
    m = opd_step(student, opt, peer, remote, beta=1.0, rl=RLSpec(batch_size=4, max_new_tokens=6),
                 opd=OPDSpec(samples_per_prompt=2), diag=DiagnosticsSpec(top_k=4), rng=random.Random(0))
    assert 0.0 <= m["topk_overlap/b"] <= 1.0 and m["topk_union_symmetric_kl/b"] >= 0.0 and m["tokens"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, student.model.parameters()))


def test_linear_and_task_arithmetic_merge_match_reference():
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(3, 2, generator=g)}
    s1 = {"w": torch.randn(3, 2, generator=g)}
    s2 = {"w": torch.randn(3, 2, generator=g)}
    lin = linear_merge([s1, s2], [1.0, 3.0])
    assert torch.allclose(lin["w"], 0.25 * s1["w"] + 0.75 * s2["w"])
    ta = task_arithmetic_merge(base, [s1, s2], [0.5, 0.5], scale=0.8)
    assert torch.allclose(ta["w"], base["w"] + 0.8 * (0.5 * (s1["w"] - base["w"]) + 0.5 * (s2["w"] - base["w"])))
    with pytest.raises(ValueError, match="differ"):
        linear_merge([s1, {"v": s1["w"]}], [1, 1])


def test_merged_directory_loads_with_from_pretrained(tiny_dirs, tmp_path):
    out = merge_dirs([tiny_dirs["a"], tiny_dirs["b"]], [0.5, 0.5], tmp_path / "merged")
    model = AutoModelForCausalLM.from_pretrained(out)
    a, b = load_file(tiny_dirs["a"] / "model.safetensors"), load_file(tiny_dirs["b"] / "model.safetensors")
    merged = load_file(out / "model.safetensors")
    for name in a:
        assert torch.allclose(merged[name], (a[name] + b[name]) / 2, atol=1e-6)
    assert (out / "tokenizer.json").exists()
    sd = model.state_dict()
    name = "model.embed_tokens.weight"
    assert torch.allclose(sd[name], merged[name])
    ta = merge_dirs([tiny_dirs["a"], tiny_dirs["b"]], [0.5, 0.5], tmp_path / "ta", method="task-arithmetic",
                    base_dir=tiny_dirs["base"], scale=1.0)
    assert AutoModelForCausalLM.from_pretrained(ta) is not None


def test_opd_from_an_identical_teacher_leaves_the_student_unchanged(tiny_dirs):
    """Nothing to learn must mean no update (Adam would blow float noise up to full steps)."""
    student = load_policy(tiny_dirs["a"])
    hub = InProcessHub({"a": tiny_dirs["a"]}, temperature=1.0)
    before = [p.detach().clone() for p in student.model.parameters()]
    opt = torch.optim.AdamW(student.model.parameters(), lr=1e-3)
    peer = {"a": Dataset("arith", text_examples("arith", 16, 0), [], RewardSpec())}
    torch.manual_seed(0)
    m = opd_step(student, opt, peer, hub, beta=1.0, rl=RLSpec(batch_size=4, max_new_tokens=6),
                 opd=OPDSpec(samples_per_prompt=2), diag=DiagnosticsSpec(top_k=4), rng=random.Random(0))
    assert m["skipped"] == 1.0 and m["topk_overlap/a"] == 1.0
    assert all(torch.equal(a, b) for a, b in zip(before, student.model.parameters()))
