"""PrometheusRule alerts: `promtool check rules` on the rendered rules, `promtool test rules` for every alert,
and thresholds that really come from values."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

from tests.chart.helmtools import find, render

HERE = Path(__file__).resolve().parent
ALERTS = {"CoPDTopKOverlapCollapse", "CoPDTopKOverlapDrop", "CoPDSymmetricKLBlowUp", "CoPDPhaseStuck",
          "CoPDMergeFailed", "CoPDRunFailed", "CoPDOperatorDown", "CoPDReconcileErrors",
          "CoPDOperatorQueueSaturated"}


def _rule_groups(helm_bin, *args) -> list[dict]:
    docs = render(helm_bin, "--set", "prometheusRule.enabled=true", *args)
    (pr,) = find(docs, "PrometheusRule")
    return pr["spec"]["groups"]


def _write(path: Path, groups) -> Path:
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    return path


def test_promtool_check_rules(helm_bin, promtool_bin, tmp_path):
    for args in ([], ["--set", "prometheusRule.alertLabels.team=ml", "--set", "prometheusRule.upSelector=job=\"x\""]):
        rules = _write(tmp_path / "rules.yaml", _rule_groups(helm_bin, *args))
        p = subprocess.run([promtool_bin, "check", "rules", str(rules)], capture_output=True, text=True)
        assert p.returncode == 0, p.stdout + p.stderr
        assert "SUCCESS: 9 rules found" in p.stdout, p.stdout


def test_every_alert_has_a_unit_test(helm_bin):
    names = {r["alert"] for g in _rule_groups(helm_bin) for r in g["rules"]}
    assert names == ALERTS
    tested = {t["alertname"] for case in yaml.safe_load((HERE / "alerts_test.yaml").read_text())["tests"]
              for t in case["alert_rule_test"] if t.get("exp_alerts")}
    assert tested == ALERTS


def test_promtool_test_rules(helm_bin, promtool_bin, tmp_path):
    groups = _rule_groups(helm_bin)
    for g in groups:
        for r in g["rules"]:
            r.pop("annotations", None)  # exp_annotations would have to repeat them verbatim
    _write(tmp_path / "rules.yaml", groups)
    shutil.copy(HERE / "alerts_test.yaml", tmp_path / "alerts_test.yaml")
    p = subprocess.run([promtool_bin, "test", "rules", "alerts_test.yaml"], cwd=tmp_path, capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "SUCCESS" in p.stdout


def test_thresholds_come_from_values(helm_bin):
    t = {"overlapMin": "0.77", "overlapFor": "7m", "overlapDropFraction": "0.11", "overlapDropWindow": "3h",
         "symmetricKlMax": "2.5", "symmetricKlFor": "9m", "phaseStuckFor": "13h", "mergeFailedWindow": "2h",
         "operatorDownFor": "4m", "reconcileErrors": "42", "reconcileErrorsWindow": "25m",
         "reconcileErrorsFor": "3m", "queueDepth": "77", "queueLatencySeconds": "12", "queueSaturatedFor": "8m"}
    # --set-json: `--set x=0.77` would pass the string "0.77", which the schema refuses (numbers only)
    args = [a for k, v in t.items() for a in ("--set-json" if v[-1].isdigit() else "--set",
                                                f"prometheusRule.thresholds.{k}={v}")]
    rules = {r["alert"]: r for g in _rule_groups(helm_bin, *args) for r in g["rules"]}
    assert rules["CoPDTopKOverlapCollapse"]["expr"] == "copd_topk_overlap < 0.77"
    assert rules["CoPDTopKOverlapCollapse"]["for"] == "7m"
    assert "(1 - 0.11) * max_over_time(copd_topk_overlap[3h])" in rules["CoPDTopKOverlapDrop"]["expr"]
    assert rules["CoPDSymmetricKLBlowUp"]["expr"] == "copd_symmetric_kl > 2.5"
    assert rules["CoPDSymmetricKLBlowUp"]["for"] == "9m"
    assert rules["CoPDPhaseStuck"]["for"] == "13h"
    assert "[2h]" in rules["CoPDMergeFailed"]["expr"] and "[2h]" in rules["CoPDRunFailed"]["expr"]
    assert rules["CoPDOperatorDown"]["for"] == "4m"
    assert rules["CoPDReconcileErrors"]["expr"].endswith("[25m])) > 42")
    assert rules["CoPDReconcileErrors"]["for"] == "3m"
    q = rules["CoPDOperatorQueueSaturated"]
    assert '{priority="event"}) > 77)' in q["expr"] and q["expr"].endswith("[5m]))) > 12)") and q["for"] == "8m"
