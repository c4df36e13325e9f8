"""Render Kueue's CRDs, webhook configurations and manager configuration for the local control plane.

    render.py COMPONENTS_DIR CA_CRT WEBHOOK_PORT HEALTH_PORT CERT_DIR OUT_DIR

COMPONENTS_DIR is config/components of the Kueue module (hack/cluster/build.sh copies it next to
the binary). What a kustomize build of config/default does, reduced to what a loopback manager
needs, deterministically (same inputs, same bytes):

  * the CRDs of config/components/crd (kustomization.yaml's list), with the conversion webhook
    of its patches pointing at https://127.0.0.1:WEBHOOK_PORT/convert;
  * the webhook configurations of config/components/webhook/manifests.yaml for Kueue's own kinds
    and for batch/v1 Jobs only (the one integration enabled here), each pointing at the loopback
    URL with the local CA. The Job webhooks carry an objectSelector on the queue-name label: a
    Job that does not ask for a queue never waits on Kueue (the manager ignores those anyway:
    manageJobsWithoutQueueName is false), so the rest of the cluster keeps working while Kueue
    restarts;
  * the manager's Configuration (config.kueue.x-k8s.io/v1beta2): no leader election, internal
    certificate management off (CERT_DIR holds tls.crt/tls.key made by scripts/cluster.sh),
    manageJobsWithoutQueueName false, integrations batch/job.
"""

from __future__ import annotations

import base64
import sys
from pathlib import Path

import yaml

QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KEEP_GROUPS = {"kueue.x-k8s.io", "batch"}


def url(port: int, path: str) -> str:
    return f"https://127.0.0.1:{port}{path}"


def crds(components: Path, ca_b64: str, port: int) -> list[dict]:
    kust = yaml.safe_load((components / "crd/kustomization.yaml").read_text())
    converted = set()
    for p in kust.get("patches") or []:
        patch = yaml.safe_load((components / "crd" / p["path"]).read_text())
        if ((patch.get("spec") or {}).get("conversion") or {}).get("strategy") == "Webhook":
            converted.add(patch["metadata"]["name"])
    out = []
    for res in kust["resources"]:
        crd = yaml.safe_load((components / "crd" / res).read_text())
        if crd["metadata"]["name"] in converted:
            crd["spec"]["conversion"] = {"strategy": "Webhook", "webhook": {
                "clientConfig": {"url": url(port, "/convert"), "caBundle": ca_b64},
                "conversionReviewVersions": ["v1"]}}
        out.append(crd)
    return out


def webhooks(components: Path, ca_b64: str, port: int) -> list[dict]:
    out = []
    for cfg in yaml.safe_load_all((components / "webhook/manifests.yaml").read_text()):
        if not cfg:
            continue
        kept = []
        for w in cfg["webhooks"]:
            groups = {g for r in w["rules"] for g in r["apiGroups"]}
            if not groups <= KEEP_GROUPS:
                continue
            path = w["clientConfig"]["service"]["path"]
            w["clientConfig"] = {"url": url(port, path), "caBundle": ca_b64}
            if groups == {"batch"}:
                w["objectSelector"] = {"matchExpressions": [{"key": QUEUE_LABEL, "operator": "Exists"}]}
            w["timeoutSeconds"] = 10
            kept.append(w)
        cfg["metadata"]["name"] = "kueue-" + cfg["metadata"]["name"]
        cfg["webhooks"] = kept
        out.append(cfg)
    return out


def manager_config(webhook_port: int, health_port: int, cert_dir: str) -> dict:
    return {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2", "kind": "Configuration",
        "namespace": "kueue-system",
        "health": {"healthProbeBindAddress": f"127.0.0.1:{health_port}"},
        "metrics": {"bindAddress": "0"},
        "webhook": {"port": webhook_port, "host": "127.0.0.1", "certDir": cert_dir},
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {"enable": False},
        "manageJobsWithoutQueueName": False,
        "clientConnection": {"qps": 50, "burst": 100},
        "integrations": {"frameworks": ["batch/job"]},
    }


def main(argv: list[str]) -> None:
    components, ca, port, health, cert_dir, out = argv
    ca_b64 = base64.b64encode(Path(ca).read_bytes()).decode()
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    ns = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "kueue-system"}}
    docs = [ns, *crds(Path(components), ca_b64, int(port))]
    (out_dir / "crds.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=True))
    (out_dir / "webhooks.yaml").write_text(
        yaml.safe_dump_all(webhooks(Path(components), ca_b64, int(port)), sort_keys=True))
    (out_dir / "config.yaml").write_text(yaml.safe_dump(manager_config(int(port), int(health), cert_dir),
                                                        sort_keys=True))


if __name__ == "__main__":
    if len(sys.argv) != 7:
        sys.exit(__doc__)
    main(sys.argv[1:])
