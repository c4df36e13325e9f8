"""Fixtures for tests against the real local control plane (scripts/cluster.sh).

* `cluster` (session): runs `scripts/cluster.sh up` (builds the binaries on first
  use, ~10 min cold on 2 cores; a few seconds when already up) and yields a
  `Cluster` with the kubeconfig, an env dict (PATH has kubectl/helm/promtool),
  `kubectl(*args)`, `api_client()`, the process-node workdir and `log_path()`.
  If the control plane cannot be built or started the test FAILS (never skips).
* `namespace` (function): a fresh namespace whose `default` ServiceAccount
  exists; deleted afterwards.

Mark such tests with `@pytest.mark.cluster`.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests import ROOT
from tests.cluster.support import procnode_module

pod_log_path = procnode_module("pods").pod_log_path

UP_TIMEOUT_S = int(os.environ.get("COPD_CLUSTER_UP_TIMEOUT", "3600"))


@dataclass
class Cluster:
    root: Path
    dir: Path
    kubeconfig: Path
    env: dict
    procnode_name: str
    procnode_workdir: Path
    versions: dict = field(default_factory=dict)

    def kubectl(self, *args, check=True, input=None, timeout=120) -> subprocess.CompletedProcess:
        """Run kubectl against the cluster; returns the CompletedProcess (text)."""
        p = subprocess.run(
            ["kubectl", *args], env=self.env, input=input, capture_output=True, text=True, timeout=timeout
        )
        if check and p.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
        return p

    def run(self, *argv, check=True, timeout=120) -> subprocess.CompletedProcess:
        """Run any tool from the cluster's PATH (helm, promtool, ...)."""
        return subprocess.run(
            list(argv), env=self.env, capture_output=True, text=True, timeout=timeout, check=check
        )

    def api_client(self):
        """A new kubernetes.client.ApiClient for the admin user."""
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig))

    def log_path(self, namespace, pod, container) -> Path:
        """stdout+stderr of a container that ran on the process node."""
        return Path(pod_log_path(self.procnode_workdir, namespace, pod, container))


def _read_versions() -> dict:
    out = {}
    for line in (ROOT / "hack/cluster/versions.env").read_text().splitlines():
        m = re.match(r"^([A-Z_]+)=(\S+)", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def pytest_collection_modifyitems(config, items):
    """The first test that brings the cluster up may pay for a cold build (~13 min on 2 cores):
    give it UP_TIMEOUT_S on top of the usual per-test timeout."""
    for item in items:
        if "cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.timeout(UP_TIMEOUT_S + 900))
            break


@pytest.fixture(scope="session")
def cluster() -> Cluster:
    t0 = time.time()
    p = subprocess.run(
        ["bash", str(ROOT / "scripts/cluster.sh"), "up"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=UP_TIMEOUT_S,
    )
    if p.returncode != 0:
        pytest.fail(
            f"scripts/cluster.sh up failed ({p.returncode}) after {time.time() - t0:.0f}s:\n"
            f"{p.stdout[-4000:]}\n{p.stderr[-8000:]}",
            pytrace=False,
        )
    cdir = Path(os.environ.get("COPD_CLUSTER_DIR", ROOT / ".cluster"))
    dump = subprocess.run(
        ["bash", "-c", f"set -a; source '{cdir}/env'; env -0"],
        capture_output=True,
        check=True,
        env=os.environ.copy(),
    )
    env = dict(kv.split("=", 1) for kv in dump.stdout.decode().split("\0") if "=" in kv)
    return Cluster(
        root=ROOT,
        dir=cdir,
        kubeconfig=Path(env["KUBECONFIG"]),
        env=env,
        procnode_name=env["COPD_PROCNODE_NAME"],
        procnode_workdir=Path(env["COPD_PROCNODE_WORKDIR"]),
        versions=_read_versions(),
    )


@pytest.fixture
def namespace(cluster: Cluster, request) -> str:
    base = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-")
    name = f"{base}-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", name)
    deadline = time.time() + 60
    while cluster.kubectl("get", "serviceaccount", "default", "-n", name, check=False).returncode != 0:
        if time.time() > deadline:
            raise AssertionError(f"no default ServiceAccount in namespace {name} after 60s")
        time.sleep(0.3)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)
