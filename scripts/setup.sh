#!/usr/bin/env bash
# One-time set-up of a fresh machine (idempotent; a warm machine takes seconds):
#   1. a Python virtualenv with the pinned dependencies, shared between clones
#      and keyed by a hash of pyproject.toml (~/.cache/copd-operator/venvs/<hash>),
#      linked as .venv and holding this clone as an editable install;
#   2. the Kubernetes test binaries (etcd, kube-*, kwok, helm, promtool), built
#      from Go modules by hack/cluster/build.sh into ~/.cache/copd-operator/bin.
# Skip step 2 with COPD_SKIP_CLUSTER_BUILD=1 (e.g. to run only `copd run`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
CACHE="${COPD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/copd-operator}"

# system tools the control plane scripts use (Debian package names)
missing=()
for tool in openssl:openssl curl:curl ss:iproute2 make:make; do
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

key="$( (cat pyproject.toml; "$PY" -c 'import sys; print(sys.version)') | sha256sum | cut -c1-16)"
VENV="$CACHE/venvs/$key"
if [[ ! -f "$VENV/.complete" ]]; then
  echo "[setup] creating $VENV (first time: downloads torch, a few GB)" >&2
  rm -rf "$VENV"
  mkdir -p "$CACHE/venvs"
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip
  "$VENV/bin/pip" install --quiet -e ".[dev]"
  touch "$VENV/.complete"
else
  echo "[setup] reusing $VENV" >&2
fi
# editable install of THIS clone (cheap; the venv may have been made by another clone)
"$VENV/bin/pip" install --quiet --no-deps --no-build-isolation -e . 2>/dev/null \
  || "$VENV/bin/pip" install --quiet --no-deps -e .
if [[ -L .venv || ! -e .venv ]]; then
  ln -sfn "$VENV" .venv
else
  echo "[setup] .venv exists and is not a link; leaving it alone (delete it to use $VENV)" >&2
fi

if [[ "${COPD_SKIP_CLUSTER_BUILD:-0}" != 1 ]]; then
  echo "[setup] building the Kubernetes test binaries (cold: ~10-40 min on 2 cores; cached after)" >&2
  hack/cluster/build.sh
fi
echo "[setup] done. Next: source .venv/bin/activate" >&2
