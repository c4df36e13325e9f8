#!/usr/bin/env bash
# One-time set-up of a fresh machine (idempotent; a warm machine takes seconds):
#   1. uv (pinned below), installed once per machine into the cache;
#   2. THIS clone's own virtualenv, ./.venv, synced from the committed uv.lock
#      (`uv sync --frozen`) with this clone installed editable: every clone runs
#      its own code. Clones share only uv's download/wheel cache, from which uv
#      hard-links, so a second clone's .venv takes seconds;
#   3. the Kubernetes test binaries (etcd, kube-*, kwok, helm, promtool), built
#      from Go modules by hack/cluster/build.sh into the cache (shared: they are
#      keyed by version and hold no code of ours).
# Safe to run twice at once: the venv sync and the Go build (build.sh) each hold a lock.
# Skip step 3 with COPD_SKIP_CLUSTER_BUILD=1 (e.g. to run only `copd run`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
CACHE="${COPD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/copd-operator}"
UV_VERSION=0.13.9

# system tools the control plane scripts use (Debian package names)
missing=()
for tool in openssl:openssl curl:curl ss:iproute2 make:make flock:util-linux; do
  command -v "${tool%%:*}" >/dev/null || missing+=("${tool##*:}")
done
if (( ${#missing[@]} )); then
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    echo "[setup] installing ${missing[*]}" >&2
    apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "[setup] please install: ${missing[*]}" >&2; exit 1
  fi
fi
command -v go >/dev/null || [[ "${COPD_SKIP_CLUSTER_BUILD:-0}" == 1 ]] \
  || { echo "[setup] Go >= 1.26 is needed to build the Kubernetes test binaries (or COPD_SKIP_CLUSTER_BUILD=1)" >&2; exit 1; }
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
"$PY" -c 'import sys; assert sys.version_info >= (3, 11), "Python >= 3.11 is required"'
mkdir -p "$CACHE/tools"

# -- 1. uv -----------------------------------------------------------------------
UV="$CACHE/tools/uv-$UV_VERSION/bin/uv"
if [[ ! -x "$UV" ]]; then
  echo "[setup] installing uv $UV_VERSION into $CACHE/tools" >&2
  tmp="$(mktemp -d "$CACHE/tools/.uv-$UV_VERSION.XXXXXX")"
  "$PY" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --target "$tmp" "uv==$UV_VERSION"
  # first one to rename wins; a concurrent set-up's copy is dropped
  mv -T "$tmp" "$CACHE/tools/uv-$UV_VERSION" 2>/dev/null || rm -rf "$tmp"
fi

# -- 2. this clone's .venv from uv.lock --------------------------------------------
export UV_CACHE_DIR="${UV_CACHE_DIR:-$CACHE/uv}" UV_PYTHON_DOWNLOADS=never
unset UV_PROJECT_ENVIRONMENT VIRTUAL_ENV
if [[ -L .venv ]]; then  # the old layout linked .venv to a venv shared by all clones
  echo "[setup] replacing the .venv link ($(readlink .venv)) by this clone's own venv" >&2
  rm .venv
fi
echo "[setup] syncing .venv from uv.lock (first time: downloads torch, a few GB)" >&2
flock "$ROOT/.setup.lock" "$UV" sync --frozen --extra dev --python "$PY" --quiet

# -- 2b. vLLM's Python classes for tests/model/test_vllm_conversion.py ----------------
# vllm 0.33.0 (wheel 336 MB, 813 MB unpacked; hard-linked from uv's cache, so a second clone costs
# seconds and no disk) and the ten small packages its output classes import, with no dependencies, at
# the pins of uv.lock's `gpu` fork, into ./.vllm-classes (never on the venv's path: the test appends
# it). Only the CPU-side classes are used; vLLM itself needs CUDA. Skip with COPD_SKIP_VLLM_CLASSES=1.
if [[ "${COPD_SKIP_VLLM_CLASSES:-0}" != 1 ]]; then
  want="$("$UV" export --frozen --extra gpu --no-emit-project --no-hashes --no-header --no-annotate --quiet \
    | sed 's/ *;.*//' | grep -E '^(vllm|msgspec|cbor2|pyzmq|oss-harmony|openai|sniffio|pybase64|cachetools|cloudpickle|uvloop)==' \
    | sort)"
  (  # under the set-up lock: two set-ups of one clone at once must not share .vllm-classes.tmp
    flock 9
    if [[ ! -f .vllm-classes/PINS || "$(cat .vllm-classes/PINS)" != "$want" ]]; then
      echo "[setup] installing vLLM's Python classes into .vllm-classes (first time: a 336 MB download)" >&2
      rm -rf .vllm-classes.tmp
      # shellcheck disable=SC2086  # one requirement per word
      "$UV" pip install --quiet --no-deps --python .venv/bin/python --target .vllm-classes.tmp $want
      echo "$want" > .vllm-classes.tmp/PINS
      rm -rf .vllm-classes && mv .vllm-classes.tmp .vllm-classes
    fi
  ) 9>"$ROOT/.setup.lock"
fi

# -- 3. the Kubernetes test binaries --------------------------------------------------
if [[ "${COPD_SKIP_CLUSTER_BUILD:-0}" != 1 ]]; then
  echo "[setup] building the Kubernetes test binaries (cold: ~10-40 min on 2 cores; cached after)" >&2
  hack/cluster/build.sh  # holds its own lock: two set-ups at once build each component once
fi
echo "[setup] done. Next: source .venv/bin/activate" >&2
