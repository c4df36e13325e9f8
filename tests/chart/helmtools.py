"""Helpers of the chart tests (tests/chart, tests/cluster/test_helm_*): find helm/promtool, render the chart.

The binaries are the pinned ones scripts/setup.sh builds (hack/cluster/build.sh
--dir helm|promtool); a missing binary FAILS the test (CI must run these).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests import ROOT

CHART = ROOT / "helm/copd-operator"


def tool(name: str) -> str:
    d = subprocess.run(["bash", str(ROOT / "hack/cluster/build.sh"), "--dir", name], capture_output=True,
                       text=True)
    cand = Path(d.stdout.strip()) / name if d.returncode == 0 and d.stdout.strip() else None
    if cand and cand.exists():
        return str(cand)
    found = shutil.which(name)
    if found:
        return found
    pytest.fail(f"{name} not found (run scripts/setup.sh: it builds the pinned {name})", pytrace=False)


def helm_template(helm_bin: str, *args: str, release="copd", namespace="copd-system", check=True):
    p = subprocess.run([helm_bin, "template", release, str(CHART), "--namespace", namespace, *args],
                       capture_output=True, text=True, timeout=120)
    if check and p.returncode != 0:
        raise AssertionError(f"helm template {' '.join(args)} failed:\n{p.stderr}")
    return p


def render(helm_bin: str, *args: str, **kw) -> list[dict]:
    """The rendered manifests (CRDs included) as dicts."""
    out = helm_template(helm_bin, "--include-crds", *args, **kw).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def find(docs: list[dict], kind: str, name: str | None = None, namespace: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
            and (namespace is None or d["metadata"].get("namespace") == namespace)]
