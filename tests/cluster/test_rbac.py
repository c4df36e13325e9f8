"""What the operator's and the trainers' identities may do, asked of the real apiserver with
SubjectAccessReviews: the chart's RBAC, installed under a fresh release name, lets the operator
do its work and read no Secret anywhere; the trainer's Role reads its run and touches nothing else."""

from __future__ import annotations

import json
import uuid

import pytest
import yaml

from tests import ROOT
from tests.chart.helmtools import helm_template, tool

RBAC_KINDS = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}


def allowed(cluster, user: str, verb: str, resource: str, namespace: str | None, group: str = "",
            subresource: str = "") -> bool:
    attrs = {"verb": verb, "resource": resource, "group": group}
    if namespace:
        attrs["namespace"] = namespace
    if subresource:
        attrs["subresource"] = subresource
    sar = {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
           "spec": {"user": user, "groups": ["system:serviceaccounts", "system:authenticated"],
                    "resourceAttributes": attrs}}
    out = cluster.kubectl("create", "-o", "json", "-f", "-", input=json.dumps(sar)).stdout
    return bool(json.loads(out)["status"].get("allowed"))


@pytest.mark.cluster
def test_operator_reads_no_secrets_and_trainers_only_their_run(cluster, namespace):
    release = f"rbac-{uuid.uuid4().hex[:6]}"
    docs = [d for d in yaml.safe_load_all(helm_template(tool("helm"), "--set", "watch.allNamespaces=true",
                                                        release=release, namespace=namespace).stdout)
            if d and d["kind"] in RBAC_KINDS]
    assert any(d["kind"] == "ClusterRole" for d in docs)
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump_all(docs))
    trainer = yaml.safe_load_all((ROOT / "operator/deploy/trainer-rbac.yaml").read_text())
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump_all([d for d in trainer if d]))
    try:
        sa = next(d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount")
        op = f"system:serviceaccount:{namespace}:{sa}"
        tr = f"system:serviceaccount:{namespace}:copd-trainer"
        # not vacuous: the operator can do its job, in any namespace (all-namespaces install)
        for verb, res, group in [("create", "jobs", "batch"), ("list", "pods", ""), ("watch", "copdruns", "copd.io"),
                                 ("create", "branches", "copd.io")]:
            assert allowed(cluster, op, verb, res, "default", group), (verb, res)
        assert allowed(cluster, op, "patch", "copdruns", "default", "copd.io", subresource="status")
        # ... and reads no Secret, anywhere, nor changes RBAC
        for ns in (namespace, "default", "kube-system", None):
            for verb in ("get", "list", "watch"):
                assert not allowed(cluster, op, verb, "secrets", ns), (verb, ns)
        for verb, res, group in [("create", "roles", "rbac.authorization.k8s.io"),
                                 ("create", "clusterrolebindings", "rbac.authorization.k8s.io"),
                                 ("delete", "copdruns", "copd.io"), ("update", "copdruns", "copd.io")]:
            assert not allowed(cluster, op, verb, res, namespace, group), (verb, res)
        # trainers: read their run; no Secrets, no pods, nothing outside their namespace
        assert allowed(cluster, tr, "get", "copdruns", namespace, "copd.io")
        for verb, res, group, ns in [("get", "secrets", "", namespace), ("list", "secrets", "", namespace),
                                     ("create", "pods", "", namespace), ("delete", "jobs", "batch", namespace),
                                     ("get", "copdruns", "copd.io", "default"),
                                     ("patch", "copdruns", "copd.io", namespace)]:
            assert not allowed(cluster, tr, verb, res, ns, group), (verb, res, ns)
    finally:
        for d in docs:
            if d["kind"].startswith("Cluster"):
                cluster.kubectl("delete", d["kind"].lower(), d["metadata"]["name"], "--ignore-not-found", check=False)
