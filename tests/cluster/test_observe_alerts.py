"""Observe for real: the control plane's Prometheus scrapes a copd-operator process, evaluates the alert
rules rendered from the chart (durations shortened through hack/cluster/prometheus/values.yaml) and
sends what fires to its Alertmanager. The scenario code is shared with scripts/observe-demo.sh
(hack/cluster/prometheus/observe.py, a program loaded like the process node's modules)."""

from __future__ import annotations

import importlib.util
import re
import sys
import time

import pytest
import yaml

from tests import ROOT
from tests.chart.helmtools import CHART, find, render, tool
from tests.cluster.support import report, wait_for


def observe_module():
    name = "copd_observe_demo"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "hack/cluster/prometheus/observe.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


obs = observe_module()
LOCAL_VALUES = ROOT / "hack/cluster/prometheus/values.yaml"


def _operator_job() -> str:
    """The job label the chart's ServiceMonitor gives the operator: the name of the Service it selects."""
    docs = render(tool("helm"), "--set", "serviceMonitor.enabled=true")
    (sm,) = find(docs, "ServiceMonitor")
    want = sm["spec"]["selector"]["matchLabels"]
    port = sm["spec"]["endpoints"][0]["port"]
    svcs = [s for s in find(docs, "Service") if want.items() <= s["metadata"]["labels"].items()
            and any(p["name"] == port for p in s["spec"]["ports"])]
    assert len(svcs) == 1, svcs
    return svcs[0]["metadata"]["name"]


@pytest.mark.cluster
def test_prometheus_evaluates_the_chart_rules_with_the_local_values(cluster):
    """What Prometheus loaded is the chart's PrometheusRule rendered with hack/cluster/prometheus/values.yaml:
    same alerts, same expressions (default thresholds), the shortened `for` durations."""
    mon = obs.Monitoring.from_env(cluster.env)
    docs = render(tool("helm"), "-f", str(LOCAL_VALUES))
    (pr,) = find(docs, "PrometheusRule")
    want = {r["alert"]: r for g in pr["spec"]["groups"] for r in g["rules"]}
    got = {r["name"]: r for g in mon._api("rules", type="alert")["groups"] for r in g["rules"]}
    assert set(got) == set(want)
    assert {"CoPDTopKOverlapCollapse", "CoPDOperatorDown", "CoPDOperatorQueueSaturated"} <= set(want)
    for name, r in want.items():  # Prometheus prints the parsed expression: compare without spaces
        assert re.sub(r"\s+", "", got[name]["query"]) == re.sub(r"\s+", "", r["expr"]), name
    thresholds = yaml.safe_load(LOCAL_VALUES.read_text())["prometheusRule"]["thresholds"]
    assert got["CoPDTopKOverlapCollapse"]["duration"] == int(thresholds["overlapFor"].rstrip("s"))
    assert got["CoPDOperatorDown"]["duration"] == int(thresholds["operatorDownFor"].rstrip("s"))
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())["prometheusRule"]["thresholds"]
    assert got["CoPDTopKOverlapCollapse"]["query"] == f"copd_topk_overlap < {defaults['overlapMin']}"


@pytest.mark.cluster
def test_overlap_collapse_fires_into_alertmanager_and_every_dashboard_query_has_data(cluster, namespace, tmp_path):
    """scripts/observe-demo.sh's scenario: a KWOK run whose diagnose reports say the branches drift apart
    (overlap 0.9 -> 0.6 -> 0.24) fires CoPDTopKOverlapCollapse in Prometheus; Alertmanager's API has it;
    each panel query of the Grafana dashboard returns data over the run."""
    out = obs.run_collapse_scenario(cluster.env, namespace, tmp_path, timeout_s=180)
    line = out.line()
    report("observe_collapse", **{k: v for k, v in line.items() if k != "alert"})

    assert out.run_status["phase"] == "Succeeded" and out.run_status["cycle"] == 3, out.run_status
    assert out.run_status["minTopkOverlap"] == pytest.approx(0.24)
    assert out.received_by_alertmanager
    labels = out.alertmanager_alert["labels"]
    assert labels["alertname"] == obs.ALERT and labels["severity"] == "warning"
    assert (labels["namespace"], labels["run"]) == (namespace, "diverging")
    assert {(labels["student"], labels["teacher"])} <= {("arith", "reverse"), ("reverse", "arith")}
    assert labels["job"] == _operator_job()
    assert "collapsed" in out.alertmanager_alert["annotations"]["summary"]
    # diagnose of cycle 3 comes ~20-30 s after the apply, then `for: 5s`
    assert line["fired_after_s"] < 120
    no_data = [(p["panel"], p["query"]) for p in out.panels if not p["has_data"]]
    assert line["dashboard_queries"] == len(obs.dashboard_queries()) >= 15
    assert not no_data, no_data


@pytest.mark.cluster
def test_operator_down_fires_when_the_operator_stops(cluster, namespace, tmp_path):
    """An operator scraped as the chart's job; stopped, `up` goes 0 for that target and CoPDOperatorDown
    fires for it (with its instance label) in Prometheus and reaches Alertmanager."""
    mon = obs.Monitoring.from_env(cluster.env)
    op = obs.OperatorProcess(cluster.env, [namespace], tmp_path / "operator.log").start()
    mon.add_target("operator", namespace, op.addr)
    try:
        wait_for(lambda: mon.target_health(op.addr) == "up", 60, "the operator target up")
        (up,) = wait_for(lambda: mon.query(f'up{{instance="{op.addr}"}} == 1'), 30, "up == 1")
        assert up["metric"]["job"] == _operator_job()
        assert not mon.prometheus_alerts("CoPDOperatorDown", instance=op.addr)

        t0 = time.monotonic()
        op.stop()
        wait_for(lambda: mon.firing("CoPDOperatorDown", instance=op.addr), 60, "CoPDOperatorDown firing",
                 interval=0.25)
        fired_s = time.monotonic() - t0
        (am,) = wait_for(lambda: mon.alertmanager_alerts("CoPDOperatorDown", instance=op.addr), 60,
                         "CoPDOperatorDown in Alertmanager")
        received_s = time.monotonic() - t0
        assert am["labels"]["severity"] == "critical" and am["labels"]["job"] == _operator_job()
        assert am["status"]["state"] == "active"
        report("observe_operator_down", fired_after_s=round(fired_s, 1), received_after_s=round(received_s, 1))
        # `for: 5s` after the first failed scrape (1 s interval)
        assert fired_s < 45
    finally:
        op.stop()
        mon.remove_target("operator", namespace)
