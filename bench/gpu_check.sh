#!/usr/bin/env bash
# The GPU checks, as one script for a machine with one CUDA GPU (what `make bench-gpu` runs).
#
#   bench/gpu_check.sh OUTDIR [logprob|train|train-compile|hub|demo|demo-compile ...]
#   (default: logprob train train-compile hub demo demo-compile)
#
# Each check has its own time limit, writes OUTDIR/<check>.log, and a failing check does not stop
# the others; the exit status is the number of checks that failed. Uses the python3 on PATH (or
# $PYTHON) with this checkout on PYTHONPATH, so it runs from a plain copy of the tree where torch
# and transformers are installed (nothing is installed here).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:?usage: bench/gpu_check.sh OUTDIR [check ...]}"
shift
CHECKS=("$@")
[[ ${#CHECKS[@]} -gt 0 ]] || CHECKS=(logprob train train-compile hub demo demo-compile)
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"
failed=0

check() {  # name, limit in seconds, command...
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout -k 10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  echo "== $name: rc=$rc, $((SECONDS - t0)) s"
  [[ $rc -eq 0 ]] || failed=$((failed + 1))
}

demo() {  # name, manifest: `copd run` to the end, its summary copied to OUTDIR/<name>-summary.json
  local name=$1 dir="${TMPDIR:-/tmp}/copd-gpu-$1"
  rm -rf "$dir"
  check "$name" 240 "$PY" -m copd_runtime.cli run "$2" --output "$dir" --no-live
  cp "$dir/summary.json" "$OUT/$name-summary.json" 2>/dev/null
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__, "cuda", torch.cuda.is_available())'

for c in "${CHECKS[@]}"; do
  case "$c" in
    logprob) check logprob 120 "$PY" bench/logprob_memory.py --device cuda ;;
    train) check train 300 "$PY" bench/train_step.py --sweep "${COPD_TRAIN_SWEEP:-32768,16384@512,32768@512,65536c,65536c@512}" ;;
    train-compile) check train-compile 200 "$PY" bench/train_step.py --compile --sweep "${COPD_TRAIN_SWEEP:-32768@512}" ;;
    hub) check hub 150 "$PY" bench/hub_scoring.py --hidden 1024 --layers 8 --vocab 151936 --prompt 256 --response 768 ;;
    demo) demo demo examples/copdrun.yaml ;;  # precision auto: bf16 on the GPU
    demo-compile)  # the same with trainer.compile: true
      sed -e 's/^  trainer:$/  trainer:\n    compile: true/' examples/copdrun.yaml >"$OUT/demo-compile.yaml"
      grep -q "compile: true" "$OUT/demo-compile.yaml" || { echo "demo-compile: no trainer section"; failed=$((failed + 1)); continue; }
      demo demo-compile "$OUT/demo-compile.yaml" ;;
    *) echo "unknown check: $c" >&2; failed=$((failed + 1)) ;;
  esac
done
exit "$failed"
