#!/usr/bin/env bash
# Observe for real: the local Prometheus scrapes the operator and fires the chart's alerts into the
# local Alertmanager (README "Observe").
#
#   scripts/observe-demo.sh            (make observe-demo)
#
# 1. scripts/cluster.sh up: the control plane with Prometheus + Alertmanager (idempotent; it renders
#    the alert rules from helm/copd-operator with the shortened durations of
#    hack/cluster/prometheus/values.yaml).
# 2. hack/cluster/prometheus/observe.py: an operator (local process) scraped by that Prometheus, a
#    CoPD run on the KWOK GPU nodes whose diagnose reports say its branches drift apart, a second run
#    that a ResourceQuota blocks (real reconcile errors); waits until CoPDTopKOverlapCollapse fires in
#    Prometheus and Alertmanager's API shows it, then evaluates every panel query of the Grafana
#    dashboard against Prometheus over the run.
#
# Prints one JSON line last:
#   {"alert": "CoPDTopKOverlapCollapse", "fired_after_s": ..., "received_by_alertmanager": true,
#    "dashboard_queries": N, "dashboard_queries_with_data": M}
# and exits 0 only when the alert reached Alertmanager and every query returned data. It leaves the
# control plane running (scripts/cluster.sh down stops it); everything else it made is removed.
# Extra arguments go to observe.py (--timeout SECONDS, --payload FILE: the alert as Alertmanager has it).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
[[ -x .venv/bin/python ]] || { echo "no .venv: run make setup first" >&2; exit 2; }
scripts/cluster.sh up >&2
exec .venv/bin/python hack/cluster/prometheus/observe.py "$@"
