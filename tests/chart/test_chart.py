"""helm/copd-operator: lint, rendering, RBAC parity with operator/deploy/, schema errors, CRDs, images."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.chart.helmtools import CHART, ROOT, find, helm_template, render

NAMESPACED = ["--set", "watch.allNamespaces=false", "--set", "watch.namespaces={team-a,team-b}"]
MONITORING = ["--set", "serviceMonitor.enabled=true", "--set", "prometheusRule.enabled=true"]


def _rules(rules: list[dict]) -> set[tuple]:
    """RBAC rules as a set of (group, resource, verb) triples: the same permissions, however grouped."""
    return {(g, r, v) for rule in rules for g in rule.get("apiGroups", []) for r in rule.get("resources", [])
            for v in rule["verbs"]}


def _deploy_docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((ROOT / "operator/deploy" / name).read_text()) if d]


@pytest.mark.parametrize("args", [[], NAMESPACED, MONITORING, NAMESPACED + MONITORING], ids=str)
def test_helm_lint(helm_bin, args):
    p = subprocess.run([helm_bin, "lint", "--strict", str(CHART), *args], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def test_chart_crds_are_the_generated_crds_byte_for_byte():
    top = sorted(p.name for p in (ROOT / "crds").glob("*.yaml"))
    chart = sorted(p.name for p in (CHART / "crds").glob("*.yaml"))
    assert top == chart and top
    for name in top:
        assert (CHART / "crds" / name).read_bytes() == (ROOT / "crds" / name).read_bytes(), (
            f"helm/copd-operator/crds/{name} differs from crds/{name}: cp crds/*.yaml helm/copd-operator/crds/")


def test_cluster_wide_rbac_equals_operator_deploy_rbac(helm_bin):
    docs = render(helm_bin)
    want = _rules(find(_deploy_docs("rbac.yaml"), "ClusterRole")[0]["rules"])
    (cr,) = find(docs, "ClusterRole")
    assert _rules(cr["rules"]) == want
    (crb,) = find(docs, "ClusterRoleBinding")
    assert crb["subjects"] == [{"kind": "ServiceAccount", "name": "copd-copd-operator", "namespace": "copd-system"}]
    assert not find(docs, "Role", "copd-copd-operator")
    (dep,) = find(docs, "Deployment")
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--all-namespaces" in args and not any(a.startswith("--namespace") for a in args)


def test_namespaced_rbac_is_a_role_per_namespace_plus_cluster_scoped_reads(helm_bin):
    docs = render(helm_bin, *NAMESPACED)
    full = _rules(find(_deploy_docs("rbac.yaml"), "ClusterRole")[0]["rules"])
    (cr,) = find(docs, "ClusterRole")
    cluster = _rules(cr["rules"])
    assert cluster == {t for t in full if t[1] in ("customresourcedefinitions", "priorityclasses",
                                                   "workloadpriorityclasses")}
    for ns in ("team-a", "team-b"):
        (role,) = find(docs, "Role", "copd-copd-operator", ns)
        (rb,) = find(docs, "RoleBinding", "copd-copd-operator", ns)
        assert rb["roleRef"]["name"] == "copd-copd-operator" and rb["roleRef"]["kind"] == "Role"
        assert rb["subjects"][0]["namespace"] == "copd-system"
        # Role + the cluster-scoped reads == the reference ClusterRole, minus watching namespaces
        assert _rules(role["rules"]) | cluster == {t for t in full if t[1] != "namespaces"}
    (dep,) = find(docs, "Deployment")
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args and "--all-namespaces" not in args


def test_trainer_service_account_and_role_match_operator_deploy(helm_bin):
    ref = _deploy_docs("trainer-rbac.yaml")
    docs = render(helm_bin, *NAMESPACED, "--set", "trainer.extraNamespaces={team-c,team-a}")
    for ns in ("team-a", "team-b", "team-c"):
        (sa,) = find(docs, "ServiceAccount", "copd-trainer", ns)
        assert sa["automountServiceAccountToken"] is False
        (role,) = find(docs, "Role", "copd-trainer", ns)
        assert _rules(role["rules"]) == _rules(find(ref, "Role")[0]["rules"])
        # the narrowest write: live progress patches a Branch's status subresource, nothing else
        writes = {t for t in _rules(role["rules"]) if t[2] not in ("get", "list", "watch")}
        assert writes == {("copd.io", "branches/status", "patch")}
        (rb,) = find(docs, "RoleBinding", "copd-trainer", ns)
        assert rb["subjects"] == [{"kind": "ServiceAccount", "name": "copd-trainer", "namespace": ns}]
    # cluster-wide: only where asked (the operator creates a bare one elsewhere)
    docs = render(helm_bin)
    assert not find(docs, "ServiceAccount", "copd-trainer")
    (dep,) = find(render(helm_bin, "--set", "trainer.serviceAccount.name=trainers"), "Deployment")
    assert "--trainer-service-account=trainers" in dep["spec"]["template"]["spec"]["containers"][0]["args"]


def test_deployment_is_hardened_single_replica_with_probes(helm_bin):
    (dep,) = find(render(helm_bin), "Deployment")
    spec = dep["spec"]
    # leader election on by default: a rolling update hands the Lease over; off: Recreate, one replica
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    (off,) = find(render(helm_bin, "--set", "leaderElection.enabled=false"), "Deployment")
    assert off["spec"]["strategy"] == {"type": "Recreate"}
    assert not any(a.startswith("--leader-elect") for a in off["spec"]["template"]["spec"]["containers"][0]["args"])
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (c,) = pod["containers"]
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"] and sc["runAsNonRoot"] is True
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    assert "command" not in c  # the image's ENTRYPOINT (copd-operator)
    assert c["image"] == "copd-operator:0.1.0"
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"metrics": 9090, "health": 8081}
    assert "--metrics-port=9090" in c["args"] and "--health-port=8081" in c["args"]
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
    # the operator parses what the chart passes
    from copd_operator.main import parse_args

    a = parse_args(c["args"])
    assert a.all_namespaces and a.metrics_port == 9090 and a.health_port == 8081 and a.workers == 16
    assert (a.qps, a.burst) == (200, 400)  # the chart passes its values, which are the flags' defaults
    assert a.leader_elect and a.leader_election_namespace == "copd-system"
    assert a.leader_election_id == "copd-copd-operator-leader"


def test_leader_election_rbac_matches_operator_deploy_and_allows_replicas(helm_bin):
    ref = _deploy_docs("rbac.yaml")
    want = _rules(find(ref, "Role", "copd-operator-leader-election")[0]["rules"])
    assert want == {("coordination.k8s.io", "leases", v) for v in ("get", "create", "update")}
    for args in ([], NAMESPACED):
        docs = render(helm_bin, "--set", "replicaCount=3", *args)
        (role,) = find(docs, "Role", "copd-copd-operator-leader-election", "copd-system")
        assert _rules(role["rules"]) == want
        (rb,) = find(docs, "RoleBinding", "copd-copd-operator-leader-election", "copd-system")
        assert rb["roleRef"]["name"] == role["metadata"]["name"]
        assert rb["subjects"] == [{"kind": "ServiceAccount", "name": "copd-copd-operator", "namespace": "copd-system"}]
        (dep,) = find(docs, "Deployment")
        assert dep["spec"]["replicas"] == 3
    docs = render(helm_bin, "--set", "leaderElection.enabled=false")
    assert not find(docs, "Role", "copd-copd-operator-leader-election")


def test_operator_command_args_env_overridable(helm_bin):
    vals = {"operator": {"command": ["/src/.venv/bin/python", "-m", "copd_operator.main"],
                         "env": [{"name": "HF_HOME", "value": "/tmp/hf"}],
                         "extraArgs": ["--verbose"], "podEnv": {"HF_HUB_OFFLINE": "1"},
                         "hubAddress": "pod-ip", "trainerCommand": "python -m copd_runtime.cli"},
            "nodeSelector": {"copd.io/process-node": "true"},
            "tolerations": [{"key": "copd.io/process-node", "operator": "Exists", "effect": "NoSchedule"}]}
    p = subprocess.run([helm_bin, "template", "x", str(CHART), "-f", "-"], input=yaml.safe_dump(vals),
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    (dep,) = find([d for d in yaml.safe_load_all(p.stdout) if d], "Deployment")
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["command"] == vals["operator"]["command"]
    assert {"name": "HF_HOME", "value": "/tmp/hf"} in c["env"]
    assert c["args"][-1] == "--verbose"
    assert "--pod-env=HF_HUB_OFFLINE=1" in c["args"] and "--hub-address=pod-ip" in c["args"]
    from copd_operator.main import parse_args

    a = parse_args(c["args"])
    assert a.trainer_command == "python -m copd_runtime.cli" and a.pod_env == ["HF_HUB_OFFLINE=1"]
    assert pod["nodeSelector"] == vals["nodeSelector"] and pod["tolerations"] == vals["tolerations"]


@pytest.mark.parametrize("args, message", [
    (["--set", "leaderElection.enabled=false", "--set", "replicaCount=2"], "/replicaCount': maximum: got 2, want 1"),
    (["--set", "replicaCount=0"], "/replicaCount"),
    (["--set", "watch.allNamespaces=false"], "/watch/namespaces"),
    (["--set", "watch.namespaces={a}"], "/watch/namespaces"),
    (["--set", "watch.allNamespaces=false", "--set", "watch.namespaces={Bad_NS}"], "/watch/namespaces/0"),
    (["--set", "operator.hubAddress=dns"], "/operator/hubAddress"),
    (["--set", "operator.metricsPort=70000"], "/operator/metricsPort"),
    (["--set", "prometheusRule.thresholds.overlapFor=ten"], "/prometheusRule/thresholds/overlapFor"),
    (["--set", "prometheusRule.thresholds.overlapMin=1.5"], "/prometheusRule/thresholds/overlapMin"),
    (["--set", "prometheusRule.thresholds.overlapDropFraction=0"], "overlapDropFraction"),
    (["--set", "serviceMonitr.enabled=true"], "serviceMonitr"),
    (["--set", "image.pullPolicy=Sometimes"], "/image/pullPolicy"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_schema_rejects_wrong_values_with_a_clear_message(helm_bin, args, message):
    p = helm_template(helm_bin, *args, check=False)
    assert p.returncode != 0
    assert "values don't meet the specifications of the schema" in p.stderr and message in p.stderr, p.stderr


def test_monitoring_objects_render_without_the_monitoring_crds_unless_asked(helm_bin):
    kinds = lambda docs: {d["kind"] for d in docs}  # noqa: E731
    assert not {"ServiceMonitor", "PrometheusRule"} & kinds(render(helm_bin))
    assert {"ServiceMonitor", "PrometheusRule"} <= kinds(render(helm_bin, *MONITORING))
    gated = MONITORING + ["--set", "requireMonitoringCRDs=true"]
    assert not {"ServiceMonitor", "PrometheusRule"} & kinds(render(helm_bin, *gated))
    assert {"ServiceMonitor", "PrometheusRule"} <= kinds(
        render(helm_bin, *gated, "--api-versions", "monitoring.coreos.com/v1"))
    docs = render(helm_bin, *MONITORING, "--set", "serviceMonitor.labels.release=kps")
    (sm,) = find(docs, "ServiceMonitor")
    (svc,) = find(docs, "Service")
    assert sm["metadata"]["labels"]["release"] == "kps"
    assert all(svc["metadata"]["labels"][k] == v for k, v in sm["spec"]["selector"]["matchLabels"].items())
    assert sm["spec"]["endpoints"][0]["port"] == svc["spec"]["ports"][0]["name"] == "metrics"
    assert sm["spec"]["namespaceSelector"]["matchNames"] == ["copd-system"]


def test_dashboard_configmap(helm_bin):
    (cm,) = find(render(helm_bin), "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dash = json.loads(cm["data"]["copd-operator.json"])
    assert dash == json.loads((CHART / "dashboards/copd-operator.json").read_text())
    (cm,) = find(render(helm_bin, "--set", "dashboard.namespace=monitoring"), "ConfigMap")
    assert cm["metadata"]["namespace"] == "monitoring"
    assert not find(render(helm_bin, "--set", "dashboard.enabled=false"), "ConfigMap")


# ---------------------------------------------------------------------------
# images and entry points


def _from_lines(path: Path) -> list[str]:
    return [ln.split()[1] for ln in path.read_text().splitlines() if ln.startswith("FROM ")]


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "trainer_image/Dockerfile"])
def test_dockerfiles_pin_base_images_and_run_as_non_root(dockerfile):
    path = ROOT / dockerfile
    for image in _from_lines(path):
        tag = image.split("@", 1)[0].rsplit(":", 1)
        assert "@sha256:" in image or (len(tag) == 2 and re.search(r"\d+\.\d+", tag[1]) and tag[1] != "latest"), (
            f"{dockerfile}: base image {image} is not pinned to a version")
    users = [ln.split()[1] for ln in path.read_text().splitlines() if ln.startswith("USER ")]
    assert users and users[-1].split(":")[0].isdigit() and users[-1].split(":")[0] != "0"
    assert users[-1].split(":")[0] == "65532"  # the chart's podSecurityContext.runAsUser


def test_entry_points_the_operator_puts_in_pods_exist():
    """`copd-operator` (the operator image's ENTRYPOINT) and `copd stage|hub|diagnose|merge ...`
    (the trainer image's, in every pod the operator makes) resolve, with every option they pass."""
    from importlib.metadata import entry_points

    import typer
    from copd_operator.logic import builders
    from copd_operator.logic.builders import OperatorConfig

    from tests.unit.operator.builders_test_helpers import run_ref

    eps = {e.name: e for e in entry_points(group="console_scripts")}
    assert eps["copd-operator"].value == "copd_operator.main:main" and callable(eps["copd-operator"].load())
    assert eps["copd"].value == "copd_runtime.cli:app"
    cli = typer.main.get_command(eps["copd"].load())
    op_ep = re.search(r'ENTRYPOINT \["([^"]+)"\]', (ROOT / "Dockerfile").read_text()).group(1)
    tr_ep = re.search(r'ENTRYPOINT \["([^"]+)"\]', (ROOT / "trainer_image/Dockerfile").read_text()).group(1)
    assert op_ep in eps and tr_ep in eps

    run, cfg = run_ref(), OperatorConfig()
    assert cfg.trainer_command == (tr_ep,)
    containers = [
        builders.build_stage_job(run, cfg, "arith", "uid", 1, "RL")["spec"]["template"]["spec"]["containers"][0],
        builders.build_stage_job(run, cfg, "arith", "uid", 1, "OPD", hub_url="http://h:1")
        ["spec"]["template"]["spec"]["containers"][0],
        builders.build_diagnose_job(run, cfg, 1)["spec"]["template"]["spec"]["containers"][0],
        builders.build_merge_job(run, cfg)["spec"]["template"]["spec"]["containers"][0],
        builders.build_hub_pod(run, cfg, 1)["spec"]["containers"][0],
    ]
    seen = set()
    for c in containers:
        argv = list(c.get("command", [])) + list(c.get("args", []))
        assert argv[0] == tr_ep, argv
        sub = cli.commands.get(argv[1])
        assert sub is not None, f"`copd {argv[1]}` is not a command of copd_runtime.cli:app"
        seen.add(argv[1])
        known = {o for p in sub.params for o in p.opts}
        for a in argv[2:]:
            if a.startswith("--"):
                assert a.split("=", 1)[0] in known, f"`copd {argv[1]}` has no option {a}"
    assert seen == {"stage", "hub", "diagnose", "merge"}


@pytest.mark.parametrize("dockerfile, wanted, unwanted", [
    ("Dockerfile", {"copd_core", "operator"}, {"copd_runtime", "experiments", "tests"}),
    ("trainer_image/Dockerfile", {"copd_core", "copd_runtime"}, {"operator", "experiments", "tests"}),
])
def test_images_install_only_their_packages_from_the_lock(dockerfile, wanted, unwanted):
    """The operator image carries core + operator, the trainer image core + runtime; the science
    harness ships in neither. Both install from uv.lock (`uv sync --frozen`), not loose pins."""
    text = (ROOT / dockerfile).read_text()
    copied = {ln.split()[1].rstrip("/") for ln in text.splitlines() if ln.startswith("COPY ") and "--from" not in ln}
    assert wanted <= copied, (dockerfile, copied)
    assert not (unwanted & copied), (dockerfile, copied)
    assert "uv.lock" in text and "uv sync --frozen" in text
    assert "PYTHONPATH" not in text
