"""Hub scoring: 64 sequences, batched hub vs one forward per sequence.

One process, one model: a random-init Qwen3-shaped causal LM built locally (no download;
`--hidden`, `--layers`, `--vocab`), 64 sequences of `--prompt` prompt + `--response`
response tokens. Both paths compute what the hub returns (`rollout.teacher_scores`: the
sampled token's log-prob and the top-k, k = 8):

- naive: 64 requests, one after the other, one forward each (what a hub without
  batching does per request; a threaded one runs them in parallel, with 64× the memory);
- batched: the same 64 one-sequence requests sent at once from 64 client threads to
  `hub.BatchingScorer`, which coalesces them into forwards of at most `--batch-tokens`.

`--model builtin` scores with the demo's own model instead (`builtin://tiny-qwen3`, the shipped
weights: hidden 64, 2 layers, a 65-token vocabulary), with the demo's lengths (`--prompt 8
--response 12`): what a hub on a CPU serves. How far batching can go depends on the model: it
removes each request's fixed cost (Python, dispatch, a forward's set-up), not its arithmetic, so
the speedup is at most (fixed cost + compute) / compute per request. With the default random model
(vocabulary 8,192) the batched forward already runs at about one core's FLOP rate and the speedup
is about 2-2.7x; with the demo's model the fixed cost dominates.

Each path runs `--repeats` times after one warm-up; the best time counts, wall-clock
(`hub_vs_naive_speedup`) and this process's CPU time (`cpu_time_speedup`: the fairer figure
on a shared machine, where wall time includes waiting for a core). Scores are
compared (max |diff| of the sampled-token log-probs). Runs on whatever device is present
(CUDA in bf16 when there, else the CPU in fp32; `--device`, `--precision`).

Prints one JSON line: {"hub_vs_naive_speedup", "cpu_time_speedup", "naive_s", "batched_s", "forwards",
"sequences", "tokens_per_s_batched", "max_abs_diff", "device", "dtype", ...}.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

from copd_runtime.builtin.tiny_text import build_tiny_qwen3
from copd_runtime.hub import BatchingScorer, InProcessHub
from copd_runtime.model_uri import resolve_model_dir
from copd_runtime.models.device import placement
from copd_runtime.rollout import Rollout


def build_model(out: Path, hidden: int, layers: int, vocab: int) -> None:
    cfg = Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
                      num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 128),
                      head_dim=64, max_position_embeddings=4096, tie_word_embeddings=True)
    torch.manual_seed(0)
    Qwen3ForCausalLM(cfg).save_pretrained(out)
    # a tokenizer is part of a model directory; the builtin tiny one's ids are all < vocab
    tiny = build_tiny_qwen3(seed=0, warm_steps=0)
    tiny.tokenizer.save_pretrained(out)
    AutoTokenizer.from_pretrained(out)


def rollouts(n: int, prompt: int, response: int, vocab: int, device) -> list[Rollout]:
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        L = prompt + response - (i % 7)  # uneven lengths: the batcher pads
        ids = torch.randint(0, vocab, (1, L), generator=g)
        resp = torch.zeros(1, L)
        resp[:, prompt:] = 1.0
        out.append(Rollout([_example()], ids.to(device), torch.ones(1, L, dtype=torch.long, device=device),
                           resp.to(device), torch.zeros(1, L, device=device), torch.zeros(1, dtype=torch.bool),
                           [""]))
    return out


def _example():
    from copd_runtime.data.examples import Example

    return Example("", "", "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["random", "builtin"], default="random",
                    help="random: a Qwen3 of --hidden/--layers/--vocab; builtin: the demo's tiny-qwen3")
    ap.add_argument("--sequences", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--response", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--batch-tokens", type=int, default=65_536)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--device", default=None)
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    place = placement(a.precision, a.device)

    with tempfile.TemporaryDirectory() as d:
        if a.model == "builtin":
            model_dir = resolve_model_dir("builtin://tiny-qwen3", Path(d))
        else:
            model_dir = Path(d) / "m"
            build_model(model_dir, a.hidden, a.layers, a.vocab)
        hub = InProcessHub({"t": model_dir}, temperature=1.0, placement=place)
        policy = hub.teacher("t")
        vocab = policy.model.config.vocab_size
    params = sum(p.numel() for p in policy.model.parameters())
    rs = rollouts(a.sequences, a.prompt, a.response, vocab, place.device)
    k = 8

    def sync():
        if place.is_cuda:
            torch.cuda.synchronize()

    def naive():
        return [hub.score("t", r, k) for r in rs]

    def batched():
        scorer = BatchingScorer(hub, a.batch_tokens, start=False)
        got: list = [None] * len(rs)
        threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, scorer.score("t", rs[i], k)))
                   for i in range(len(rs))]
        for t in threads:
            t.start()
        while scorer.pending() < len(rs):  # every client is waiting, as under a burst of trainers
            time.sleep(0.001)
        t0, c0 = time.perf_counter(), time.process_time()
        scorer.start()
        for t in threads:
            t.join()
        sync()
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        scorer.close()
        return got, dt, dc, scorer.forwards

    def timed(fn):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        sync()
        return out, time.perf_counter() - t0, time.process_time() - c0

    naive()  # warm-up
    batched()
    naive_s = batched_s = naive_cpu = batched_cpu = float("inf")
    for _ in range(a.repeats):
        want, dt, dc = timed(naive)
        naive_s, naive_cpu = min(naive_s, dt), min(naive_cpu, dc)
        got, dt, dc, forwards = batched()
        batched_s, batched_cpu = min(batched_s, dt), min(batched_cpu, dc)
    diff = max(float((g["sampled_logprobs"] - w["sampled_logprobs"]).abs().max()) for g, w in zip(got, want))
    tokens = sum(int(r.input_ids.numel()) for r in rs)
    if place.is_cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = None
    print(json.dumps({
        "hub_vs_naive_speedup": round(naive_s / batched_s, 2), "naive_s": round(naive_s, 4),
        "batched_s": round(batched_s, 4), "cpu_time_speedup": round(naive_cpu / batched_cpu, 2),
        "naive_cpu_s": round(naive_cpu, 4), "batched_cpu_s": round(batched_cpu, 4), "forwards": forwards, "sequences": len(rs), "tokens": tokens,
        "tokens_per_s_batched": round(tokens / batched_s, 1), "tokens_per_s_naive": round(tokens / naive_s, 1),
        "max_abs_diff": diff, "params": params, "device": str(place.device), "dtype": str(place.dtype),
        "threads": a.threads, "peak_cuda_mb": peak, "model": a.model, "vocab": vocab,
        "prompt": a.prompt, "response": a.response,
    }))


if __name__ == "__main__":
    main()
