"""`copd run`: the local executor of the cycle decision.

gather (from files in the output directory) → `cycle.decide` → act (run the
stage, the diagnose or the merge in this process) → repeat until the run is
Succeeded or Failed. Everything `gather` needs is on disk, so a run killed at
any moment and started again with the same output carries on from the last
complete checkpoint.

Output layout:
  status.json             the run status (same fields as the CR status)
  metrics.jsonl           one record per step
  branches/<b>/checkpoints/...
  diagnostics/cycle-NNN.json
  merged/                 the merged HF model directory
  summary.json, plots/*.png
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from copd_core.conditions import COND_MERGE_READY
from copd_core.consolidation import stage_work
from copd_core.cycle import (
    TERMINAL,
    BranchReport,
    DiagnoseReport,
    Event,
    MergeReport,
    Observed,
    Phase,
    RunBranchStage,
    RunDiagnose,
    RunMerge,
    RunStatus,
    Stage,
    StopWork,
    decide,
)
from copd_core.readiness import DirectionDiagnostic
from copd_core.spec import CoPDRunManifest
from copd_runtime.checkpoint import latest_checkpoint
from copd_runtime.hub import InProcessHub
from copd_runtime.local.plots import plot_run
from copd_runtime.model_uri import resolve_model_dir
from copd_runtime.models.device import placement
from copd_runtime.recipes.diagnose import diagnose
from copd_runtime.recipes.evaluate import evaluate_all
from copd_runtime.recipes.merge import merge_dirs
from copd_runtime.recipes.stage import branch_datasets, run_branch_stage


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def read_metrics(path: Path) -> list[dict]:
    """Step records, last write wins for a (branch, phase, cycle, step) replayed after a resume."""
    if not path.exists():
        return []
    recs: dict[tuple, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            recs[(r["branch"], r["phase"], r["cycle"], r["step"])] = r
    return sorted(recs.values(), key=lambda r: (r["cycle"], 0 if r["phase"] == "RL" else 1, r["step"], r["branch"]))


class LocalRun:
    def __init__(self, manifest: CoPDRunManifest, output: Path, on_event: Callable[[str], None] = print,
                 on_step: Callable[[dict], None] | None = None, metrics=None, checkpoint_every: int = 0):
        self.name = manifest.metadata.name
        self.namespace = manifest.metadata.namespace or "local"
        self.spec = manifest.spec
        self.out = Path(output).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.on_event, self.on_step, self.metrics = on_event, on_step, metrics
        self.checkpoint_every = checkpoint_every
        self._datasets = None
        self._rewards: dict[str, float] = {}
        self._storage_warnings: dict[str, str] = {}
        self.manifest = manifest
        self.placement = placement(self.spec.trainer.precision)

    # -- files ---------------------------------------------------------------

    @property
    def datasets(self):
        if self._datasets is None:
            self._datasets = branch_datasets(self.spec, self.out)
        return self._datasets

    def load_status(self) -> RunStatus:
        p = self.out / "status.json"
        return RunStatus.model_validate_json(p.read_text()) if p.exists() else RunStatus()

    def _diag_path(self, cycle: int) -> Path:
        return self.out / "diagnostics" / f"cycle-{cycle:03d}.json"

    def _sink(self, record: dict) -> None:
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.metrics:  # the same live series the operator exports from trainers' progress
            self.metrics.set_branch(self.namespace, self.name, record["branch"],
                                    {"step": record["step"], "reward": record.get("reward_mean")})
        if self.on_step:
            self.on_step(record)

    # -- gather --------------------------------------------------------------

    def gather(self, status: RunStatus) -> Observed:
        branches = {}
        if status.phase == Phase.RUNNING and status.stage in (Stage.RL, Stage.OPD):
            for b in self.spec.branches:
                ck = latest_checkpoint(self.out, b.name)
                if ck and (ck[0].cycle, ck[0].stage) == (status.cycle, status.stage.value):
                    branches[b.name] = BranchReport(status.cycle, status.stage, step=ck[0].step,
                                                    reward=self._rewards.get(b.name), done=ck[0].stage_done,
                                                    storage_warning=self._storage_warnings.get(b.name))
        diag = None
        p = self._diag_path(status.cycle)
        if status.cycle and p.exists():
            rows = json.loads(p.read_text())
            diag = DiagnoseReport(status.cycle, tuple(DirectionDiagnostic(**r) for r in rows))
        merge = None
        if (self.out / "merged" / "config.json").exists():
            merge = MergeReport(done=True, path=str(self.out / "merged"))
        return Observed(branches=branches, diagnose=diag, merge=merge)

    # -- act -----------------------------------------------------------------

    def act(self, status: RunStatus, actions: list) -> None:
        hub = None
        for a in actions:
            if isinstance(a, Event):
                self.on_event(f"[{a.type}] {a.reason}: {a.message}")
                if self.metrics:
                    self.metrics.transition(a.ended, a.started, a.duration_s)
            elif isinstance(a, RunBranchStage):
                if a.stage == Stage.OPD and hub is None:
                    hub = self._hub_for(a.cycle)
                work = stage_work(self.spec, status.consolidation, a.branch, a.stage.value)  # the cycle's plan
                rep = run_branch_stage(self.spec, self.out, a.branch, a.cycle, a.stage, hub=hub, sink=self._sink,
                                       run_name=self.name, checkpoint_every=self.checkpoint_every,
                                       datasets=self.datasets, steps=work.steps,
                                       teachers=work.teachers if a.stage == Stage.OPD else None)
                if rep.get("storage_warning"):
                    self._storage_warnings[a.branch] = rep["storage_warning"]
                if rep.get("reward") is not None:
                    self._rewards[a.branch] = rep["reward"]
                    if self.metrics:
                        self.metrics.set_reward(self.namespace, self.name, a.branch, rep["reward"])
            elif isinstance(a, RunDiagnose):
                self._diagnose(a.cycle)
            elif isinstance(a, RunMerge):
                self._merge()
            elif isinstance(a, StopWork):
                pass  # nothing runs in the background locally

    def _hub_for(self, cycle: int):
        from copd_runtime.recipes.stage import stage_start_model

        snapshots = {b.name: stage_start_model(self.spec, self.out, b.name, cycle, "OPD") for b in self.spec.branches}
        hub = InProcessHub(snapshots, self.spec.rl.temperature, self.spec.base_model.kind, self.placement)
        for name in snapshots:  # freeze now: peers' checkpoints move on while students train
            hub.teacher(name)
        return hub

    def final_model_dirs(self) -> dict[str, Path]:
        out = {}
        for b in self.spec.branches:
            ck = latest_checkpoint(self.out, b.name)
            out[b.name] = ck[1] if ck else resolve_model_dir(self.spec.base_model.uri, self.out)
        return out

    def _diagnose(self, cycle: int) -> None:
        rows = diagnose(self.spec, self.final_model_dirs(), self.datasets, cycle)
        self._diag_path(cycle).parent.mkdir(parents=True, exist_ok=True)
        _write_json(self._diag_path(cycle), [r.as_dict() for r in rows])
        for r in rows:
            mass = f", mass overlap {r.mass_overlap:.3f}" if r.mass_overlap is not None else ""
            self.on_event(f"  cycle {cycle} {r.student}<-{r.teacher}: top-k overlap {r.topk_overlap:.3f}, "
                          f"symmetric KL {r.symmetric_kl:.4f}{mass}")

    def _merge(self) -> None:
        from copd_runtime.model_uri import resolve_model_dir

        dirs = self.final_model_dirs()
        w = self.spec.merge_weights()
        names = list(dirs)
        merge_dirs([dirs[n] for n in names], [w[n] for n in names], self.out / "merged",
                   method=self.spec.merge.method, base_dir=resolve_model_dir(self.spec.base_model.uri, self.out),
                   scale=self.spec.merge.scale)

    # -- the loop ------------------------------------------------------------

    def run(self, max_iterations: int = 100_000) -> RunStatus:
        (self.out / "copdrun.json").write_text(self.manifest.model_dump_json(by_alias=True, indent=2))
        resolve_model_dir(self.spec.base_model.uri, self.out)  # build a builtin base once, up front
        status = self.load_status()
        for _ in range(max_iterations):
            observed = self.gather(status)
            status, actions = decide(self.spec, status, observed, datetime.now(UTC), generation=1)
            _write_json(self.out / "status.json", status.model_dump(by_alias=True, mode="json"))
            if self.metrics:
                self.metrics.set_status(self.namespace, self.name, status.to_k8s())
            if status.phase in TERMINAL:
                for a in actions:
                    if isinstance(a, Event):
                        self.act(status, [a])
                break
            self.act(status, actions)
        return status

    # -- summary -------------------------------------------------------------

    def summary(self, status: RunStatus) -> dict:
        from copd_runtime.models.policy import load_policy
        records = read_metrics(self.out / "metrics.jsonl")
        diags = []
        for p in sorted((self.out / "diagnostics").glob("cycle-*.json")):
            diags.extend(json.loads(p.read_text()))
        mnt = self.spec.rl.max_new_tokens
        branches = {}
        for name, d in self.final_model_dirs().items():
            rl = [r for r in records if r["branch"] == name and r["phase"] == "RL"]
            cycles = sorted({r["cycle"] for r in rl})
            first = [r["reward_mean"] for r in rl if cycles and r["cycle"] == cycles[0]]
            last = [r["reward_mean"] for r in rl if cycles and r["cycle"] == cycles[-1]]
            branches[name] = {
                "reward_first": sum(first) / len(first) if first else None,
                "reward_last": sum(last) / len(last) if last else None,
                "eval": evaluate_all(load_policy(d, self.spec.base_model.kind, self.placement), self.datasets, mnt),
            }
        cond = next((c for c in status.conditions if c.type == COND_MERGE_READY), None)
        merged = self.out / "merged"
        merge = {
            "ready": status.merge_ready,
            "reason": f"{cond.reason}: {cond.message}" if cond else "",
            "path": str(merged) if (merged / "config.json").exists() else None,
            "eval": (evaluate_all(load_policy(merged, self.spec.base_model.kind, self.placement), self.datasets, mnt)
                     if (merged / "config.json").exists() else {}),
        }
        completed = max((d["cycle"] for d in diags), default=0)
        summary = {
            "run": self.name,
            "phase": status.phase.value,
            "cycles_completed": completed,
            "branches": branches,
            "diagnostics": diags,
            "merge": merge,
            "plots": [str(p) for p in plot_run(records, diags, self.out / "plots")] if records else [],
        }
        _write_json(self.out / "summary.json", summary)
        return summary
