"""Fluent test builders: short tests for the pure operator modules."""

from __future__ import annotations

import copy

import yaml
from copd_operator.logic.builders import OperatorConfig, RunRef
from copd_operator.logic.naming import RunKey, branch_cr_name
from copd_operator.logic.observe import Snapshot

from copd_core.spec import parse_manifest
from tests import ROOT


def example_doc() -> dict:
    return yaml.safe_load((ROOT / "examples/copdrun.yaml").read_text())


DEMO = RunKey("demo", "uid-run")  # the identity run_ref() gives: child names are naming.py's of it


def run_ref(**spec_updates) -> RunRef:
    doc = example_doc()
    doc["spec"].update(spec_updates)
    return RunRef(DEMO.name, "ns", DEMO.uid, parse_manifest(doc).spec)


class JobB:
    def __init__(self, name: str):
        self.job = {"metadata": {"name": name, "uid": f"uid-{name}", "labels": {}}, "spec": {}, "status": {}}
        self.pods: list[dict] = []

    def active(self) -> JobB:
        self.job["status"]["active"] = 1
        return self

    def suspended(self) -> JobB:
        self.job["spec"]["suspend"] = True
        return self

    def succeeded(self, message: str = "") -> JobB:
        self.job["status"] = {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}
        return self._pod(0, message)

    def failed(self, message: str = "", exit_code: int = 1) -> JobB:
        self.job["status"] = {"failed": 1, "conditions": [{"type": "Failed", "status": "True",
                                                            "message": "BackoffLimitExceeded"}]}
        return self._pod(exit_code, message)

    def _pod(self, code: int, message: str) -> JobB:
        name = self.job["metadata"]["name"]
        self.pods.append({"metadata": {"name": f"{name}-x", "labels": {"job-name": name},
                                       "ownerReferences": [{"uid": self.job["metadata"]["uid"]}]},
                          "status": {"containerStatuses": [{"state": {"terminated": {
                              "exitCode": code, "message": message, "finishedAt": "2026-01-01T00:00:00Z"}}}]}})
        return self


class SnapB:
    def __init__(self, run: RunRef | None = None):
        run = run or run_ref()
        self.snap = Snapshot(run={"metadata": {"name": run.name, "namespace": run.namespace, "uid": run.uid}},
                             pvc_exists=True)
        for b in run.spec.branches:
            self.snap.branches[b.name] = {"metadata": {"name": branch_cr_name(run, b.name), "uid": f"uid-{b.name}"},
                                          "spec": {}, "status": {}}

    def job(self, jb: JobB) -> SnapB:
        self.snap.jobs[jb.job["metadata"]["name"]] = copy.deepcopy(jb.job)
        self.snap.pods.extend(copy.deepcopy(jb.pods))
        return self

    def pod(self, pod: dict) -> SnapB:
        self.snap.pods.append(pod)
        return self

    def obj(self) -> Snapshot:
        return self.snap


CFG = OperatorConfig(trainer_command=("python", "-m", "copd_runtime.cli"), hub_address="pod-ip")
