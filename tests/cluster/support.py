"""The harness of the cluster tests: an operator process, the CRDs, an API shortcut, waits on conditions."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

from tests import ROOT

PY = str(ROOT / ".venv/bin/python") if (ROOT / ".venv/bin/python").exists() else sys.executable
KWOK_TOLERATION = {"key": "kwok.x-k8s.io/node", "operator": "Exists", "effect": "NoSchedule"}
GPU_NODE_SELECTOR = {"nvidia.com/gpu.present": "true"}


# ---------------------------------------------------------------------------
# harness


def procnode_module(name: str):
    """A module of the process node (hack/cluster/procnode/NAME.py), a program rather than a package."""
    import importlib.util

    path = ROOT / "hack" / "cluster" / "procnode" / f"{name}.py"
    mod_name = f"copd_procnode_{name}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = mod
    spec.loader.exec_module(mod)
    return mod


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Operator:
    def __init__(self, cluster, namespace: str, log_dir: Path, *extra: str):
        self.cluster, self.namespace, self.extra = cluster, namespace, extra
        self.port = free_port()
        self.log = log_dir / f"operator-{namespace}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> Operator:
        env = dict(self.cluster.env)
        with open(self.log, "a") as f:
            self.proc = subprocess.Popen(
                [PY, "-m", "copd_operator.main", "--namespace", self.namespace, "--metrics-port", str(self.port),
                 "--resync-seconds", "2", *self.extra],
                cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(lambda: self.metrics() is not None, 60, "operator /metrics")
        return self

    def kill(self, sig=signal.SIGKILL) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(30)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)

    def metrics(self) -> str | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=2) as r:
                return r.read().decode()
        except OSError:
            return None

    def tail(self, n=60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:]) if self.log.exists() else ""


def wait_for(fn, timeout: float, what: str, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


_CRDS_APPLIED = []


def apply_crds(cluster) -> None:
    if _CRDS_APPLIED:
        return
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    cluster.kubectl("wait", "--for", "condition=Established", "--timeout", "60s",
                    "crd/copdruns.copd.io", "crd/branches.copd.io")
    _CRDS_APPLIED.append(True)


def example(**trainer) -> dict:
    doc = yaml.safe_load((ROOT / "examples/copdrun.yaml").read_text())
    doc["spec"].setdefault("trainer", {}).update(trainer)
    return doc


class Api:
    def __init__(self, cluster):
        from kubernetes import client

        self.api = cluster.api_client()
        self.custom = client.CustomObjectsApi(self.api)
        self.core = client.CoreV1Api(self.api)
        self.batch = client.BatchV1Api(self.api)

    def run(self, ns, name) -> dict:
        return self.custom.get_namespaced_custom_object("copd.io", "v1alpha1", ns, "copdruns", name)

    def branches(self, ns) -> list[dict]:
        return self.custom.list_namespaced_custom_object("copd.io", "v1alpha1", ns, "branches")["items"]

    def jobs(self, ns) -> list:
        return self.batch.list_namespaced_job(ns).items

    def pods(self, ns) -> list:
        return self.core.list_namespaced_pod(ns).items


def apply_doc(cluster, ns: str, doc: dict) -> float:
    t = time.monotonic()
    cluster.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(doc))
    return t


def metric(text: str, name: str, **labels) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def assert_no_duplicate_children(api: Api, ns: str) -> None:
    """Deterministic names make duplicates impossible by name; check each Job made exactly one pod
    and there is at most one hub per cycle."""
    per_job: dict[str, int] = {}
    for p in api.pods(ns):
        job = (p.metadata.labels or {}).get("job-name")
        if job:
            per_job[job] = per_job.get(job, 0) + 1
    extra = {j: n for j, n in per_job.items() if n > 1}
    assert not extra, f"Jobs with more than one pod: {extra}"


def report(name: str, **numbers) -> None:
    line = json.dumps({"measure": name, **numbers})
    print(line)
    out = ROOT / ".cluster" / "operator-measurements.jsonl"
    with open(out, "a") as f:
        f.write(line + "\n")


