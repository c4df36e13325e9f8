"""One training step of a random-init Qwen3 built locally: rollout, update and hub-scoring throughput.

`--shape 1.7b` is Qwen3-1.7B's shape (hidden 2048, 28 layers, 16 heads / 8 KV heads, head dim 128,
MLP 6144, vocabulary 151,936, tied embeddings: ~1.7 B parameters), the default on a CUDA device;
`--shape small` (hidden 256, 4 layers, vocabulary 32,000: ~10 M parameters) is the default on the
CPU, where the big one would take hours. No weights are downloaded: the model is random.

What is timed (after one warm-up of each), with the runtime's own code:
- rollout: `model.generate` sampling `--response` new tokens for `--rows` prompts of `--prompt`
  tokens (no output logits), then π_old by `rollout.response_logprobs` → rollout tokens/s
  (new tokens per second, π_old included);
- update: `recipes.grpo.policy_update` (chunked LM head, micro-batches of `--micro-batch-tokens`,
  gradient checkpointing with `--checkpointing`) and the optimizer step → update tokens/s
  (all rows × sequence length) and MFU = 6 · params · tokens / time / peak FLOP/s, the peak
  being the card's dense bf16 peak (989 TFLOP/s for an H100 SXM, 989 for an H200) or
  `--peak-tflops`; null on a CPU (no reliable peak);
- hub: `rollout.teacher_scores` (top-8) over the same rows → hub tokens/s.

`--compile` compiles each decoder layer as `trainer.compile` does (`models.compile`: the update's and
π_old's forwards compiled, generation eager; the hub figure then also runs on the compiled blocks,
which a `copd hub` process does not); the warm-up update's time (compilation included) is reported.

`--sweep 16384,65536,65536c@512` then times one more update (after a warm-up) for each entry:
micro-batch tokens, `c` for gradient checkpointing, `@MB` for the LM head's chunk size
(`maths.logprobs.CHUNK_BYTES`, default 128 MB), and reports each one's update tokens/s, MFU and
peak memory under "sweep" (the headline figures stay those of the default configuration).

Peak memory: torch.cuda.max_memory_allocated on CUDA; the process's peak resident set (VmHWM) on
a CPU. Precision: `--precision auto` (bf16 on CUDA with fp32 master weights, fp32 on CPU).

Prints one JSON line: {"device", "dtype", "shape", "params", "rollout_tokens_per_s",
"update_tokens_per_s", "update_mfu", "hub_tokens_per_s", "peak_memory_mb", ...}.
"""

from __future__ import annotations

import argparse
import json
import re
import time

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

import copd_runtime.maths.logprobs as logprobs
from copd_core.spec import RLSpec
from copd_runtime.data.examples import Example
from copd_runtime.maths.losses import group_advantages_P_G
from copd_runtime.models.compile import compile_blocks, eager_blocks
from copd_runtime.models.device import placement
from copd_runtime.models.optim import make_optimizer
from copd_runtime.models.policy import Policy
from copd_runtime.recipes.grpo import policy_update
from copd_runtime.rollout import Rollout, response_logprobs, teacher_scores

SHAPES = {
    "1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, vocab_size=151_936),
    "small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64, vocab_size=32_000),
}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "B200": 2250.0}


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None)
    ap.add_argument("--rows", type=int, default=None, help="sequences per step (default 64 on CUDA, 8 on CPU)")
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=None, help="default 256 on CUDA, 32 on CPU")
    ap.add_argument("--response", type=int, default=None, help="default 768 on CUDA, 32 on CPU")
    ap.add_argument("--micro-batch-tokens", type=int, default=None)
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    ap.add_argument("--device", default=None)
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads on a CPU")
    ap.add_argument("--compile", action="store_true",
                    help="compile each decoder layer (torch.compile, regional) as trainer.compile does")
    ap.add_argument("--sweep", default="", help="more update configurations: TOKENS[c][@MB],... (see above)")
    a = ap.parse_args()
    place = placement(a.precision, a.device)
    cuda = place.is_cuda
    if not cuda:
        torch.set_num_threads(a.threads)
    shape = a.shape or ("1.7b" if cuda else "small")
    rows = a.rows or (64 if cuda else 8)
    P, R = a.prompt or (256 if cuda else 32), a.response or (768 if cuda else 32)
    micro = a.micro_batch_tokens or (16 * (P + R) if cuda else None)

    torch.manual_seed(0)
    cfg = Qwen3Config(**SHAPES[shape], max_position_embeddings=max(4096, P + R), tie_word_embeddings=True,
                      attn_implementation="sdpa")
    with torch.device(place.device):
        model = Qwen3ForCausalLM(cfg).to(place.dtype)
    model.generation_config.pad_token_id = 0
    policy = Policy(model=model, tokenizer=None)
    params = sum(p.numel() for p in model.parameters())
    opt = make_optimizer(model, 1e-6)
    rl = RLSpec(temperature=1.0, micro_batch_tokens=micro, gradient_checkpointing=a.checkpointing,
                group_size=a.group, batch_size=max(1, rows // a.group))

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def rollout() -> Rollout:
        prompt = torch.randint(0, cfg.vocab_size, (rows, P), device=place.device)
        mask = torch.ones_like(prompt)
        with torch.no_grad(), eager_blocks(model):  # as `rollout.sample` does
            out = model.generate(input_ids=prompt, attention_mask=mask, do_sample=True, top_k=0, top_p=1.0,
                                 max_new_tokens=R, min_new_tokens=R, eos_token_id=None, pad_token_id=0)
        resp = torch.zeros(out.shape, device=place.device)
        resp[:, P:] = 1.0
        r = Rollout([Example("", "", "")] * rows, out, torch.ones_like(out), resp, torch.zeros_like(resp),
                    torch.zeros(rows, dtype=torch.bool, device=place.device), [""] * rows)
        with torch.no_grad():
            r.old_logprobs = response_logprobs(policy, r, 1.0)
        return r

    def timed(fn):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        return out, time.perf_counter() - t0

    compiled = compile_blocks(model) if a.compile else 0  # as `trainer.compile` does
    model.eval()
    r = rollout()  # warm-up
    r, rollout_s = timed(rollout)
    g = torch.Generator().manual_seed(1)
    adv = group_advantages_P_G(torch.randint(0, 2, (rows // a.group, a.group), generator=g).float()).reshape(-1)
    adv = adv.to(place.device)[:, None] * r.response_mask
    _, compile_s = timed(lambda: policy_update(policy, opt, r, adv, r.response_mask, rl))  # warm-up
    stats, update_s = timed(lambda: policy_update(policy, opt, r, adv, r.response_mask, rl))
    teacher_scores(policy, r, 1.0, 8)  # warm-up
    _, hub_s = timed(lambda: teacher_scores(policy, r, 1.0, 8))

    seq_tokens = r.input_ids.numel()
    peak = peak_tflops(place.device, a.peak_tflops)
    update_flops = 6 * params * seq_tokens / update_s
    peak_mb = peak_memory_mb(place.device)

    headline = {
        "device": torch.cuda.get_device_name(place.device) if cuda else "cpu", "dtype": str(place.dtype),
        "shape": shape, "params": params, "rows": rows, "prompt": P, "response": R,
        "micro_batch_tokens": micro, "gradient_checkpointing": a.checkpointing,
        "rollout_s": round(rollout_s, 3), "rollout_tokens_per_s": round(rows * R / rollout_s, 1),
        "update_s": round(update_s, 3), "update_tokens_per_s": round(seq_tokens / update_s, 1),
        "update_tflops": round(update_flops / 1e12, 4),
        "update_mfu": round(update_flops / (peak * 1e12), 4) if peak else None, "peak_tflops": peak,
        "hub_s": round(hub_s, 3), "hub_tokens_per_s": round(seq_tokens / hub_s, 1),
        "peak_memory_mb": round(peak_mb, 1), "update_skipped": stats["skipped"],
        "threads": torch.get_num_threads(), "compiled_blocks": compiled, "warmup_update_s": round(compile_s, 1),
    }
    if a.sweep:
        print(json.dumps(headline), flush=True)  # the default configuration's figures, before the sweep
    sweep, default_chunk = [], logprobs.CHUNK_BYTES
    for item in filter(None, a.sweep.split(",")):
        m = re.fullmatch(r"(\d+)(c?)(?:@(\d+))?", item.strip())
        if not m:
            raise SystemExit(f"--sweep {item!r}: expected TOKENS[c][@MB]")
        logprobs.CHUNK_BYTES = int(m[3]) * 2**20 if m[3] else default_chunk
        cfg_rl = rl.model_copy(update={"micro_batch_tokens": int(m[1]), "gradient_checkpointing": bool(m[2])})
        if cuda:
            torch.cuda.reset_peak_memory_stats(place.device)
        try:
            policy_update(policy, opt, r, adv, r.response_mask, cfg_rl)  # warm-up
            _, s = timed(lambda c=cfg_rl: policy_update(policy, opt, r, adv, r.response_mask, c))
        except Exception as e:  # noqa: BLE001 - one configuration failing (out of memory, say) is a result
            sweep.append({"config": item, "error": f"{type(e).__name__}: {str(e)[:160]}"})
            if cuda:
                torch.cuda.empty_cache()
            continue
        finally:
            logprobs.CHUNK_BYTES = default_chunk
        f = 6 * params * seq_tokens / s
        sweep.append({"config": item, "update_s": round(s, 3), "update_tokens_per_s": round(seq_tokens / s, 1),
                      "update_mfu": round(f / (peak * 1e12), 4) if peak else None,
                      "peak_memory_mb": round(peak_memory_mb(place.device), 1)})
        print(json.dumps(sweep[-1]), flush=True)
    print(json.dumps({**headline, "sweep": sweep}))


if __name__ == "__main__":
    main()
