"""Observe the operator for real: the local Prometheus and Alertmanager (scripts/cluster.sh) watch a
CoPD run whose branches drift apart, until CoPDTopKOverlapCollapse fires and reaches Alertmanager.

    .venv/bin/python hack/cluster/prometheus/observe.py     (what scripts/observe-demo.sh runs)

Also imported by tests/cluster/test_observe_alerts.py. Everything here talks to real processes
through their HTTP APIs: the operator (`copd-operator --metrics-port`), Prometheus (/api/v1) and
Alertmanager (/api/v2).

The run is a KWOK run (pods on fake GPU nodes complete without running). A KWOK Stage installed
for the run's namespace only (`report_stage`) completes each of its stage Jobs' pods with a
termination message in the format `copd stage` / `copd diagnose` write, so the operator reads
them exactly as it reads a real trainer's: rewards that rise, and a diagnose report per cycle
whose top-k overlap falls (0.9 -> 0.6 -> 0.3) while the symmetric KL grows. What is scripted is
only what the trainers would have measured; the operator's status, its /metrics, the scrape, the
rules rendered from the chart and the delivery to Alertmanager are the real ones. A second run,
in a namespace whose ResourceQuota allows no Jobs, makes the operator's Job creates fail (HTTP 403),
a real reconcile error: the dashboard's "Reconcile errors" panel has something to show.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[3]
PY = str(ROOT / ".venv/bin/python") if (ROOT / ".venv/bin/python").exists() else sys.executable
DASHBOARD = ROOT / "helm/copd-operator/dashboards/copd-operator.json"
ALERT = "CoPDTopKOverlapCollapse"
SCRAPE_INTERVAL_S = 1.0  # hack/cluster/prometheus/prometheus.yml

KWOK_TOLERATION = {"key": "kwok.x-k8s.io/node", "operator": "Exists", "effect": "NoSchedule"}
GPU_NODE_SELECTOR = {"nvidia.com/gpu.present": "true"}

# What the scripted trainers "measure", per cycle: (student, teacher, top-k overlap, symmetric KL)
# and the mean reward of each branch's RL and OPD stage. The overlap falls below the chart's
# default overlapMin (0.5) in cycle 3; the KL passes its default symmetricKlMax (5) there too.
BRANCHES = ("arith", "reverse")
DIRECTIONS = {
    1: [("arith", "reverse", 0.91, 0.31), ("reverse", "arith", 0.89, 0.36)],
    2: [("arith", "reverse", 0.62, 1.9), ("reverse", "arith", 0.57, 2.3)],
    3: [("arith", "reverse", 0.31, 6.2), ("reverse", "arith", 0.24, 7.4)],
}
REWARDS = {"arith": {1: 0.22, 2: 0.41, 3: 0.63}, "reverse": {1: 0.15, 2: 0.34, 3: 0.52}}


def log(msg: str) -> None:
    print(f"[observe {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def wait_for(fn, timeout: float, what: str, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cluster_env() -> dict:
    """os.environ plus .cluster/env (KUBECONFIG, PATH with kubectl, the monitoring URLs)."""
    cdir = Path(os.environ.get("COPD_CLUSTER_DIR", ROOT / ".cluster"))
    out = subprocess.run(["bash", "-c", f"set -a; source '{cdir}/env'; env -0"], capture_output=True, check=True)
    return dict(kv.split("=", 1) for kv in out.stdout.decode().split("\0") if "=" in kv)


def _http_json(url: str, timeout: float = 5.0):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return json.loads(r.read().decode())
    except urllib.error.HTTPError as e:  # Prometheus says why (a bad query: 400 with an error field)
        raise RuntimeError(f"GET {url}: {e.code} {e.read().decode(errors='replace')[:500]}") from None


# ---------------------------------------------------------------------------
# Prometheus and Alertmanager


@dataclass
class Monitoring:
    prometheus: str  # http://127.0.0.1:29090
    alertmanager: str  # http://127.0.0.1:29093
    targets: Path  # .cluster/prometheus/targets

    @classmethod
    def from_env(cls, env: dict) -> Monitoring:
        return cls(env["COPD_PROMETHEUS_URL"], env["COPD_ALERTMANAGER_URL"], Path(env["COPD_PROMETHEUS_TARGETS"]))

    # -- scrape targets (file_sd: Prometheus picks a file up within seconds)

    def add_target(self, job: str, name: str, addr: str) -> Path:
        d = self.targets / job
        d.mkdir(parents=True, exist_ok=True)
        f = d / f"{name}.json"
        tmp = f.with_suffix(".tmp")
        tmp.write_text(json.dumps([{"targets": [addr]}]))
        tmp.rename(f)
        return f

    def remove_target(self, job: str, name: str) -> None:
        (self.targets / job / f"{name}.json").unlink(missing_ok=True)

    def target_health(self, addr: str) -> str | None:
        """"up"/"down"/"unknown" of the active target scraping addr, None while Prometheus has none."""
        d = _http_json(f"{self.prometheus}/api/v1/targets?state=active")["data"]
        for t in d["activeTargets"]:
            if t["labels"].get("instance") == addr:
                return t["health"]
        return None

    # -- PromQL

    def _api(self, path: str, **params) -> dict:
        d = _http_json(f"{self.prometheus}/api/v1/{path}?{urllib.parse.urlencode(params)}", timeout=30)
        if d.get("status") != "success":
            raise RuntimeError(f"Prometheus {path} {params}: {d}")
        return d["data"]

    def query(self, expr: str) -> list[dict]:
        return self._api("query", query=expr)["result"]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict]:
        return self._api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=f"{step:g}")["result"]

    def rules_loaded(self) -> set[str]:
        return {r["name"] for g in self._api("rules", type="alert")["groups"] for r in g["rules"]}

    # -- alerts

    def prometheus_alerts(self, name: str, **labels) -> list[dict]:
        """Alerts of Prometheus (pending and firing) named `name` whose labels include `labels`."""
        return [a for a in self._api("alerts")["alerts"] if a["labels"].get("alertname") == name
                and all(a["labels"].get(k) == v for k, v in labels.items())]

    def firing(self, name: str, **labels) -> list[dict]:
        return [a for a in self.prometheus_alerts(name, **labels) if a["state"] == "firing"]

    def alertmanager_alerts(self, name: str, **labels) -> list[dict]:
        """Active alerts Alertmanager holds (received from Prometheus), as its API v2 returns them."""
        flt = [f'alertname="{name}"', *(f'{k}="{v}"' for k, v in labels.items())]
        q = urllib.parse.urlencode([("filter", f) for f in flt] + [("active", "true")])
        return _http_json(f"{self.alertmanager}/api/v2/alerts?{q}")


# ---------------------------------------------------------------------------
# the operator, as a local process (what tests/cluster/support.py's Operator does)


@dataclass
class OperatorProcess:
    env: dict
    namespaces: list[str]
    log_path: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> OperatorProcess:
        args = [PY, "-m", "copd_operator.main", "--metrics-port", str(self.port), "--resync-seconds", "2"]
        for ns in self.namespaces:
            args += ["--namespace", ns]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as f:
            self.proc = subprocess.Popen(args, cwd=ROOT, env=self.env, stdout=f, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        wait_for(self.metrics, 60, "operator /metrics")
        return self

    def metrics(self) -> str | None:
        try:
            with urllib.request.urlopen(f"http://{self.addr}/metrics", timeout=2) as r:
                return r.read().decode()
        except OSError:
            return None

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)

    def tail(self, n: int = 40) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


# ---------------------------------------------------------------------------
# the diverging run


def kubectl(env: dict, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(["kubectl", *args], env=env, input=input, capture_output=True, text=True, timeout=120)
    if check and p.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def diverging_run(name: str, cycles: int = 3) -> dict:
    """A two-branch CoPDRun on the KWOK GPU nodes, merged (with a warning) when not aligned at the end."""
    doc = yaml.safe_load((ROOT / "examples/copdrun.yaml").read_text())
    s = doc["spec"]
    doc["metadata"] = {"name": name}
    s["branches"] = [b for b in s["branches"] if b["name"] in BRANCHES]
    s["schedule"] = {"cycles": cycles, "rlStepsPerCycle": 3, "opdStepsPerCycle": 2}
    s["mergeReadiness"]["minCycles"] = cycles  # no early merge: every cycle runs
    s["merge"] = {"method": "linear", "whenNotReady": "merge"}
    s["trainer"] = {"resources": {"gpu": 1, "cpu": "2", "memory": "4Gi"}, "nodeSelector": GPU_NODE_SELECTOR,
                    "tolerations": [KWOK_TOLERATION]}
    return doc


def report_key(component: str, branch: str = "", cycle: object = "", stage: str = "") -> str:
    """How the Stage's template finds a pod's report: from the labels the operator puts on every pod."""
    return f"{component}/{branch}/{cycle}/{stage}"


def reports(cycles: int = 3) -> dict[str, dict]:
    """The JSON report each stage pod of the run ends with, as `copd stage|diagnose` print them,
    by report_key of the pod's labels (copd.io/component, branch, cycle, stage)."""
    sched = diverging_run("x", cycles)["spec"]["schedule"]
    out = {}
    for c in range(1, cycles + 1):
        for b in BRANCHES:
            for stage, steps in (("RL", sched["rlStepsPerCycle"]), ("OPD", sched["opdStepsPerCycle"])):
                reward = REWARDS[b][c] if stage == "RL" else round(REWARDS[b][c] * 0.9, 3)
                out[report_key("trainer", b, c, stage)] = {"branch": b, "cycle": c, "stage": stage, "step": steps,
                                                           "done": True, "reward": reward, "message": ""}
        rows = [[s, t, o, k] for s, t, o, k in DIRECTIONS[c]]
        out[report_key("diagnose", cycle=c)] = {"cycle": c, "directions": rows, "total": len(rows)}
    return out


def report_stage(namespace: str, cycles: int = 3) -> dict:
    """A KWOK Stage that completes the Job pods of `namespace` with their reports as termination
    messages. Weight 1 beats the cluster's pod-complete Stage (weight 0) for these pods only."""
    pairs = " ".join(f'"{key}" `{json.dumps(rep, separators=(",", ":"))}`' for key, rep in reports(cycles).items())
    label = ' | default "") ('.join(f'index $l "copd.io/{k}"' for k in ("component", "branch", "cycle", "stage"))
    template = (
        "{{ $now := Now }}\n"
        f"{{{{ $reports := dict {pairs} }}}}\n"
        "{{ $l := .metadata.labels }}\n"
        f'{{{{ $key := printf "%s/%s/%s/%s" ({label} | default "") }}}}\n'
        "{{ $msg := get $reports $key }}\n"
        "conditions:\n"
        "- lastTransitionTime: {{ $now | Quote }}\n  status: \"False\"\n  reason: PodCompleted\n  type: Ready\n"
        "- lastTransitionTime: {{ $now | Quote }}\n  status: \"False\"\n  reason: PodCompleted\n"
        "  type: ContainersReady\n"
        "containerStatuses:\n"
        "{{ range .spec.containers }}\n"
        "- image: {{ .image | Quote }}\n  name: {{ .name | Quote }}\n  ready: false\n  restartCount: 0\n"
        "  started: false\n  state:\n    terminated:\n      exitCode: 0\n      finishedAt: {{ $now | Quote }}\n"
        "      reason: Completed\n      message: {{ $msg | Quote }}\n      startedAt: {{ $now | Quote }}\n"
        "{{ end }}\n"
        "phase: Succeeded\n"
    )
    return {
        "apiVersion": "kwok.x-k8s.io/v1alpha1", "kind": "Stage",
        "metadata": {"name": stage_name(namespace)},
        "spec": {
            "resourceRef": {"apiGroup": "v1", "kind": "Pod"},
            "weight": 1,
            "selector": {"matchExpressions": [
                {"key": ".metadata.namespace", "operator": "In", "values": [namespace]},
                {"key": ".metadata.deletionTimestamp", "operator": "DoesNotExist"},
                {"key": ".status.phase", "operator": "In", "values": ["Running"]},
                {"key": ".metadata.ownerReferences.[].kind", "operator": "In", "values": ["Job"]},
            ]},
            "delay": {"durationMilliseconds": 1500},
            "next": {"statusTemplate": template},
        },
    }


def stage_name(namespace: str) -> str:
    return f"copd-observe-{namespace}"[:63].rstrip("-")


def quota_blocked_namespace(env: dict, namespace: str) -> None:
    """A namespace whose ResourceQuota allows no Jobs: a run there makes the operator's Job creates fail."""
    kubectl(env, "create", "namespace", namespace)
    kubectl(env, "apply", "-n", namespace, "-f", "-", input=yaml.safe_dump({
        "apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "no-jobs"},
        "spec": {"hard": {"count/jobs.batch": "0"}}}))


# ---------------------------------------------------------------------------
# the dashboard's queries against Prometheus


def _panels(d):
    for p in d["panels"]:
        yield p
        yield from p.get("panels", [])


def dashboard_queries(path: Path = DASHBOARD) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every panel query of the Grafana dashboard."""
    d = json.loads(path.read_text())
    return [(p["title"], t["expr"]) for p in _panels(d) for t in p.get("targets", []) if t.get("expr")]


def interpolate(expr: str, variables: dict[str, str]) -> str:
    for k in sorted(variables, key=len, reverse=True):
        expr = expr.replace(k, variables[k])
    if "$" in expr:
        raise ValueError(f"uninterpolated variable in {expr}")
    return expr


def evaluate_dashboard(mon: Monitoring, namespace: str, run: str, start: float, end: float,
                       step: float = 1.0) -> list[dict]:
    """Every panel query as Grafana would send it for this namespace and run over [start, end]
    (a range query; Grafana's $__interval = step, $__rate_interval = max(step + scrape, 4 x scrape),
    $__range = the window). A query has data when some series has a value that is not NaN."""
    variables = {"$namespace": namespace, "$run": run, "$__interval": f"{step:g}s",
                 "$__rate_interval": f"{max(step + SCRAPE_INTERVAL_S, 4 * SCRAPE_INTERVAL_S):g}s",
                 "$__range": f"{math.ceil(end - start)}s"}
    out = []
    for title, expr in dashboard_queries():
        q = interpolate(expr, variables)
        series = mon.query_range(q, start, end, step)
        values = [float(v) for s in series for _, v in s["values"]]
        finite = [v for v in values if not math.isnan(v)]
        out.append({"panel": title, "query": q, "series": len(series), "has_data": bool(finite),
                    "last": finite[-1] if finite else None})
    return out


# ---------------------------------------------------------------------------
# the scenario (the demo, and the test)


@dataclass
class Outcome:
    fired_after_s: float
    received_by_alertmanager: bool
    panels: list[dict]
    alertmanager_alert: dict
    run_status: dict

    def line(self) -> dict:
        return {"alert": ALERT, "fired_after_s": self.fired_after_s,
                "received_by_alertmanager": self.received_by_alertmanager,
                "dashboard_queries": len(self.panels),
                "dashboard_queries_with_data": sum(p["has_data"] for p in self.panels)}


def run_collapse_scenario(env: dict, namespace: str, log_dir: Path, timeout_s: float = 240) -> Outcome:
    """In `namespace` (it must exist): the operator, scraped by the local Prometheus; the diverging KWOK run;
    a quota-blocked run beside it. Waits until the run ended, ALERT fires in Prometheus for this run and
    Alertmanager holds it; then evaluates every dashboard query over the run. Cleans up what it made
    except `namespace` itself."""
    mon = Monitoring.from_env(env)
    missing = {ALERT, "CoPDOperatorDown", "CoPDReconcileErrors"} - mon.rules_loaded()
    if missing:
        raise RuntimeError(f"the local Prometheus has no rules {missing}: run scripts/cluster.sh up")
    run = "diverging"
    blocked_ns = f"{namespace}-quota"[:63]
    kubectl(env, "apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    # a CRD just created has no status.conditions yet and `kubectl wait` fails at once then: poll it
    wait_for(lambda: kubectl(env, "wait", "--for", "condition=Established", "--timeout", "5s",
                             "crd/copdruns.copd.io", "crd/branches.copd.io", check=False).returncode == 0,
             60, "the CoPD CRDs established", interval=0.5)
    quota_blocked_namespace(env, blocked_ns)
    op = OperatorProcess(env, [namespace, blocked_ns], log_dir / f"operator-{namespace}.log")
    stage = report_stage(namespace)
    try:
        kubectl(env, "apply", "-f", "-", input=yaml.safe_dump(stage))
        op.start()
        mon.add_target("operator", namespace, op.addr)
        wait_for(lambda: mon.target_health(op.addr) == "up", 60, f"Prometheus scraping the operator at {op.addr}")
        log(f"operator {op.addr} scraped; applying the diverging run {namespace}/{run}")
        t0 = time.time()
        kubectl(env, "apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(diverging_run(run)))
        kubectl(env, "apply", "-n", blocked_ns, "-f", "-", input=yaml.safe_dump(diverging_run("blocked")))

        def status() -> dict:
            p = kubectl(env, "get", "copdrun", run, "-n", namespace, "-o", "json", check=False)
            return (json.loads(p.stdout).get("status") or {}) if p.returncode == 0 else {}

        deadline = time.monotonic() + timeout_s
        fired_at = None
        last = None
        while True:
            st = status()
            now = (st.get("cycle"), st.get("stage") or st.get("phase"), st.get("minTopkOverlap"))
            if now != last:
                log(f"run: cycle {now[0]} {now[1]}, min top-k overlap {now[2]}")
                last = now
            if fired_at is None and mon.firing(ALERT, namespace=namespace, run=run):
                fired_at = time.time()
                log(f"{ALERT} firing in Prometheus after {fired_at - t0:.1f}s")
            if fired_at is not None and st.get("phase") in ("Succeeded", "Failed"):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"after {timeout_s:.0f}s: run {st.get('phase')}, {ALERT} firing: "
                                   f"{fired_at is not None}\n{op.tail()}")
            time.sleep(0.25)
        am = wait_for(lambda: mon.alertmanager_alerts(ALERT, namespace=namespace, run=run), 60,
                      f"{ALERT} in Alertmanager")
        log(f"Alertmanager holds {len(am)} {ALERT} alert(s) for {namespace}/{run}")
        # a few more scrapes after the end, so counters created by the last transitions have two samples
        wait_for(lambda: mon.query(f'count_over_time(copd_runs_finished_total{{instance="{op.addr}"}}[5m]) >= 3'),
                 30, "the run's end scraped")
        panels = evaluate_dashboard(mon, namespace, run, t0 - 5, time.time())
        for p in panels:
            log(f"  {'data' if p['has_data'] else 'NO DATA'}  {p['panel']}: {p['series']} series, last {p['last']}")
        return Outcome(fired_after_s=round(fired_at - t0, 1), received_by_alertmanager=bool(am), panels=panels,
                       alertmanager_alert=am[0], run_status=status())
    finally:
        op.stop()
        mon.remove_target("operator", namespace)
        kubectl(env, "delete", "stage", stage["metadata"]["name"], "--ignore-not-found", check=False)
        kubectl(env, "delete", "namespace", blocked_ns, "--wait=false", "--ignore-not-found", check=False)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--timeout", type=float, default=180, help="seconds to wait for the run and the alert")
    p.add_argument("--payload", type=Path, help="also write the alert as Alertmanager returns it to this file")
    a = p.parse_args(argv)
    env = cluster_env()
    ns = f"copd-observe-{uuid.uuid4().hex[:6]}"
    kubectl(env, "create", "namespace", ns)
    log_dir = Path(env.get("COPD_CLUSTER_DIR", ROOT / ".cluster")) / "logs"
    try:
        out = run_collapse_scenario(env, ns, log_dir, timeout_s=a.timeout)
    finally:
        kubectl(env, "delete", "namespace", ns, "--wait=false", "--ignore-not-found", check=False)
    if a.payload:
        a.payload.write_text(json.dumps(out.alertmanager_alert, indent=2) + "\n")
    log("alert as Alertmanager holds it:\n" + json.dumps(out.alertmanager_alert, indent=2))
    line = out.line()
    print(json.dumps(line), flush=True)
    ok = line["received_by_alertmanager"] and line["dashboard_queries_with_data"] == line["dashboard_queries"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
