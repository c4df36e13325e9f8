"""Fleet scale of the operator: N CoPDRuns applied at once to the local KWOK cluster, one operator process.

    .venv/bin/python -m bench.operator_scale --runs 100      (make scale: --runs 1000)

Each run is examples/copdrun.yaml with three branches and 2 cycles (RL, OPD, Diagnose per cycle, then
the merge: 3x2x2 stage Jobs + 2 diagnose + 1 merge = 15 Jobs, 2 hub pods). KWOK plays the GPU nodes:
a pod owned by a Job completes ~1 s after it starts (hack/cluster/kwok/stages.yaml, empty report:
"done, nothing measured"). The bench adds fake GPU nodes until every run's three trainers and hub fit
at once (32 GPUs each, label type=kwok so the KWOK controller manages them), starts the control plane
if it is down (scripts/cluster.sh up), and runs one operator process (`python -m copd_operator.main`)
in a fresh namespace with --finished-job-ttl-seconds 0 (finished Jobs go as soon as their reports
are in the run's status). Every run uses one shared, pre-made claim (spec.storage.claimName): the
claim provisioner of the test cluster (a Python process) is not what is measured.

What it measures, from its own watches of the namespace (monotonic clock of this process):
  apply_to_first_pod   run created -> first pod of the run seen
  phase_transition     last Job of a (cycle, stage) seen finished -> first Job of the next one seen
  wall_s               first create -> last run Succeeded/Failed
  operator_rss_mb      the operator process's peak resident set (VmHWM)
  operator_cpu_s       its user+system CPU time
  api_requests_per_run copd_api_requests_total (the operator's /metrics) / runs
Progress goes to stderr; the last line on stdout is one JSON object with those figures.

A run cut short (--timeout, SIGTERM or Ctrl-C, the operator exiting) still prints it, with what was
measured until then and, added, "partial": true, "stopped_by", "jobs_done"/"jobs_expected" and
"transitions_measured"/"transitions_expected" (per run 3 per cycle: RL -> OPD -> Diagnose -> next);
api_requests_per_run is then the requests so far over all N runs. Exit status 1.

The control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler, KWOK) runs on the
same machine as the operator and this bench: on a small machine the figures are the whole system's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
KWOK_TOLERATION = {"key": "kwok.x-k8s.io/node", "operator": "Exists", "effect": "NoSchedule"}
GPU_NODE_SELECTOR = {"nvidia.com/gpu.present": "true"}
GPUS_PER_NODE = 32
STAGE_ORDER = {"RL": 0, "OPD": 1}


def log(msg: str) -> None:
    print(f"[scale {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    k = max(0, min(len(xs) - 1, math.ceil(q / 100 * len(xs)) - 1))
    return round(xs[k], 3)


# -- the cluster ---------------------------------------------------------------------------------


def cluster_env() -> dict:
    """scripts/cluster.sh up (idempotent) and the environment its .cluster/env describes."""
    p = subprocess.run(["bash", str(ROOT / "scripts/cluster.sh"), "up"], cwd=ROOT, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"scripts/cluster.sh up failed:\n{p.stderr[-4000:]}")
    cdir = Path(os.environ.get("COPD_CLUSTER_DIR", ROOT / ".cluster"))
    env = dict(os.environ)
    for line in (cdir / "env").read_text().splitlines():
        m = re.match(r'export (\w+)="?(.*?)"?$', line.strip())
        if m:
            env[m.group(1)] = os.path.expandvars(m.group(2).replace("$PATH", env.get("PATH", "")))
    return env


def kubectl(env: dict, *args: str, input: str | None = None, check: bool = True) -> str:
    p = subprocess.run(["kubectl", *args], env=env, input=input, capture_output=True, text=True, timeout=600)
    if check and p.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args[:3])}: {p.stderr[-2000:]}")
    return p.stdout


def node_yaml(name: str) -> dict:
    res = {"cpu": "512", "memory": "4Ti", "pods": "256", "nvidia.com/gpu": str(GPUS_PER_NODE),
           "ephemeral-storage": "10Ti"}
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
                         "labels": {"type": "kwok", "copd.io/bench": "operator-scale", "kubernetes.io/hostname": name,
                                    "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
                                    "nvidia.com/gpu.present": "true"}},
            "spec": {"taints": [{"key": "kwok.x-k8s.io/node", "value": "fake", "effect": "NoSchedule"}]},
            "status": {"allocatable": res, "capacity": res,
                       "nodeInfo": {"architecture": "amd64", "operatingSystem": "linux", "kubeletVersion": "fake"}}}


def run_doc(name: str, claim: str, cycles: int) -> dict:
    doc = yaml.safe_load((ROOT / "examples/copdrun.yaml").read_text())
    doc["metadata"] = {"name": name}
    spec = doc["spec"]
    spec["schedule"]["cycles"] = cycles
    spec["mergeReadiness"]["minCycles"] = cycles
    spec["storage"] = {"path": "/copd", "claimName": claim}
    tr = spec.setdefault("trainer", {})
    tr.pop("priorityClassName", None)
    tr["tolerations"] = [KWOK_TOLERATION]
    tr["nodeSelector"] = GPU_NODE_SELECTOR
    return doc


# -- watching the namespace ----------------------------------------------------------------------


class Recorder:
    """Watches of the bench's namespace (pods, Jobs, runs); first-seen times on this process's clock."""

    def __init__(self, api_client, ns: str):
        from kubernetes import client

        self.ns, self.stop = ns, threading.Event()
        self.core, self.batch = client.CoreV1Api(api_client), client.BatchV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self.lock = threading.Lock()
        self.first_pod: dict[str, float] = {}
        self.job_created: dict[str, tuple[str, tuple, float]] = {}  # job -> (run, group, t)
        self.job_done: dict[str, float] = {}
        self.phase: dict[str, str] = {}
        self.done_at: dict[str, float] = {}

    def start(self) -> Recorder:
        for name, call in (
            ("pods", lambda **kw: self.core.list_namespaced_pod(self.ns, **kw)),
            ("jobs", lambda **kw: self.batch.list_namespaced_job(self.ns, **kw)),
            ("runs", lambda **kw: self.custom.list_namespaced_custom_object("copd.io", "v1alpha1", self.ns,
                                                                            "copdruns", **kw)),
        ):
            threading.Thread(target=self._loop, args=(name, call), daemon=True).start()
        return self

    def _loop(self, what: str, call) -> None:
        from kubernetes.watch.watch import iter_resp_lines

        rv = None
        while not self.stop.is_set():
            try:
                if rv is None:
                    body = json.loads(call(_preload_content=False).data)
                    for o in body["items"]:
                        self._see(what, "ADDED", o)
                    rv = body["metadata"]["resourceVersion"]
                resp = call(watch=True, resource_version=rv, allow_watch_bookmarks=True, timeout_seconds=120,
                            _preload_content=False, _request_timeout=(10, 150))
                for line in iter_resp_lines(resp):
                    ev = json.loads(line)
                    o = ev["object"]
                    if ev["type"] == "ERROR":
                        rv = None
                        break
                    rv = o["metadata"].get("resourceVersion", rv)
                    if ev["type"] != "BOOKMARK":
                        self._see(what, ev["type"], o)
            except Exception as e:  # noqa: BLE001 - a watch hiccup: relist
                log(f"watch {what}: {e}")
                rv = None
                time.sleep(0.5)

    def _see(self, what: str, typ: str, o: dict) -> None:
        now = time.monotonic()
        md = o["metadata"]
        lab = md.get("labels") or {}
        with self.lock:
            if what == "pods":
                run = lab.get("copd.io/run")
                if run and run not in self.first_pod:
                    self.first_pod[run] = now
            elif what == "jobs":
                run = lab.get("copd.io/run")
                if not run:
                    return
                name = md["name"]
                if name not in self.job_created:
                    comp = lab.get("copd.io/component")
                    if comp == "merge":
                        group = (10**6, 3)
                    else:
                        group = (int(lab.get("copd.io/cycle", 0)),
                                 2 if comp == "diagnose" else STAGE_ORDER.get(lab.get("copd.io/stage"), 9))
                    self.job_created[name] = (run, group, now)
                st = o.get("status") or {}
                finished = st.get("succeeded", 0) > 0 or any(
                    c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
                    for c in st.get("conditions") or [])
                if finished and name not in self.job_done:
                    self.job_done[name] = now
            else:
                phase = (o.get("status") or {}).get("phase") or "Pending"
                self.phase[md["name"]] = phase
                if phase in ("Succeeded", "Failed") and md["name"] not in self.done_at:
                    self.done_at[md["name"]] = now

    def transitions(self) -> list[float]:
        """Per run: last Job of a group finished -> first Job of the next group created."""
        with self.lock:
            groups: dict[str, dict[tuple, list[str]]] = defaultdict(lambda: defaultdict(list))
            for job, (run, group, _t) in self.job_created.items():
                groups[run][group].append(job)
            gaps = []
            for _run, g in groups.items():
                keys = sorted(g)
                for a, b in zip(keys, keys[1:], strict=False):
                    if not all(j in self.job_done for j in g[a]):
                        continue
                    done = max(self.job_done[j] for j in g[a])
                    nxt = min(self.job_created[j][2] for j in g[b])
                    gaps.append(max(0.0, nxt - done))
            return gaps


# -- the operator --------------------------------------------------------------------------------


def proc_figures(pid: int) -> tuple[float, float]:
    """(peak RSS MB, CPU seconds) of a live process."""
    hwm = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            hwm = int(line.split()[1]) / 1024
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return hwm, (int(fields[11]) + int(fields[12])) / tick


CONTROL_PLANE = ("kube-apiserver", "etcd", "kube-controller-manager", "kube-scheduler", "kwok")


def control_plane_cpu(env: dict) -> dict[str, float]:
    """CPU seconds used so far by each control-plane process of scripts/cluster.sh (its PID files)."""
    out = {}
    for c in CONTROL_PLANE:
        try:
            pid = int(Path(env["COPD_CLUSTER_DIR"], "pids", f"{c}.pid").read_text().strip())
            out[c] = proc_figures(pid)[1]
        except (KeyError, OSError, ValueError):
            pass
    return out


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def api_requests(text: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("copd_api_requests_total{"))


def hist_quantile(text: str, name: str, q: float, **labels: str) -> float | None:
    """The q-quantile of a Prometheus histogram from /metrics text (upper bound of the bucket that holds it)."""
    buckets = []
    for line in text.splitlines():
        if not line.startswith(name + "_bucket{"):
            continue
        lab = dict(re.findall(r'(\w+)="([^"]*)"', line.split("{", 1)[1].split("}", 1)[0]))
        if any(lab.get(k) != v for k, v in labels.items()):
            continue
        buckets.append((float("inf") if lab["le"] == "+Inf" else float(lab["le"]), float(line.rsplit(" ", 1)[1])))
    buckets.sort()
    if not buckets or buckets[-1][1] == 0:
        return None
    total = buckets[-1][1]
    return next(le for le, n in buckets if n >= q * total)


class Stopped(Exception):
    """SIGTERM/SIGINT: stop waiting, report what was measured, clean up."""


def _stop(signum, _frame) -> None:
    raise Stopped(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.operator_scale", description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=100)
    p.add_argument("--cycles", type=int, default=2)
    p.add_argument("--workers", type=int, default=16, help="The operator's --workers.")
    p.add_argument("--qps", type=float, default=200.0, help="The operator's --qps.")
    p.add_argument("--burst", type=int, default=400, help="The operator's --burst.")
    p.add_argument("--timeout", type=float, default=None, help="Seconds to wait for every run (default 300 + 3*runs).")
    p.add_argument("--keep", action="store_true", help="Leave the namespace, the nodes and the operator log.")
    a = p.parse_args(argv)
    timeout = a.timeout if a.timeout is not None else 300 + 3 * a.runs
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)

    env = cluster_env()
    os.environ["KUBECONFIG"] = env["KUBECONFIG"]
    from kubernetes import client, config

    config.load_kube_config(env["KUBECONFIG"])
    conf = client.Configuration.get_default_copy()
    conf.connection_pool_maxsize = 32
    api_client = client.ApiClient(conf)
    custom = client.CustomObjectsApi(api_client)

    kubectl(env, "apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    kubectl(env, "wait", "--for", "condition=Established", "--timeout", "60s", "crd/copdruns.copd.io",
            "crd/branches.copd.io")
    ns = f"scale-{uuid.uuid4().hex[:6]}"
    kubectl(env, "create", "namespace", ns)
    nodes = math.ceil(4 * a.runs / GPUS_PER_NODE)
    node_names = [f"kwok-scale-{i}" for i in range(nodes)]
    kubectl(env, "apply", "--server-side", "--force-conflicts", "-f", "-",
            input="\n---\n".join(yaml.safe_dump(node_yaml(n)) for n in node_names))
    kubectl(env, "wait", "--for", "condition=Ready", "--timeout", "300s", *[f"node/{n}" for n in node_names])
    claim = "scale-shared"
    kubectl(env, "apply", "-n", ns, "-f", "-", input=yaml.safe_dump({
        "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": claim},
        "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}}}))
    try:
        cm = Path(env["COPD_CLUSTER_DIR"], "pids", "kube-controller-manager.pid").read_text().strip()
        argv_cm = Path(f"/proc/{cm}/cmdline").read_text().split("\0")
        def flag(name: str, default: str) -> str:
            return argv_cm[argv_cm.index(name) + 1] if name in argv_cm else f"{default} (default)"

        log(f"kube-controller-manager --kube-api-qps {flag('--kube-api-qps', '20')} (COPD_CM_API_QPS) "
            f"--concurrent-job-syncs {flag('--concurrent-job-syncs', '5')} (COPD_CM_JOB_SYNCS): "
            "its Job controller makes the pods")
    except (KeyError, OSError, ValueError):
        pass
    log(f"namespace {ns}, {nodes} fake GPU nodes of {GPUS_PER_NODE} GPUs, {a.runs} runs x {a.cycles} cycles")

    port = free_port()
    oplog = Path(os.environ.get("TMPDIR", "/tmp")) / f"operator-scale-{ns}.log"
    with open(oplog, "w") as f:
        op = subprocess.Popen(
            [PY, "-m", "copd_operator.main", "--namespace", ns, "--metrics-port", str(port),
             "--workers", str(a.workers), "--qps", str(a.qps), "--burst", str(a.burst),
             "--finished-job-ttl-seconds", "0"],
            cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    rec = None
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                scrape(port)
                break
            except OSError:
                if time.monotonic() > deadline or op.poll() is not None:
                    raise RuntimeError(f"operator did not start; see {oplog}") from None
                time.sleep(0.2)
        rec = Recorder(api_client, ns).start()
        time.sleep(1.0)  # the watches have listed

        applied: dict[str, float] = {}

        def create(i: int) -> None:
            name = f"r{i:05d}"
            custom.create_namespaced_custom_object("copd.io", "v1alpha1", ns, "copdruns",
                                                   run_doc(name, claim, a.cycles))
            applied[name] = time.monotonic()

        cp0 = control_plane_cpu(env)
        t0 = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(create, range(a.runs)))
        log(f"applied {a.runs} runs in {time.monotonic() - t0:.1f}s")

        branches = len(run_doc("x", claim, a.cycles)["spec"]["branches"])
        jobs_expected = a.runs * (a.cycles * (2 * branches + 1) + 1)  # RL + OPD per branch, diagnose; merge
        last, stopped_by = 0.0, None
        try:
            while True:
                with rec.lock:
                    done, jobs_done = len(rec.done_at), len(rec.job_done)
                    phases = defaultdict(int)
                    for ph in rec.phase.values():
                        phases[ph] += 1
                now = time.monotonic()
                if done >= a.runs:
                    break
                if now - t0 > timeout or op.poll() is not None:
                    stopped_by = "timeout" if op.poll() is None else "operator exited"
                    break
                if now - last > 15:
                    last = now
                    log(f"t={now - t0:.0f}s done {done}/{a.runs} phases {dict(phases)} jobs seen "
                        f"{len(rec.job_created)}, finished {jobs_done}/{jobs_expected}; pods' runs {len(rec.first_pod)}")
                time.sleep(1.0)
        except Stopped as e:
            stopped_by = str(e)
        stopped_after = time.monotonic() - t0
        end = max(rec.done_at.values()) if rec.done_at else time.monotonic()
        text = scrape(port) if op.poll() is None else ""
        rss, cpu = proc_figures(op.pid) if op.poll() is None else (float("nan"), float("nan"))
        with rec.lock:
            first = [rec.first_pod[r] - t for r, t in applied.items() if r in rec.first_pod]
            completed = sum(1 for ph in rec.phase.values() if ph == "Succeeded")
        gaps = rec.transitions()
        result = {
            "runs": a.runs,
            "completed": completed,
            "wall_s": round(end - t0, 1),
            "apply_to_first_pod_p50_s": percentile(first, 50),
            "apply_to_first_pod_p99_s": percentile(first, 99),
            "phase_transition_p50_s": percentile(gaps, 50),
            "phase_transition_p99_s": percentile(gaps, 99),
            "operator_rss_mb": round(rss, 1),
            "operator_cpu_s": round(cpu, 1),
            "api_requests_per_run": round(api_requests(text) / a.runs, 1) if text else None,
        }
        if completed < a.runs:
            with rec.lock:
                jobs_done = len(rec.job_done)
            result.update(partial=True, stopped_by=stopped_by or "runs failed", stopped_after_s=round(stopped_after, 1),
                          jobs_done=jobs_done, jobs_expected=jobs_expected, transitions_measured=len(gaps),
                          transitions_expected=3 * a.cycles * a.runs)
            log(f"PARTIAL ({result['stopped_by']} after {stopped_after:.0f}s): {completed}/{a.runs} runs completed, "
                f"{jobs_done}/{jobs_expected} Jobs finished, {len(gaps)}/{3 * a.cycles * a.runs} transitions measured")
        cp1 = control_plane_cpu(env)
        span = max(1e-9, time.monotonic() - t0)
        log("control plane CPU during the run (s, share of one core): " + ", ".join(
            f"{c} {cp1[c] - cp0[c]:.0f} ({(cp1[c] - cp0[c]) / span:.0%})" for c in cp1 if c in cp0)
            + f"; operator {cpu:.0f} ({cpu / span:.0%}); machine load average {os.getloadavg()[0]:.1f} "
              f"on {os.cpu_count()} CPUs")
        log(f"transitions measured {len(gaps)}, first pods {len(first)}; operator log {oplog}")
        by = sorted(((float(line.rsplit(" ", 1)[1]), line.split("{", 1)[1].split("}", 1)[0])
                     for line in text.splitlines() if line.startswith("copd_api_requests_total{")), reverse=True)
        log("operator: reconcile p50/p99 <= {}/{} s, event queue wait p50/p99 <= {}/{} s (bucket bounds)".format(
            hist_quantile(text, "copd_reconcile_duration_seconds", 0.5),
            hist_quantile(text, "copd_reconcile_duration_seconds", 0.99),
            hist_quantile(text, "copd_workqueue_latency_seconds", 0.5, priority="event"),
            hist_quantile(text, "copd_workqueue_latency_seconds", 0.99, priority="event")))
        log("API requests per run: " + ", ".join(f"{lab} {n / a.runs:.1f}" for n, lab in by))
        print(json.dumps(result), flush=True)
        return 0 if completed == a.runs else 1
    finally:
        if rec is not None:
            rec.stop.set()
        if op.poll() is None:
            os.killpg(op.pid, signal.SIGTERM)
            try:
                op.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(op.pid, signal.SIGKILL)
        if not a.keep:
            kubectl(env, "delete", "namespace", ns, "--wait=false", check=False)
            kubectl(env, "delete", "node", "-l", "copd.io/bench=operator-scale", "--wait=false", check=False)


if __name__ == "__main__":
    sys.exit(main())
