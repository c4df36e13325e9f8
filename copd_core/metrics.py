"""Prometheus metrics: the names Grafana dashboards and alerts depend on.

Shared by `copd run --metrics-port` and the operator, so the two export the
same series. Pure bookkeeping on a `CollectorRegistry`; no torch, no Kubernetes.
Cardinality is bounded: per-run series carry (namespace, run[, branch|student,
teacher]) and are removed with `forget_run` when the run goes away.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PHASES = ("Pending", "RL", "OPD", "Diagnose", "Suspended", "Merging", "Succeeded", "Failed")


class CoPDMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.topk_overlap = Gauge("copd_topk_overlap", "Top-k token overlap of student with teacher, "
                                  "on states the student visits (latest cycle).",
                                  ["namespace", "run", "student", "teacher"], registry=r)
        self.symmetric_kl = Gauge("copd_symmetric_kl", "Exact symmetric KL (full vocabulary) between student "
                                  "and teacher next-token distributions, from the per-cycle Diagnose stage "
                                  "(latest cycle); not the per-OPD-step top-k-union bound.",
                                  ["namespace", "run", "student", "teacher"], registry=r)
        self.branch_reward = Gauge("copd_branch_reward", "Mean verifiable reward of a branch in its latest stage "
                                   "(while a stage runs on a cluster: of the step its trainer reported last).",
                                   ["namespace", "run", "branch"], registry=r)
        self.branch_step = Gauge("copd_branch_step", "Steps a branch has done in its current stage (on a cluster: "
                                 "live from its trainer's progress reports, else at the stage's end).",
                                 ["namespace", "run", "branch"], registry=r)
        self.run_cycle = Gauge("copd_run_cycle", "Current cycle of a run (1-based).", ["namespace", "run"],
                               registry=r)
        self.run_phase = Gauge("copd_run_phase", "1 for the run's current phase/stage, 0 otherwise.",
                               ["namespace", "run", "phase"], registry=r)
        self.merge_ready = Gauge("copd_merge_ready", "1 when the merge-readiness test holds.", ["namespace", "run"],
                                 registry=r)
        self.phase_transitions = Counter("copd_phase_transitions_total", "Phase/stage transitions, by the "
                                         "phase entered.", ["phase"], registry=r)
        self.runs_finished = Counter("copd_runs_finished_total", "Runs that ended, by result.", ["result"],
                                     registry=r)
        self.phase_duration = Histogram("copd_phase_duration_seconds", "Wall time of a phase/stage, by phase.",
                                        ["phase"], registry=r,
                                        buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400))
        self.reconcile_errors = Counter("copd_reconcile_errors_total", "Reconcile attempts that raised, by kind.",
                                        ["kind"], registry=r)
        # -- the operator's own load (bench/operator_scale.py; README "Running many runs")
        self.reconcile_duration = Histogram("copd_reconcile_duration_seconds", "Wall time of one reconcile of "
                                            "one run (gather, decide, writes).", registry=r,
                                            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.workqueue_depth = Gauge("copd_workqueue_depth", "Runs waiting in the work queue, by priority "
                                     "(event: a watch event or a requeue; resync: the periodic pass).",
                                     ["priority"], registry=r)
        self.workqueue_latency = Histogram("copd_workqueue_latency_seconds", "Time a run waited in the work "
                                           "queue before a worker took it, by priority.", ["priority"], registry=r,
                                           buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30,
                                                    60, 300))
        self.api_requests = Counter("copd_api_requests_total", "Requests the operator sent to the Kubernetes API, "
                                    "by verb and resource (watches counted when opened).", ["verb", "resource"],
                                    registry=r)
        self._series: dict[tuple[str, str], set[tuple]] = {}

    # -- per-run gauges ---------------------------------------------------------

    def _remember(self, ns: str, run: str, gauge: Gauge, labels: tuple) -> None:
        self._series.setdefault((ns, run), set()).add((gauge, labels))

    def set_status(self, ns: str, run: str, status: dict) -> None:
        """Mirror a run's status (the CR status / local status, camelCase) into the gauges."""
        self.run_cycle.labels(ns, run).set(status.get("cycle", 0))
        self._remember(ns, run, self.run_cycle, (ns, run))
        current = status.get("stage") if status.get("phase") == "Running" else status.get("phase", "Pending")
        for p in PHASES:
            self.run_phase.labels(ns, run, p).set(1.0 if p == current else 0.0)
            self._remember(ns, run, self.run_phase, (ns, run, p))
        self.merge_ready.labels(ns, run).set(1.0 if status.get("mergeReady") else 0.0)
        self._remember(ns, run, self.merge_ready, (ns, run))
        for d in status.get("diagnostics", []):
            lab = (ns, run, d["student"], d["teacher"])
            self.topk_overlap.labels(*lab).set(d["topkOverlap"])
            self.symmetric_kl.labels(*lab).set(d["symmetricKl"])
            self._remember(ns, run, self.topk_overlap, lab)
            self._remember(ns, run, self.symmetric_kl, lab)
        for name, b in status.get("branches", {}).items():
            if b.get("reward") is not None:
                self.set_reward(ns, run, name, b["reward"])

    def set_reward(self, ns: str, run: str, branch: str, reward: float) -> None:
        self.branch_reward.labels(ns, run, branch).set(reward)
        self._remember(ns, run, self.branch_reward, (ns, run, branch))

    def set_branch(self, ns: str, run: str, branch: str, status: dict) -> None:
        """Mirror one Branch object's status (camelCase: step, reward; the trainer's progress folded in)."""
        self.branch_step.labels(ns, run, branch).set(status.get("step", 0))
        self._remember(ns, run, self.branch_step, (ns, run, branch))
        if status.get("reward") is not None:
            self.set_reward(ns, run, branch, status["reward"])

    def set_direction(self, ns: str, run: str, student: str, teacher: str, overlap: float, skl: float) -> None:
        lab = (ns, run, student, teacher)
        self.topk_overlap.labels(*lab).set(overlap)
        self.symmetric_kl.labels(*lab).set(skl)
        self._remember(ns, run, self.topk_overlap, lab)
        self._remember(ns, run, self.symmetric_kl, lab)

    def forget_run(self, ns: str, run: str) -> None:
        for gauge, labels in self._series.pop((ns, run), set()):
            try:
                gauge.remove(*labels)
            except KeyError:
                pass

    # -- the operator's load ------------------------------------------------------

    def api_request(self, verb: str, resource: str) -> None:
        self.api_requests.labels(verb, resource).inc()

    def queue_depth(self, priority: str, depth: int) -> None:
        self.workqueue_depth.labels(priority).set(depth)

    def queue_latency(self, priority: str, seconds: float) -> None:
        self.workqueue_latency.labels(priority).observe(seconds)

    # -- events -----------------------------------------------------------------

    def transition(self, ended: str | None, started: str | None, duration_s: float | None) -> None:
        if started:
            self.phase_transitions.labels(started).inc()
        if ended and duration_s is not None:
            self.phase_duration.labels(ended).observe(duration_s)
        if started in ("Succeeded", "Failed"):
            self.runs_finished.labels(started).inc()
