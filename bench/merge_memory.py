"""Peak memory of merging K branch checkpoints: the in-memory merge vs the streaming one.

The models: a random-init Qwen3-shaped causal LM built locally from a config (hidden 1024,
8 layers, intermediate 3072, vocabulary 32,000, untied head: ~166 M parameters, ~330 MB in
bf16), saved in bf16 as Hugging Face shards of 100 MB: one base and 8 branches (different
seeds). Nothing is downloaded.

- old: what `merge_dirs` did before: every branch's state dict (and the base's) in memory,
  merged, written as one unsharded file (`recipes.merge.merge_in_memory` + one `save_file`).
- new: `recipes.merge.merge_dirs` (one tensor at a time per branch through `safe_open`,
  float32 accumulator, output shards of `--shard-mb`).

Each (path, K) runs in a fresh subprocess, which prints its resident set after imports and
its peak resident set (VmHWM, the OS's view: allocator and mapped file pages included) after
the merge; `*_peak_mb` is the peak minus the after-imports figure. The task-arithmetic merge
(base + K branches) is what is measured: it reads K + 1 models. The old and new outputs of
K = 8 are compared tensor by tensor (must be equal). MB = 2**20 bytes.

    .venv/bin/python bench/merge_memory.py [--ks 2,4,8] [--shard-mb 100] [--keep DIR]

Prints one JSON line per run, and last one JSON line
{"k", "old_peak_mb", "new_peak_mb", "new_shard_mb", "model_mb", "equal"}
(lists over k for the peaks).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MB = 2**20


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / MB
    raise RuntimeError(field)


def build_models(root: Path, n: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    cfg = Qwen3Config(hidden_size=1024, intermediate_size=3072, num_hidden_layers=8, num_attention_heads=16,
                      num_key_value_heads=8, head_dim=64, vocab_size=32_000, tie_word_embeddings=False)
    for i in range(n):
        d = root / ("base" if i == 0 else f"b{i}")
        if (d / "config.json").exists():
            continue
        torch.manual_seed(i)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        model.save_pretrained(d, max_shard_size="100MB")
        del model


def child(path: str, k: int, root: Path, out: Path, shard_mb: int) -> None:
    import torch  # noqa: F401  (imports before the baseline)
    from safetensors.torch import save_file

    from copd_runtime.recipes import merge

    base_mb = _status_mb("VmRSS")
    branches = [root / f"b{i}" for i in range(1, k + 1)]
    t0 = time.perf_counter()
    kw = {"method": "task-arithmetic", "base_dir": root / "base", "scale": 0.8}
    if path == "old":
        merged = merge.merge_in_memory(branches, [1.0 / k] * k, **kw)
        out.mkdir(parents=True, exist_ok=True)
        save_file({n: t.contiguous() for n, t in merged.items()}, out / "model.safetensors", metadata={"format": "pt"})
    else:
        merge.merge_dirs(branches, [1.0 / k] * k, out, max_shard_bytes=shard_mb * MB, **kw)
    print(json.dumps({"path": path, "k": k, "after_imports_mb": round(base_mb, 1),
                      "vmhwm_mb": round(_status_mb("VmHWM"), 1), "seconds": round(time.perf_counter() - t0, 2)}))


def _run(path: str, k: int, root: Path, out: Path, shard_mb: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, __file__, "--child", path, "--k", str(k), "--root", str(root),
                        "--out", str(out), "--shard-mb", str(shard_mb)],
                       env=env, capture_output=True, text=True, check=False)
    if p.returncode != 0:
        raise SystemExit(f"{path} k={k} failed:\n{p.stderr[-3000:]}")
    row = json.loads(p.stdout.strip().splitlines()[-1])
    row["peak_mb"] = round(row["vmhwm_mb"] - row["after_imports_mb"], 1)
    print(json.dumps(row), flush=True)
    return row


def _equal(a: Path, b: Path) -> bool:
    import torch
    from safetensors import safe_open

    from copd_runtime.recipes.merge import _Tensors

    ta, tb = _Tensors(a), _Tensors(b)
    if set(ta.file) != set(tb.file):
        return False
    for n in ta.file:
        with safe_open(ta.file[n], "pt") as fa, safe_open(tb.file[n], "pt") as fb:
            if not torch.equal(fa.get_tensor(n), fb.get_tensor(n)):
                return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ks", default="2,4,8")
    ap.add_argument("--shard-mb", type=int, default=100)
    ap.add_argument("--keep", type=Path, default=None, help="build/keep the models here (reused when present)")
    ap.add_argument("--child")
    ap.add_argument("--k", type=int)
    ap.add_argument("--root", type=Path)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    if a.child:
        return child(a.child, a.k, a.root, a.out, a.shard_mb)
    ks = [int(x) for x in a.ks.split(",")]
    with tempfile.TemporaryDirectory(prefix="merge-bench-") as tmp:
        root = a.keep or Path(tmp) / "models"
        build_models(root, max(ks) + 1)
        model_mb = sum(p.stat().st_size for p in (root / "base").glob("*.safetensors")) / MB
        old, new, equal = [], [], None
        for k in ks:
            o = _run("old", k, root, Path(tmp) / f"old{k}", a.shard_mb)
            n = _run("new", k, root, Path(tmp) / f"new{k}", a.shard_mb)
            old.append(o["peak_mb"])
            new.append(n["peak_mb"])
            if k == max(ks):
                equal = _equal(Path(tmp) / f"old{k}", Path(tmp) / f"new{k}")
    print(json.dumps({"k": ks, "old_peak_mb": old, "new_peak_mb": new, "new_shard_mb": a.shard_mb,
                      "model_mb": round(model_mb, 1), "equal": equal}))


if __name__ == "__main__":
    main()
