"""The operator's own pod (the chart's Deployment, operator/deploy/operator.yaml) passes Pod Security
`restricted`; the operator's namespace enforces it; networkPolicy.enabled reaches the operator."""

from __future__ import annotations

import pytest
import yaml

from tests.chart.helmtools import ROOT, find, render
from tests.unit.operator.pod_security import violations

NAMESPACED = ["--set", "watch.allNamespaces=false", "--set", "watch.namespaces={team-a,team-b}"]


@pytest.mark.parametrize("args", [[], NAMESPACED, ["--set", "leaderElection.enabled=false"]])
def test_chart_operator_pod_passes_restricted(helm_bin, args):
    (dep,) = find(render(helm_bin, *args), "Deployment")
    assert violations(dep["spec"]["template"]["spec"]) == []


def test_plain_manifests_operator_pod_passes_restricted_in_an_enforcing_namespace():
    docs = [d for d in yaml.safe_load_all((ROOT / "operator/deploy/operator.yaml").read_text()) if d]
    (dep,) = find(docs, "Deployment")
    assert violations(dep["spec"]["template"]["spec"]) == []
    rbac = [d for d in yaml.safe_load_all((ROOT / "operator/deploy/rbac.yaml").read_text()) if d]
    (ns,) = find(rbac, "Namespace")
    assert ns["metadata"]["name"] == dep["metadata"]["namespace"]
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


@pytest.mark.parametrize("args, enabled", [([], True), (["--set", "networkPolicy.enabled=false"], False)])
def test_network_policy_value_reaches_the_operator(helm_bin, args, enabled):
    from copd_operator.main import parse_args

    (dep,) = find(render(helm_bin, *args), "Deployment")
    assert parse_args(dep["spec"]["template"]["spec"]["containers"][0]["args"]).network_policy is enabled


def test_operator_may_make_network_policies_and_never_read_secrets(helm_bin):
    for args in ([], NAMESPACED):
        rules = [r for d in render(helm_bin, *args) if d["kind"] in ("ClusterRole", "Role") for r in d["rules"]]
        assert any("networkpolicies" in r["resources"] and "create" in r["verbs"] for r in rules)
        assert not any("secrets" in r["resources"] or "*" in r["resources"] for r in rules)
