#!/usr/bin/env bash
# The project's test command (`make test`; CI runs it through .ci/run).
# Starts the local control plane (scripts/cluster.sh up: builds binaries if
# missing), runs the whole pytest suite, stops the control plane again if this
# script started it. pytest's exit code 5 (no tests collected) is a failure.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
[[ -x .venv/bin/python ]] || { echo "no .venv: run scripts/setup.sh (make setup) first" >&2; exit 2; }

started=0
if ! scripts/cluster.sh status >/dev/null 2>&1; then
  if ! scripts/cluster.sh up; then
    echo "control plane failed to start; one more try from a clean state" >&2
    scripts/cluster.sh down >/dev/null 2>&1 || true
    if ! scripts/cluster.sh up; then
      scripts/cluster.sh down >/dev/null 2>&1 || true
      echo "control plane failed to start (logs: .cluster/logs/)" >&2
      exit 1
    fi
  fi
  started=1
fi
make --no-print-directory lint || exit 1
.venv/bin/python -m pytest -q -ra "$@"
rc=$?
if [[ $started == 1 && "${COPD_KEEP_CLUSTER:-0}" != 1 ]]; then
  scripts/cluster.sh down >/dev/null 2>&1 || true
fi
if [[ $rc == 5 ]]; then
  echo "pytest collected no tests: that is a failure here" >&2
  exit 1
fi
exit $rc
