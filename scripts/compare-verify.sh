#!/usr/bin/env bash
# Rerun the whole science comparison (both benchmarks, as `make compare`) and check it against the
# committed numbers (docs/science/**/comparison.json) with experiments.compare.verify.
#
#   scripts/compare-verify.sh OUTDIR [WORKERS]     (make compare-verify; WORKERS default: the CPU count)
#
# The two benchmarks run at once, the workers split between them by their size (2:1). Each job is
# one process on one torch thread, so the worker count changes the wall time, never a number.
# Writes OUTDIR/{separable,conflicting}/ and OUTDIR/verify-{separable,conflicting}.json; exits 1 if
# either benchmark differs (a method's average by more than 0.005, or a different base).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: scripts/compare-verify.sh OUTDIR [WORKERS]}"
workers="${2:-$(nproc)}"
py="${PYTHON:-.venv/bin/python}"
[[ -x "$py" ]] || py=python3
sep=$(( workers * 2 / 3 )); (( sep < 1 )) && sep=1
con=$(( workers - sep )); (( con < 1 )) && con=1
mkdir -p "$out"
echo "[compare-verify] $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); workers $sep + $con" >&2
"$py" -m experiments.compare examples/compare.yaml --output "$out/separable" --jobs "$sep" \
  > "$out/separable.log" 2>&1 & p1=$!
"$py" -m experiments.compare examples/compare-conflicting.yaml --output "$out/conflicting" --jobs "$con" \
  > "$out/conflicting.log" 2>&1 & p2=$!
wait $p1; r1=$?; wait $p2; r2=$?
echo "[compare-verify] separable rc=$r1, conflicting rc=$r2" >&2
rc=0
for b in separable conflicting; do
  ref=docs/science/comparison.json; [[ $b == conflicting ]] && ref=docs/science/conflicting/comparison.json
  "$py" -m experiments.compare.verify "$out/$b/comparison.json" "$ref" > "$out/verify-$b.json" || rc=1
  "$py" -c "import json,sys; d=json.load(open(sys.argv[1])); print('[compare-verify] $b: ok', d['ok'], \
'max |avg diff|', d['max_abs_diff'], 'every seed exact', d['all_seeds_exact'], d['problems'][:5])" "$out/verify-$b.json" >&2
done
exit $(( rc || r1 || r2 ))
