"""helm/copd-operator on the real control plane: every rendered manifest passes a server-side dry run,
and `helm install` runs the operator (on the process node, from this checkout) which reconciles a run.

ServiceMonitor/PrometheusRule: the test installs minimal copies of the two monitoring.coreos.com CRDs
(structural schemas with x-kubernetes-preserve-unknown-fields) so those kinds go through the same dry
run; their content is checked by tests/chart (promtool).
"""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request

import pytest
import yaml

from tests.cluster.support import (
    GPU_NODE_SELECTOR,
    KWOK_TOLERATION,
    PY,
    ROOT,
    Api,
    apply_crds,
    apply_doc,
    example,
    free_port,
    wait_for,
)

CHART = ROOT / "helm/copd-operator"
PROC_TOLERATION = {"key": "copd.io/process-node", "operator": "Exists", "effect": "NoSchedule"}


def _monitoring_crd(plural: str, kind: str) -> dict:
    return {
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.monitoring.coreos.com"},
        "spec": {"group": "monitoring.coreos.com", "scope": "Namespaced",
                 "names": {"plural": plural, "singular": kind.lower(), "kind": kind, "listKind": kind + "List"},
                 "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": {
                     "type": "object", "properties": {"spec": {
                         "type": "object", "x-kubernetes-preserve-unknown-fields": True}}}}}]},
    }


def install_monitoring_crds(cluster) -> None:
    docs = [_monitoring_crd("servicemonitors", "ServiceMonitor"), _monitoring_crd("prometheusrules", "PrometheusRule")]
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-",
                    input="\n---\n".join(yaml.safe_dump(d) for d in docs))
    cluster.kubectl("wait", "--for", "condition=Established", "--timeout", "60s",
                    "crd/servicemonitors.monitoring.coreos.com", "crd/prometheusrules.monitoring.coreos.com")


def helm(cluster, *args, input=None, timeout=300) -> subprocess.CompletedProcess:
    p = subprocess.run(["helm", *args], env=cluster.env, input=input, capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, f"helm {' '.join(args)} failed:\n{p.stdout}\n{p.stderr}"
    return p


@pytest.mark.cluster
def test_helm_lint_on_cluster_tools(cluster):
    helm(cluster, "lint", "--strict", str(CHART))


@pytest.mark.cluster
def test_every_rendered_manifest_passes_server_side_dry_run(cluster, namespace):
    apply_crds(cluster)
    install_monitoring_crds(cluster)
    value_sets = {
        "defaults": [],
        "namespaced": ["--set", "watch.allNamespaces=false", "--set", f"watch.namespaces={{{namespace}}}"],
        "monitoring": ["--set", "serviceMonitor.enabled=true", "--set", "prometheusRule.enabled=true",
                       "--set", "serviceMonitor.labels.release=kps", "--set", "prometheusRule.alertLabels.team=ml"],
        "everything": ["--set", "watch.allNamespaces=false", "--set", f"watch.namespaces={{{namespace}}}",
                       "--set", "serviceMonitor.enabled=true", "--set", "prometheusRule.enabled=true",
                       "--set", "operator.hubAddress=pod-ip", "--set", "operator.podEnv.HF_HUB_OFFLINE=1",
                       "--set", "service.type=NodePort", "--set", "priorityClassName=system-cluster-critical",
                       "--set", f"dashboard.namespace={namespace}"],
        "trainer-sa-cluster-wide": ["--set", f"trainer.extraNamespaces={{{namespace}}}",
                                    "--set", "trainer.serviceAccount.name=trainers"],
    }
    for name, args in value_sets.items():
        out = helm(cluster, "template", f"dry-{name}"[:20], str(CHART), "--namespace", namespace,
                   "--include-crds", *args).stdout
        kinds = sorted({d["kind"] for d in yaml.safe_load_all(out) if d})
        p = cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=out, check=False)
        assert p.returncode == 0, f"values {name}: dry run refused\n{p.stdout}\n{p.stderr}"
        assert "CustomResourceDefinition" in kinds and "Deployment" in kinds, (name, kinds)
        if name in ("monitoring", "everything"):
            assert {"ServiceMonitor", "PrometheusRule"} <= set(kinds)
            assert "servicemonitor.monitoring.coreos.com" in p.stdout and "prometheusrule" in p.stdout
    # and a wrong value fails at install, before anything reaches the cluster
    p = subprocess.run(["helm", "install", "bad", str(CHART), "-n", namespace, "--set", "replicaCount=3",
                        "--set", "leaderElection.enabled=false"],
                       env=cluster.env, capture_output=True, text=True)
    assert p.returncode != 0 and "/replicaCount': maximum: got 3, want 1" in p.stderr, p.stderr


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError:
        return 0, ""


@pytest.mark.cluster
def test_helm_install_runs_the_operator_which_reconciles_a_run(cluster, namespace):
    apply_crds(cluster)
    api = Api(cluster)
    metrics_port, health_port = free_port(), free_port()
    release = "copd-" + namespace[-6:]
    values = {
        "watch": {"allNamespaces": False, "namespaces": [namespace]},
        "operator": {"command": [PY, "-m", "copd_operator.main"],
                     "metricsPort": metrics_port, "healthPort": health_port, "resyncSeconds": 2},
        "nodeSelector": {"copd.io/process-node": "true"},
        "tolerations": [PROC_TOLERATION],
    }
    inst = helm(cluster, "install", release, str(CHART), "-n", namespace, "-f", "-", "--wait", "--timeout", "180s",
                input=yaml.safe_dump(values))
    try:
        notes = inst.stdout.split("NOTES:", 1)[1]
        assert f"It watches CoPDRuns in: {namespace}." in notes and "kubectl get copd" in notes
        pods = api.core.list_namespaced_pod(namespace, label_selector=f"app.kubernetes.io/instance={release}").items
        assert len(pods) == 1
        pod = pods[0]
        assert pod.spec.node_name == cluster.procnode_name and pod.status.phase == "Running"
        assert pod.spec.service_account_name == f"{release}-copd-operator"
        assert all(c.ready for c in pod.status.container_statuses)
        log = cluster.log_path(namespace, pod.metadata.name, "operator")

        # the process node runs no probes: call the endpoints the chart's probes use
        def ready():
            return _get(f"http://127.0.0.1:{health_port}/readyz")[0] == 200

        wait_for(ready, 60, f"/readyz\n{log.read_text(errors='replace')[-3000:] if log.exists() else ''}")
        code, body = _get(f"http://127.0.0.1:{health_port}/healthz")
        assert code == 200 and json.loads(body)["ok"] is True

        doc = example(tolerations=[KWOK_TOLERATION], nodeSelector=GPU_NODE_SELECTOR)
        doc["spec"]["trainer"].pop("priorityClassName", None)
        apply_doc(cluster, namespace, doc)
        try:
            wait_for(lambda: len(api.branches(namespace)) == 3, 90, "3 Branch objects")
            st = wait_for(lambda: (s := api.run(namespace, "demo").get("status") or {}).get("phase")
                          in ("Running", "Succeeded") and s, 90, "the run to reach Running")
        except AssertionError as e:
            raise AssertionError(f"{e}\noperator log:\n{log.read_text(errors='replace')[-4000:]}") from None
        assert st["phase"] in ("Running", "Succeeded")
        trainer = wait_for(lambda: [p for p in api.pods(namespace)
                                    if (p.metadata.labels or {}).get("copd.io/run") == "demo"], 60, "a trainer pod")
        assert trainer[0].spec.service_account_name == "copd-trainer"
        # the chart pre-created the trainer identity (with its read-only Role)
        sa = api.core.read_namespaced_service_account("copd-trainer", namespace)
        assert sa.automount_service_account_token is False
        assert (sa.metadata.labels or {}).get("app.kubernetes.io/managed-by") == "Helm"

        text = wait_for(lambda: (r := _get(f"http://127.0.0.1:{metrics_port}/metrics"))[0] == 200
                        and "copd_run_phase{" in r[1] and r[1], 60, "run metrics")
        assert f'copd_run_phase{{namespace="{namespace}",phase="' in text
        # the metrics Service points at the pod's metrics port
        svc = api.core.read_namespaced_service(f"{release}-copd-operator-metrics", namespace)
        assert svc.spec.ports[0].target_port == "metrics"
    finally:
        subprocess.run(["helm", "uninstall", release, "-n", namespace, "--wait", "--timeout", "60s"],
                       env=cluster.env, capture_output=True, text=True, timeout=120)
