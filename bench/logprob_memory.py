"""Peak memory of sampled-token log-probs through an LM head: naive vs chunked.

The problem: a Qwen3-shaped LM head (hidden 1024, vocabulary 151,936, fp32,
weights ~ N(0, 0.05²), hidden states ~ N(0, 1)) over 8 × 2048 response tokens at
temperature 1, in the student-update case: forward, then backward of
Σ_i c_i·log π(y_i) into the hidden states and the head's weight.

- naive: what the runtime did before: logits [8, 2048, V] = lm_head(hidden), then
  `maths.losses.token_logprobs_B_T` (÷T, log_softmax, gather); autograd keeps the
  full-vocabulary log-probs alive until backward, which makes several more.
- chunked: `maths.logprobs.token_logprobs_M` on the [M, H] hidden states (what the
  runtime does now): logsumexp over ~220 rows at a time, backward recomputes them.

How memory is measured. torch keeps no allocator statistics on CPU, so:

1. `LiveTensorBytes`, a TorchDispatchMode, sees every op's outputs (autograd's
   backward ops included), adds the bytes of each storage it has not seen, and
   subtracts them when a weakref on the storage reports it freed: the peak bytes of
   live tensors the path allocates. Its inputs (hidden states, weight: allocated
   before) are not counted; the gradients it produces are. Allocator overhead,
   fragmentation and scratch space inside one kernel (allocated below the
   dispatcher) are not counted: the subprocess check in 3. sees those.
2. The full 8 × 2048 problem runs under FakeTensorMode: the same ops, shapes and
   autograd graph without data, so the naive path's tens of GB are accounted
   without being allocated (this machine has 24 GiB, shared).
3. The accounting is checked on real tensors at a reduced shape (1 × 512
   tokens): the tracker must give the same peak on real as on fake tensors, and
   the growth of the peak resident set (VmHWM) of a fresh subprocess running each
   path (the OS's view, allocator and kernel-internal temporaries included) is
   printed beside it.

max_abs_diff compares real values, not fake ones: the chunked log-probs of all
8 × 2048 tokens against the naive ones (computed one sequence at a time: the naive
path over the whole batch would need ~28 GB); the gradients are compared at the
reduced shape and printed on the line before. MB = 2**20 bytes. Single-threaded
by default (`--threads`); about 2-3 minutes on one core, `--quick` diffs one
sequence only.

`--device cuda` instead runs the full problem on real tensors on a GPU (fp32, TF32 off: torch's
default) and reads the allocator's peak (`torch.cuda.max_memory_allocated` above the inputs) for
each path, with the time of each and the max |diff| of log-probs and gradients.

Prints diagnostics as JSON lines, and last one JSON line
{"naive_peak_mb", "chunked_peak_mb", "ratio", "max_abs_diff"}.
Goal: ratio ≥ 8, chunked ≤ 1.5 GB, diff ≤ 1e-4.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import time
import weakref

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from copd_runtime.maths.logprobs import LMHead, token_logprobs_M
from copd_runtime.maths.losses import token_logprobs_B_T

HIDDEN, VOCAB = 1024, 151_936
SEQS, TOKENS = 8, 2048
SMALL = (1, 512)  # the reduced shape of the real-tensor checks
TEMPERATURE = 1.0
MB = 2**20


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of live tensor storages allocated inside the mode: now and peak. The
    storages of `inputs` are known from the start (a view of an input is no allocation)."""

    def __init__(self, inputs=()):
        super().__init__()
        self.now = self.peak = 0
        self._seen = WeakIdKeyDictionary()
        for t in inputs:
            self._seen[t.untyped_storage()] = None

    def _freed(self, nbytes: int, _ref) -> None:
        self.now -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                if st not in self._seen:
                    n = st.nbytes()
                    self._seen[st] = weakref.ref(st, lambda ref, n=n: self._freed(n, ref))
                    self.now += n
                    self.peak = max(self.peak, self.now)
        return out


def make_inputs(seqs: int, tokens: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(seqs, tokens, HIDDEN, generator=g)
    weight = torch.randn(VOCAB, HIDDEN, generator=g).mul_(0.05)
    targets = torch.randint(0, VOCAB, (seqs, tokens), generator=g)
    coef = torch.randn(seqs, tokens, generator=g)  # the upstream gradient (advantages / token count)
    return hidden, weight, targets, coef


def naive_B_T(hidden_B_T_H, weight_V_H, targets_B_T):
    return token_logprobs_B_T(torch.nn.functional.linear(hidden_B_T_H, weight_V_H), targets_B_T, TEMPERATURE)


def chunked_B_T(hidden_B_T_H, weight_V_H, targets_B_T):
    B, T, H = hidden_B_T_H.shape
    return token_logprobs_M(LMHead(weight_V_H), hidden_B_T_H.reshape(B * T, H), targets_B_T.reshape(-1),
                            TEMPERATURE).view(B, T)


PATHS = {"naive": naive_B_T, "chunked": chunked_B_T}


def score_step(path: str, hidden, weight, targets, coef) -> None:
    """Forward only, no gradient: π_old and the hub's teacher scores."""
    with torch.no_grad():
        PATHS[path](hidden, weight, targets)


def train_step(path: str, hidden, weight, targets, coef) -> None:
    """Forward and backward of Σ coef·log π(y): the student update's shape of work."""
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    lp = PATHS[path](hidden, weight, targets)
    (lp * coef).sum().backward()


def tracked_peak_mb(path: str, seqs: int, tokens: int, fake: bool, step=train_step) -> float:
    with FakeTensorMode() if fake else contextlib.nullcontext():
        inputs = make_inputs(seqs, tokens)
        tracker = LiveTensorBytes(inputs)
        with tracker:
            step(path, *inputs)
    return tracker.peak / MB


def peak_rss_mb() -> float:
    """This process's peak resident set. VmHWM, not ru_maxrss: Linux carries ru_maxrss
    over exec() from the forked parent, so a child of a big process would start high."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: KiB on most systems


def rss_growth_mb(path: str, seqs: int, tokens: int) -> float:
    """Peak-RSS growth over the inputs, of this path alone, in a fresh process."""
    out = subprocess.run([sys.executable, __file__, "--rss-child", path, str(seqs), str(tokens)],
                         check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def _rss_child(path: str, seqs: int, tokens: int) -> None:
    torch.set_num_threads(1)
    h, w = torch.randn(8, 4, HIDDEN), torch.randn(64, HIDDEN)  # load both paths' kernels first, small
    for p in PATHS:
        train_step(p, h.clone(), w.clone(), torch.zeros(8, 4, dtype=torch.long), torch.ones(8, 4))
    inputs = make_inputs(seqs, tokens)  # no transient: the high-water mark is now the inputs
    base = peak_rss_mb()
    train_step(path, *inputs)
    print(peak_rss_mb() - base)


def value_diff(seqs: int, tokens: int) -> float:
    """max |chunked − naive| of the log-probs, real tensors, forward."""
    hidden, weight, targets, _ = make_inputs(seqs, tokens)
    with torch.no_grad():
        got = chunked_B_T(hidden, weight, targets)
        return max(float((got[i] - naive_B_T(hidden[i : i + 1], weight, targets[i : i + 1])[0]).abs().max())
                   for i in range(seqs))


def gradient_diff(seqs: int, tokens: int) -> dict[str, float]:
    grads = {}
    for path in PATHS:
        hidden, weight, targets, coef = make_inputs(seqs, tokens)
        train_step(path, hidden, weight, targets, coef)
        grads[path] = (hidden.grad, weight.grad)
    (hn, wn), (hc, wc) = grads["naive"], grads["chunked"]
    return {"grad_hidden_max_abs_diff": float((hn - hc).abs().max()), "grad_hidden_max_abs": float(hn.abs().max()),
            "grad_weight_max_abs_diff": float((wn - wc).abs().max()), "grad_weight_max_abs": float(wn.abs().max())}


def cuda_measure(device: str) -> dict:
    """The full 8 × 2048 problem on real CUDA tensors: each path's peak allocated bytes above its
    inputs (torch.cuda.max_memory_allocated: the allocator's own count, gradients included), its
    time, and the max |diff| of the log-probs and of both gradients."""
    dev = torch.device(device)
    out, grads, lps = {}, {}, {}
    for path in ("chunked", "naive", "chunked"):  # the first chunked run warms the kernels up
        inputs = [t.to(dev) for t in make_inputs(SEQS, TOKENS)]
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        t0 = time.perf_counter()
        hidden, weight, targets, coef = inputs
        hidden.requires_grad_(True)
        weight.requires_grad_(True)
        lp = PATHS[path](hidden, weight, targets)
        (lp * coef).sum().backward()
        torch.cuda.synchronize(dev)
        out[f"{path}_s"] = round(time.perf_counter() - t0, 4)
        out[f"{path}_peak_mb"] = round((torch.cuda.max_memory_allocated(dev) - base) / MB, 1)
        lps[path], grads[path] = lp.detach(), (hidden.grad, weight.grad)
        del inputs, hidden, weight, lp
    (hn, wn), (hc, wc) = grads["naive"], grads["chunked"]
    out.update(max_abs_diff=float(f"{float((lps['naive'] - lps['chunked']).abs().max()):.3g}"),
               grad_hidden_max_abs_diff=float(f"{float((hn - hc).abs().max()):.3g}"),
               grad_weight_max_abs_diff=float(f"{float((wn - wc).abs().max()):.3g}"),
               ratio=round(out["naive_peak_mb"] / out["chunked_peak_mb"], 2),
               device=torch.cuda.get_device_name(dev), shape=[SEQS, TOKENS], hidden=HIDDEN, vocab=VOCAB)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default=None,
                    help="a CUDA device (e.g. cuda): measure both paths on real tensors there, fp32, full shape")
    ap.add_argument("--quick", action="store_true", help="diff the log-probs of one sequence, not all eight")
    ap.add_argument("--rss-child", nargs=3, metavar=("PATH", "SEQS", "TOKENS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_child:
        _rss_child(args.rss_child[0], int(args.rss_child[1]), int(args.rss_child[2]))
        return
    torch.set_num_threads(args.threads)
    if args.device:
        print(json.dumps(cuda_measure(args.device)))
        return

    check = {"shape": list(SMALL)}
    for path in PATHS:
        real, fake = tracked_peak_mb(path, *SMALL, fake=False), tracked_peak_mb(path, *SMALL, fake=True)
        if abs(real - fake) > 1e-6:
            raise SystemExit(f"{path}: live-tensor peak {real:.3f} MB on real tensors, {fake:.3f} MB on fake ones")
        check[f"{path}_tracked_mb"] = round(real, 1)
        check[f"{path}_rss_growth_mb"] = round(rss_growth_mb(path, *SMALL), 1)
    check.update({k: float(f"{v:.3g}") for k, v in gradient_diff(*SMALL).items()})
    print(json.dumps({"check_on_real_tensors": check}), flush=True)

    peaks = {path: tracked_peak_mb(path, SEQS, TOKENS, fake=True) for path in PATHS}
    scoring = {f"{path}_peak_mb": round(tracked_peak_mb(path, SEQS, TOKENS, fake=True, step=score_step), 1)
               for path in PATHS}
    print(json.dumps({"shape": [SEQS, TOKENS], "hidden": HIDDEN, "vocab": VOCAB,
                      "logits_copy_mb": round(SEQS * TOKENS * VOCAB * 4 / MB, 1),
                      "weight_mb": round(VOCAB * HIDDEN * 4 / MB, 1), "forward_only": scoring}), flush=True)
    diff = value_diff(1 if args.quick else SEQS, TOKENS)
    print(json.dumps({
        "naive_peak_mb": round(peaks["naive"], 1),
        "chunked_peak_mb": round(peaks["chunked"], 1),
        "ratio": round(peaks["naive"] / peaks["chunked"], 2),
        "max_abs_diff": float(f"{diff:.3g}"),
    }))


if __name__ == "__main__":
    main()
