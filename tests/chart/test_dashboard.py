"""The Grafana dashboard: loads, has the panels the issue asks for, and every query is valid PromQL
(`promtool check rules` on a rules file wrapping each expr as a recording rule) over metric names the
operator really exports (copd_core.metrics.CoPDMetrics)."""

from __future__ import annotations

import json
import re
import subprocess

import yaml

from copd_core.metrics import CoPDMetrics
from tests.chart.helmtools import CHART

DASH = CHART / "dashboards/copd-operator.json"
# Grafana's variables, as a Prometheus would see them after interpolation
VARIABLES = {"$namespace": ".*", "$run": ".*", "$__rate_interval": "2m", "$__range": "6h", "$__interval": "30s"}


def _panels(d):
    for p in d["panels"]:
        yield p
        yield from p.get("panels", [])


def _exprs(d) -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in _panels(d) for t in p.get("targets", [])]


def _interpolate(expr: str) -> str:
    for k in sorted(VARIABLES, key=len, reverse=True):
        expr = expr.replace(k, VARIABLES[k])
    assert "$" not in expr, expr
    return expr


def exported_names() -> set[str]:
    names = set()
    for fam in CoPDMetrics().registry.collect():
        names.add(fam.name + ("_total" if fam.type == "counter" else ""))
        if fam.type == "histogram":
            names |= {fam.name + s for s in ("_bucket", "_sum", "_count")}
    return names


def test_dashboard_loads_and_has_the_panels():
    d = json.loads(DASH.read_text())
    assert d["uid"] and d["title"]
    titles = " | ".join(p["title"] for p in _panels(d))
    for want in ("Top-k overlap per direction", "Symmetric KL per direction", "Reward per branch",
                 "Phase timeline per run", "Runs by state", "Phase duration"):
        assert want in titles, titles
    ids = [p["id"] for p in _panels(d)]
    assert len(ids) == len(set(ids))
    for p in _panels(d):
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}" and p["targets"], p["title"]
    assert {v["name"] for v in d["templating"]["list"]} == {"datasource", "namespace", "run"}


def test_every_panel_query_is_valid_promql_over_exported_metrics(promtool_bin, tmp_path):
    d = json.loads(DASH.read_text())
    exprs = _exprs(d) + [(v["name"], re.sub(r"^label_values\((.*),\s*\w+\)$", r"\1", v["definition"]))
                         for v in d["templating"]["list"] if v["type"] == "query"]
    known = exported_names()
    rules = []
    for i, (title, expr) in enumerate(exprs):
        e = _interpolate(expr)
        used = set(re.findall(r"\bcopd_[a-z_]+\b", e))
        assert used and used <= known, (title, used - known)
        rules.append({"record": f"dashboard:panel_{i}", "expr": e})
    f = tmp_path / "dashboard_rules.yaml"
    f.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    p = subprocess.run([promtool_bin, "check", "rules", str(f)], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"SUCCESS: {len(rules)} rules found" in p.stdout


def test_phase_timeline_maps_every_phase():
    from copd_core.metrics import PHASES

    d = json.loads(DASH.read_text())
    (p,) = [p for p in _panels(d) if p["title"] == "Phase timeline per run"]
    opts = p["fieldConfig"]["defaults"]["mappings"][0]["options"]
    expr = p["targets"][0]["expr"]
    for i, phase in enumerate(PHASES):
        assert opts[str(i + 1)]["text"] == phase
        assert f'phase="{phase}"}} * {i + 1})' in expr
