"""Our side of the vLLM engine (copd_runtime.vllm_engine) against vLLM 0.33's own classes
(RequestOutput, CompletionOutput, Logprob, SamplingParams), built on CPU.

vLLM itself cannot run here (its kernels need CUDA): the outputs are filled with what vLLM would
put in them, computed from a real tiny Qwen3 (the sampled tokens of transformers' `generate`; the
exact log-softmax of a full forward at each prompt position, top-k by rank plus the actual token,
and the log-probs of the requested ids by vLLM's documented row rule), and the conversion must
give what transformers' path gives. The engines (sleep, wake, weight reload, generate) are not
exercised.

vLLM's Python modules come from .vllm-classes/, which scripts/setup.sh fills with
`uv pip install --no-deps --target` vllm 0.33.0 and the ten small packages its output classes
import (pins from uv.lock's `gpu` fork), imported next to this venv's torch 2.15 (vLLM pins 2.14;
these classes are plain Python).
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from copd_runtime.data.datasets import text_examples
from copd_runtime.hub import coalesce
from copd_runtime.models.policy import load_policy
from copd_runtime.rollout import encode_prompts, forward_logits, response_logprobs, sample, teacher_scores
from copd_runtime.vllm_engine import (
    generation_params,
    rollout_from_outputs,
    scores_from_outputs,
    scoring_requests,
    unpadded_rows,
)
from tests import ROOT

VLLM_CLASSES = ROOT / ".vllm-classes"
if not (VLLM_CLASSES / "vllm" / "outputs.py").is_file():
    pytest.skip(f"vLLM's Python classes are not installed in {VLLM_CLASSES} (scripts/setup.sh installs them "
                "unless COPD_SKIP_VLLM_CLASSES=1)", allow_module_level=True)
sys.path.append(str(VLLM_CLASSES))  # after the venv: its packages win where both have one

from vllm import __version__ as vllm_version  # noqa: E402
from vllm.logprobs import Logprob  # noqa: E402
from vllm.outputs import CompletionOutput, RequestOutput  # noqa: E402
from vllm.sampling_params import SamplingParams  # noqa: E402


def test_the_classes_are_vllm_0_33():
    assert vllm_version == "0.33.0"
    assert RequestOutput.__module__ == "vllm.outputs" and Logprob.__module__ == "vllm.logprobs"


def _examples(n: int):
    return [ex for i, d in enumerate(["arith", "reverse", "maxbox"]) for ex in text_examples(d, n, i)]


def _completions(policy, r, prompt_mask) -> list[RequestOutput]:
    """What vLLM returns for the rows of `r`: the sampled tokens up to and including EOS."""
    P = prompt_mask.shape[1]
    outs = []
    for n, (_, prompt) in enumerate(unpadded_rows(r.input_ids[:, :P], prompt_mask)):
        tokens = r.input_ids[n, P:][r.response_mask[n, P:] > 0].tolist()
        done = CompletionOutput(index=0, text="", token_ids=tokens, cumulative_logprob=None, logprobs=None,
                                finish_reason="length" if bool(r.truncated[n]) else "stop")
        outs.append(RequestOutput(request_id=str(n), prompt=None, prompt_token_ids=prompt, prompt_logprobs=None,
                                  outputs=[done], finished=True))
    return outs


def test_vllm_completions_become_the_rollout_transformers_gives(tiny_dirs):
    policy = load_policy(tiny_dirs["a"])
    examples = _examples(3)
    torch.manual_seed(0)
    want = sample(policy, examples, 10, temperature=1.0, logprobs=False)
    assert want.truncated.any() and not want.truncated.all(), "want rows that stop and rows that do not"
    enc = encode_prompts(policy, examples)
    got = rollout_from_outputs(policy, examples, enc["input_ids"], enc["attention_mask"],
                               _completions(policy, want, enc["attention_mask"]))
    for name in ("input_ids", "attention_mask", "response_mask", "truncated"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert got.responses == want.responses


def test_the_sampling_request_is_valid_for_vllm():
    p = SamplingParams(**generation_params(12, 0.7, False, eos_id=5, seed=123))
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens, p.seed, p.n) == (0.7, 1.0, 0, 12, 123, 1)
    assert p.ignore_eos and p.stop_token_ids == [5] and not p.detokenize  # stops at the policy's EOS only
    assert SamplingParams(**generation_params(4, 0.7, True, eos_id=5, seed=1)).temperature == 0.0  # greedy


class _ReplayEngine:
    """Stands in for ColocatedEngine.sample (whose vLLM cannot run here): transformers samples the
    tokens, they travel through vLLM's RequestOutput and our conversion."""

    def __init__(self):
        self.calls = 0

    def sample(self, policy, examples, max_new_tokens, temperature, greedy):
        self.calls += 1
        generator, policy.generator = policy.generator, None
        try:
            r = sample(policy, examples, max_new_tokens, temperature, greedy, logprobs=False)
        finally:
            policy.generator = generator
        enc = encode_prompts(policy, examples)
        return rollout_from_outputs(policy, examples, enc["input_ids"], enc["attention_mask"],
                                    _completions(policy, r, enc["attention_mask"]))


def test_sample_through_a_generator_keeps_pi_old_the_trainers_forward(tiny_dirs):
    policy = load_policy(tiny_dirs["a"])
    policy.generator = engine = _ReplayEngine()
    r = sample(policy, _examples(2), 8, temperature=1.0)
    assert engine.calls == 1
    want = response_logprobs(policy, r, 1.0)
    assert torch.equal(r.old_logprobs, want) and (r.old_logprobs != 0).any()


def _vllm_scores(teacher, tokens: list[int], kw: dict, k: int) -> RequestOutput:
    """The RequestOutput vLLM gives for this scoring request: the exact log-softmax of the teacher's
    forward over `tokens`; prompt_logprobs[j] predicts token j (top-k by rank + the actual token);
    row i of prompt_token_id_logprobs predicts token prompt_logprob_start + i + 1."""
    ids = torch.tensor([tokens])
    with torch.no_grad():
        logp = torch.log_softmax(forward_logits(teacher, ids, torch.ones_like(ids))[0].float(), -1)
    ranks = logp.argsort(-1, descending=True).argsort(-1) + 1
    prompt_logprobs = [None]
    for j in range(1, len(tokens)):
        dist = logp[j - 1]
        keep = dist.topk(k).indices.tolist() + [tokens[j]]
        prompt_logprobs.append({t: Logprob(logprob=float(dist[t]), rank=int(ranks[j - 1, t])) for t in keep})
    by_id = None
    if "prompt_logprob_token_ids" in kw:
        start = kw["prompt_logprob_start"]
        rows = kw["prompt_logprob_token_ids"]
        assert len(rows) == len(tokens) - 1 - start  # vLLM's input processor refuses any other count
        by_id = np.array([[float(logp[start + i, t]) for t in row] for i, row in enumerate(rows)], np.float32)
    done = CompletionOutput(index=0, text="", token_ids=[0], cumulative_logprob=None, logprobs=None,
                            finish_reason="length")
    return RequestOutput(request_id="0", prompt=None, prompt_token_ids=tokens, prompt_logprobs=prompt_logprobs,
                         outputs=[done], finished=True, prompt_token_id_logprobs=by_id)


@pytest.mark.parametrize("with_query", [True, False], ids=["query", "no-query"])
def test_vllm_prompt_logprobs_become_the_scores_transformers_gives(tiny_dirs, with_query):
    student, teacher = load_policy(tiny_dirs["a"]), load_policy(tiny_dirs["b"])
    torch.manual_seed(1)
    # two batches of other lengths, coalesced as the hub does: left and right padding
    r = coalesce([sample(student, _examples(2), 6, 1.0, logprobs=False),
                  sample(student, _examples(1)[:2], 11, 1.0, logprobs=False)], student.pad_id)
    k, Q = 4, 3
    query = torch.randint(0, 60, r.input_ids.shape + (Q,), generator=torch.Generator().manual_seed(2)) \
        if with_query else None
    reqs = scoring_requests(r, k, query)
    for _, kw in reqs:
        SamplingParams(**kw)  # vLLM's own argument checks
    outputs = [_vllm_scores(teacher, tokens, kw, k) for tokens, kw in reqs]
    got = scores_from_outputs(r, outputs, k, Q if with_query else None)
    want = teacher_scores(teacher, r, 1.0, k, query)
    assert set(got) == set(want)
    for name in want:
        assert got[name].shape == want[name].shape, name
        if name == "topk_ids":
            assert torch.equal(got[name], want[name])
        else:
            assert torch.allclose(got[name], want[name], atol=1e-5), (name, (got[name] - want[name]).abs().max())
    assert (got["sampled_logprobs"] != 0).sum() == r.response_mask.sum()


def test_rows_vllm_cannot_take_and_aborted_requests_are_refused(tiny_dirs):
    policy = load_policy(tiny_dirs["a"])
    torch.manual_seed(3)
    r = sample(policy, _examples(1), 5, 1.0, logprobs=False)
    holed = r.select(list(range(len(r))))
    holed.attention_mask[0, int(holed.attention_mask[0].nonzero()[1])] = 0  # padding inside a row
    with pytest.raises(ValueError, match="padding inside"):
        scoring_requests(holed, 2)
    headless = r.select([0])
    headless.response_mask[0] = headless.attention_mask[0].float()  # no prompt before the response
    with pytest.raises(ValueError, match="tail of the row"):
        scoring_requests(headless, 2)
    enc = encode_prompts(policy, r.examples)
    outs = _completions(policy, r, enc["attention_mask"])
    outs[0].outputs[0].finish_reason = "abort"
    with pytest.raises(RuntimeError, match="abort"):
        rollout_from_outputs(policy, r.examples, enc["input_ids"], enc["attention_mask"], outs)
