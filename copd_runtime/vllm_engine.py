"""The vLLM rollout engine (`spec.rollout.engine: vllm`): trainers sample, and the hub scores
teacher tokens, through vLLM 0.33 instead of transformers.

Three parts, kept apart because only the first two run without a GPU:

1. Requests: what we hand vLLM. Each row's token ids without padding, and the keyword
   arguments of its `SamplingParams` (`generation_params`, `scoring_requests`).
2. Conversion: vLLM's `RequestOutput`s into our structures. The sampled token ids of each
   `CompletionOutput` become a `Rollout` (`rollout_from_outputs`, through the same
   `rollout.assemble_rollout` as transformers' path); `prompt_logprobs` (per prompt position a
   dict token id → `Logprob`, the top-k plus the actual token) and `prompt_token_id_logprobs`
   (log-probs of the ids we asked for at each scored position) become the hub's [N, L, ...]
   tensors, laid out exactly as `rollout.teacher_scores` lays them (`scores_from_outputs`).
   tests/unit/runtime/test_vllm_conversion.py builds vLLM's own output classes on CPU.
3. The engines (CUDA only; no test runs them): `ColocatedEngine` lives in a trainer process
   next to the policy, on the same GPU. It sleeps (level 2: weights and KV cache freed) while the
   trainer updates; before each rollout it wakes its weights, takes the trainer's current weights
   (`reload_weights` on vLLM's worker, in this process) and wakes its KV cache. `TeacherEngine`
   is one frozen teacher in the hub, scoring through prompt log-probs.

π_old and the update stay the trainer's own forward (`rollout.response_logprobs`): vLLM only
chooses the tokens. Its prompt log-probs are at temperature 1 (vLLM applies no temperature to
prompt tokens), hence the spec's rule that `vllm` needs `rl.temperature` 1. Text models only.

`import vllm` happens only when an engine is built; `unavailable()` says beforehand why it
cannot be (not installed, no CUDA GPU), which the CLI reports as a failed run with a reason.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

import torch

from copd_runtime.data.examples import Example
from copd_runtime.models.device import Placement
from copd_runtime.models.policy import Policy
from copd_runtime.rollout import Rollout, assemble_rollout, encode_prompts

VLLM_VERSION = "0.33.0"
MAX_LOGPROBS = 20  # vLLM's default cap on log-probs per position; raised to the diagnostics' top-k


class EngineUnavailable(RuntimeError):
    """vLLM cannot run in this process (not installed, no CUDA GPU, or it failed to import)."""


def unavailable() -> str | None:
    """Why `rollout.engine: vllm` cannot run here, or None. Imports neither vllm nor CUDA state."""
    if importlib.util.find_spec("vllm") is None:
        return (f"vllm is not installed in this image (the trainer image needs the `gpu` extra, vllm "
                f"{VLLM_VERSION}: docker build --build-arg EXTRAS=\"--extra gpu\", README \"Run on GPUs\")")
    if not torch.cuda.is_available():
        return ("vLLM needs a CUDA GPU and this process sees none (trainer.resources.gpu and "
                "trainer.hubResources.gpu must be at least 1)")
    return None


# ---------------------------------------------------------------------------
# 1. Requests


def unpadded_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[tuple[int, list[int]]]:
    """Per row: (first column, token ids) of its attended tokens, which must be contiguous (left
    and right padding only)."""
    out = []
    ids, att = input_ids.cpu(), attention_mask.cpu()
    for n in range(ids.shape[0]):
        cols = att[n].nonzero().flatten()
        if len(cols) == 0:
            raise ValueError(f"row {n}: no attended tokens")
        a, b = int(cols[0]), int(cols[-1]) + 1
        if len(cols) != b - a:
            raise ValueError(f"row {n}: padding inside the sequence (vLLM takes each row unpadded)")
        out.append((a, ids[n, a:b].tolist()))
    return out


def generation_params(max_new_tokens: int, temperature: float, greedy: bool, eos_id: int, seed: int) -> dict:
    """`SamplingParams` of one sampled row, as transformers' path samples: the whole vocabulary at
    `temperature` (greedy: temperature 0), stopping at the policy's EOS only (the model's own
    generation config and EOS list are ignored), the EOS kept in the token ids."""
    return dict(n=1, temperature=0.0 if greedy else temperature, top_p=1.0, top_k=0, min_p=0.0,
                max_tokens=max_new_tokens, seed=seed, ignore_eos=True, stop_token_ids=[eos_id],
                detokenize=False)


def scoring_requests(r: Rollout, k: int, query_ids: torch.Tensor | None = None) -> list[tuple[list[int], dict]]:
    """Per row of `r`: its token ids (prompt + response, unpadded) and the `SamplingParams` that score
    the response: `prompt_logprobs=k` (top-k + the actual token at every position) and, with
    `query_ids` [N, L, Q], the log-probs of row n's query ids at every response token
    (`prompt_logprob_token_ids`, rows from `prompt_logprob_start`: row i predicts token start+i+1).
    `max_tokens=1`: vLLM generates at least one token, which we ignore."""
    resp = r.response_mask.cpu() > 0
    q = None if query_ids is None else query_ids.cpu()
    out = []
    for n, (a, tokens) in enumerate(unpadded_rows(r.input_ids, r.attention_mask)):
        kw = dict(max_tokens=1, temperature=1.0, prompt_logprobs=k, detokenize=False)
        offs = resp[n, a : a + len(tokens)].nonzero().flatten()
        if int(resp[n].sum()) != len(offs):
            raise ValueError(f"row {n}: response tokens outside the attended ones")
        if len(offs):
            s = int(offs[0])
            if s == 0 or int(offs[-1]) != len(tokens) - 1 or len(offs) != len(tokens) - s:
                raise ValueError(f"row {n}: the response must be the tail of the row, after a prompt")
            if q is not None:
                kw["prompt_logprob_token_ids"] = q[n, a + s : a + len(tokens)].tolist()
                kw["prompt_logprob_start"] = s - 1
        out.append((tokens, kw))
    return out


# ---------------------------------------------------------------------------
# 2. Conversion


def response_token_ids(outputs) -> list[list[int]]:
    """The sampled token ids of each RequestOutput (one completion each), EOS included."""
    ids = []
    for o in outputs:
        if len(o.outputs) != 1:
            raise ValueError(f"request {o.request_id}: {len(o.outputs)} completions, expected 1")
        c = o.outputs[0]
        if c.finish_reason not in ("stop", "length"):
            raise RuntimeError(f"request {o.request_id}: vLLM finished with {c.finish_reason!r}")
        ids.append(list(c.token_ids))
    return ids


def rollout_from_outputs(policy: Policy, examples: list[Example], prompt_ids: torch.Tensor,
                         prompt_mask: torch.Tensor, outputs) -> Rollout:
    """The rollout of these left-padded prompts and vLLM's completions of them (in order)."""
    if len(outputs) != len(examples):
        raise ValueError(f"{len(outputs)} vLLM outputs for {len(examples)} prompts")
    resp = response_token_ids(outputs)
    gen = torch.full((len(resp), max([1, *map(len, resp)])), policy.pad_id, dtype=torch.long)
    for i, t in enumerate(resp):
        gen[i, : len(t)] = torch.tensor(t, dtype=torch.long)
    return assemble_rollout(policy, examples, prompt_ids, prompt_mask, gen.to(prompt_ids.device), {})


def _top(position: dict, k: int) -> list[tuple[int, float]]:
    """The k best (token id, log-prob) of one position's dict (top-k by rank, plus possibly the actual
    token ranked lower)."""
    def key(item):
        rank = item[1].rank
        return (math.inf if rank is None else rank, -item[1].logprob)
    best = sorted(position.items(), key=key)[:k]
    if len(best) < k:
        raise ValueError(f"vLLM returned {len(position)} log-probs at a position, fewer than k={k}")
    return [(int(t), float(lp.logprob)) for t, lp in best]


def scores_from_outputs(r: Rollout, outputs, k: int, query_width: int | None = None) -> dict[str, torch.Tensor]:
    """The hub's answer (`rollout.teacher_scores`'s keys and layout) from the RequestOutputs of
    `scoring_requests(r, k, query_ids)`: [N, L] / [N, L, k] / [N, L, Q], zero outside the response."""
    N, L = r.input_ids.shape
    sampled = torch.zeros(N, L)
    top_ids = torch.zeros(N, L, k, dtype=torch.long)
    top_lp = torch.zeros(N, L, k)
    query = None if query_width is None else torch.zeros(N, L, query_width)
    resp = r.response_mask.cpu() > 0
    if len(outputs) != N:
        raise ValueError(f"{len(outputs)} vLLM outputs for {N} rows")
    for n, ((a, tokens), o) in enumerate(zip(unpadded_rows(r.input_ids, r.attention_mask), outputs)):
        if list(o.prompt_token_ids) != tokens:
            raise ValueError(f"row {n}: vLLM's output is for other tokens than this row's")
        offs = resp[n, a : a + len(tokens)].nonzero().flatten().tolist()
        if not offs:
            continue
        pl = o.prompt_logprobs
        for j in offs:
            here = pl[j]  # predicts token j from tokens[:j]
            sampled[n, a + j] = here[tokens[j]].logprob
            best = _top(here, k)
            top_ids[n, a + j] = torch.tensor([t for t, _ in best])
            top_lp[n, a + j] = torch.tensor([lp for _, lp in best])
        if query is not None:
            rows = torch.as_tensor(o.prompt_token_id_logprobs, dtype=torch.float32)
            if rows.shape != (len(offs), query_width):
                raise ValueError(f"row {n}: prompt_token_id_logprobs {tuple(rows.shape)}, expected "
                                 f"({len(offs)}, {query_width})")
            query[n, a + offs[0] : a + len(tokens)] = rows
    out = {"sampled_logprobs": sampled, "topk_ids": top_ids, "topk_logprobs": top_lp}
    if query is not None:
        out["query_logprobs"] = query
    return {name: v.to(r.device) for name, v in out.items()}


# ---------------------------------------------------------------------------
# 3. The engines (CUDA only; not exercised by the tests)


def _vllm():
    """`import vllm`, or EngineUnavailable with the reason."""
    reason = unavailable()
    if reason:
        raise EngineUnavailable(reason)
    try:
        import vllm
    except Exception as e:  # a broken install (CUDA libraries, torch ABI) fails here, not mid-run
        raise EngineUnavailable(f"import vllm failed: {type(e).__name__}: {e}") from None
    if vllm.__version__ != VLLM_VERSION:
        raise EngineUnavailable(f"vllm {vllm.__version__} is installed; this code is written for {VLLM_VERSION}")
    return vllm


def _dtype(place: Placement) -> str:
    return "bfloat16" if place.dtype == torch.bfloat16 else "float32"


class ColocatedEngine:
    """A vLLM engine in this trainer process, on its GPU, sampling with the policy's current weights.

    Built like TRL's and verl's colocated engines: `external_launcher` (the worker runs in this
    process, under torchrun one per rank, tensor parallel 1), sleep mode, and random initial weights
    (`load_format="dummy"`): the trainer's weights are loaded into it before every rollout."""

    def __init__(self, model_dir: Path, place: Placement, memory_fraction: float, seed: int,
                 max_logprobs: int = MAX_LOGPROBS):
        # the engine core in this process (required by external_launcher): reload_weights then reads
        # the trainer's tensors directly, no copy through another process
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        for name, value in (("RANK", str(place.rank)), ("LOCAL_RANK", str(place.local_rank)),
                            ("WORLD_SIZE", str(place.world_size)), ("MASTER_ADDR", "127.0.0.1"),
                            ("MASTER_PORT", "29500")):
            os.environ.setdefault(name, value)  # torchrun sets them; one process outside it does not
        vllm = _vllm()
        self._sampling_params = vllm.SamplingParams
        self.llm = vllm.LLM(
            model=str(model_dir), dtype=_dtype(place), load_format="dummy", skip_tokenizer_init=True,
            generation_config="vllm", tensor_parallel_size=1, distributed_executor_backend="external_launcher",
            gpu_memory_utilization=memory_fraction, enable_sleep_mode=True, seed=seed,
            max_logprobs=max_logprobs, enable_prefix_caching=False,
        )
        self.asleep = False
        self.sleep()

    def sleep(self) -> None:
        """Free the engine's weights and KV cache (level 2) for the trainer's update."""
        self.llm.sleep(level=2)
        self.asleep = True

    def load_weights(self, model: torch.nn.Module) -> None:
        """Wake the weights, copy the trainer's current ones in (Hugging Face names, vLLM's own loader),
        then wake the KV cache."""
        if self.asleep:
            self.llm.wake_up(tags=["weights"])
        self.llm.collective_rpc("reload_weights", kwargs={
            "weights_iterator": iter(model.state_dict().items()), "is_checkpoint_format": True})
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False

    @torch.no_grad()
    def sample(self, policy: Policy, examples: list[Example], max_new_tokens: int, temperature: float,
               greedy: bool) -> Rollout:
        """`rollout.sample`'s tokens through vLLM. Each row's seed comes from the global torch RNG, so a
        resumed step draws the same seeds."""
        if policy.is_vlm:
            raise ValueError("rollout.engine vllm: text models only")
        enc = encode_prompts(policy, examples)
        prompt_ids, prompt_mask = enc.pop("input_ids"), enc.pop("attention_mask")
        seeds = torch.randint(0, 2**31 - 1, (len(examples),)).tolist()
        params = [self._sampling_params(**generation_params(max_new_tokens, temperature, greedy, policy.eos_id, s))
                  for s in seeds]
        prompts = [{"prompt_token_ids": t} for _, t in unpadded_rows(prompt_ids, prompt_mask)]
        self.load_weights(policy.model)
        try:
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
        finally:
            self.sleep()
        return rollout_from_outputs(policy, examples, prompt_ids, prompt_mask, outputs)


class TeacherEngine:
    """One frozen teacher of the hub, scoring through vLLM's prompt log-probs (`scoring_requests`).
    The log-probs of given ids (`prompt_logprob_token_ids`) need vLLM's V2 model runner."""

    is_vlm = False  # text models only: the hub refuses a request with media for it

    def __init__(self, model_dir: Path, place: Placement, memory_fraction: float,
                 max_logprobs: int = MAX_LOGPROBS):
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "1"
        vllm = _vllm()
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        self.pad_id = int(tok.eos_token_id if tok.pad_token_id is None else tok.pad_token_id)
        self._sampling_params = vllm.SamplingParams
        self.llm = vllm.LLM(
            model=str(model_dir), dtype=_dtype(place), skip_tokenizer_init=True, generation_config="vllm",
            gpu_memory_utilization=memory_fraction, max_logprobs=max_logprobs, enable_prefix_caching=False,
        )

    @torch.no_grad()
    def score(self, r: Rollout, k: int, query_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        reqs = scoring_requests(r, k, query_ids)
        outputs = self.llm.generate([{"prompt_token_ids": t} for t, _ in reqs],
                                    [self._sampling_params(**kw) for _, kw in reqs], use_tqdm=False)
        return scores_from_outputs(r, outputs, k, None if query_ids is None else query_ids.shape[-1])
