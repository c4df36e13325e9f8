"""Pod runner of the process node (see procnode.py for the rules it follows)."""

from __future__ import annotations

import base64
import datetime as dt
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

from kubernetes.client.rest import ApiException

log = logging.getLogger("procnode")

SA_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"
DEFAULT_TERMINATION_LOG = "/dev/termination-log"
MERGE = "application/merge-patch+json"


def pod_log_path(workdir, namespace, pod, container):
    """Where the stdout+stderr of a container lives: <workdir>/<namespace>/<pod>/<container>.log."""
    return os.path.join(str(workdir), namespace, pod, f"{container}.log")


def now():
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def rewrite(text, mapping):
    """Replace every in-cluster path prefix (a mountPath) in text by its host directory.

    A prefix matches only as a whole path: not preceded by a path character and
    followed by the end, '/' or a non-path character. Longest prefixes win.
    A longer path under a mountPath that already exists on this host is a host
    path and stays as it is: e.g. with an emptyDir at /tmp, a checkout under
    /tmp/clone/.venv/bin/python must keep pointing at the checkout.
    """
    if not isinstance(text, str) or not mapping:
        return text
    # one pass, so a host directory substituted in cannot be rewritten again by a shorter mountPath
    alternatives = "|".join(re.escape(src) for src in sorted(mapping, key=len, reverse=True))
    pattern = r"(?<![\w.\-/])(" + alternatives + r")(?=$|[^\w.\-])[\w.\-/]*"

    def sub(m):
        token, src = m.group(0), m.group(1)
        if token != src and os.path.exists(token):
            return token
        return mapping[src] + token[len(src):]

    return re.sub(pattern, sub, text)


def expand_vars(text, env):
    """Kubernetes $(VAR) expansion; $$(VAR) escapes."""
    return re.sub(
        r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.\-]*)\)",
        lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)),
        text,
    )


class PodRunner:
    """Runs one pod's containers as local process groups and reports its status."""

    def __init__(self, agent, pod):
        self.agent, self.v1 = agent, agent.v1
        self.pod = pod
        meta = pod["metadata"]
        self.ns, self.name, self.uid = meta["namespace"], meta["name"], meta["uid"]
        self.dir = os.path.join(agent.workdir, self.ns, self.name)
        self.procs = {}  # container name -> Popen
        self.lock = threading.RLock()
        self.stopping = threading.Event()
        self.statuses = {}  # container name -> containerStatus dict
        self.init_statuses = {}
        self.phase = "Pending"
        self.initialized = False
        self.thread = threading.Thread(target=self._main, name=f"pod-{self.ns}/{self.name}", daemon=True)

    # ---- status ----------------------------------------------------------
    def _cond(self, ctype, ok):
        return {"type": ctype, "status": "True" if ok else "False", "lastTransitionTime": now()}

    def report(self):
        with self.lock:
            spec = self.pod["spec"]
            cs = [self.statuses[c["name"]] for c in spec["containers"] if c["name"] in self.statuses]
            ics = [
                self.init_statuses[c["name"]]
                for c in spec.get("initContainers") or []
                if c["name"] in self.init_statuses
            ]
            ready = (
                self.phase == "Running" and len(cs) == len(spec["containers"]) and all(s["ready"] for s in cs)
            )
            conds = [
                c
                for c in (self.pod.get("status") or {}).get("conditions") or []
                if c["type"] not in ("Initialized", "Ready", "ContainersReady", "PodReadyToStartContainers")
            ]
            conds += [
                self._cond("PodReadyToStartContainers", True),
                self._cond("Initialized", self.initialized),
                self._cond("ContainersReady", ready),
                self._cond("Ready", ready),
            ]
            status = {
                "phase": self.phase,
                "conditions": conds,
                "hostIP": "127.0.0.1",
                "hostIPs": [{"ip": "127.0.0.1"}],
                "podIP": "127.0.0.1",
                "podIPs": [{"ip": "127.0.0.1"}],
                "startTime": (self.pod.get("status") or {}).get("startTime") or now(),
                "containerStatuses": cs,
                "initContainerStatuses": ics,
            }
        try:
            self.v1.patch_namespaced_pod_status(self.name, self.ns, {"status": status}, _content_type=MERGE)
        except ApiException as e:
            if e.status != 404:
                log.warning("status of %s/%s: %s", self.ns, self.name, e.reason)
        except Exception as e:  # noqa: BLE001 - never let reporting kill the runner
            log.warning("status of %s/%s: %s", self.ns, self.name, e)

    def _set(self, table, c, state, ready=False, restarts=None):
        old = table.get(c["name"]) or {}
        st = {
            "name": c["name"],
            "image": c.get("image") or "",
            "imageID": "",
            "containerID": f"proc://{self.uid}/{c['name']}",
            "ready": ready,
            "started": "running" in state,
            "restartCount": old.get("restartCount", 0) if restarts is None else restarts,
            "state": state,
        }
        if restarts is not None and old.get("state", {}).get("terminated"):
            st["lastState"] = {"terminated": old["state"]["terminated"]}
        elif old.get("lastState"):
            st["lastState"] = old["lastState"]
        table[c["name"]] = st

    # ---- environment and volumes ------------------------------------------
    def _get(self, kind, name):
        fn = self.v1.read_namespaced_secret if kind == "secret" else self.v1.read_namespaced_config_map
        obj = fn(name, self.ns)
        data = dict(obj.data or {})
        if kind == "secret":
            return {k: base64.b64decode(v).decode() for k, v in data.items()}
        return data

    def _write_items(self, dest, data, items):
        os.makedirs(dest, exist_ok=True)
        for key, path in [(i["key"], i["path"]) for i in items] if items else [(k, k) for k in data]:
            if key in data:
                p = os.path.join(dest, path)
                os.makedirs(os.path.dirname(p), exist_ok=True)
                with open(p, "w") as f:
                    f.write(data[key])

    def _field(self, path):
        meta = self.pod["metadata"]
        m = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
        if m:
            return (meta.get(m.group(1)) or {}).get(m.group(2), "")
        return {
            "metadata.name": meta["name"],
            "metadata.namespace": self.ns,
            "metadata.uid": self.uid,
            "spec.nodeName": self.agent.name,
            "spec.serviceAccountName": self.pod["spec"].get("serviceAccountName", "default"),
            "status.podIP": "127.0.0.1",
            "status.hostIP": "127.0.0.1",
        }.get(path, "")

    def _token(self, src):
        body = {
            "spec": {
                "audiences": [src["audience"]] if src.get("audience") else None,
                "expirationSeconds": src.get("expirationSeconds", 3607),
                "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": self.name, "uid": self.uid},
            }
        }
        sa = self.pod["spec"].get("serviceAccountName") or "default"
        return self.v1.create_namespaced_service_account_token(sa, self.ns, body).status.token

    def _volumes(self):
        """Materialise every volume as a host directory; returns {volume name: host dir}."""
        out = {}
        for vol in self.pod["spec"].get("volumes") or []:
            name, d = vol["name"], os.path.join(self.dir, "volumes", vol["name"])
            if "persistentVolumeClaim" in vol:
                d = os.path.join(
                    self.agent.workdir, "pvc", self.ns, vol["persistentVolumeClaim"]["claimName"]
                )
            elif "hostPath" in vol:
                d = vol["hostPath"]["path"]
            elif "configMap" in vol or "secret" in vol:
                kind = "configMap" if "configMap" in vol else "secret"
                src = vol[kind]
                ref = src.get("name") or src.get("secretName")
                self._write_items(d, self._get("secret" if kind == "secret" else "cm", ref), src.get("items"))
            elif "projected" in vol:
                for s in vol["projected"].get("sources") or []:
                    if "serviceAccountToken" in s:
                        self._write_items(
                            d,
                            {"t": self._token(s["serviceAccountToken"])},
                            [{"key": "t", "path": s["serviceAccountToken"]["path"]}],
                        )
                    elif "configMap" in s or "secret" in s:
                        kind = "configMap" if "configMap" in s else "secret"
                        data = self._get("secret" if kind == "secret" else "cm", s[kind]["name"])
                        self._write_items(d, data, s[kind].get("items"))
                    elif "downwardAPI" in s:
                        for item in s["downwardAPI"].get("items") or []:
                            if "fieldRef" in item:
                                self._write_items(
                                    d,
                                    {"v": self._field(item["fieldRef"]["fieldPath"])},
                                    [{"key": "v", "path": item["path"]}],
                                )
            os.makedirs(d, exist_ok=True)
            out[name] = d
        return out

    def _sa_kubeconfig(self, sa_dir):
        """A kubeconfig for the pod's service account, for clients that fall back from in-cluster config."""
        path = os.path.join(sa_dir, "kubeconfig")
        with open(os.path.join(sa_dir, "token")) as f:
            token = f.read().strip()
        server = f"https://{self.agent.api_host}:{self.agent.api_port}"
        with open(path, "w") as f:
            f.write(
                "apiVersion: v1\nkind: Config\n"
                f"clusters: [{{name: local, cluster: {{server: '{server}', certificate-authority: '{sa_dir}/ca.crt'}}}}]\n"
                f"users: [{{name: sa, user: {{token: '{token}'}}}}]\n"
                f"contexts: [{{name: sa, context: {{cluster: local, user: sa, namespace: '{self.ns}'}}}}]\n"
                "current-context: sa\n"
            )
        return path

    def _env(self, c, mapping):
        env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG",)}
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
        env.update(
            {
                "HOSTNAME": self.name,
                "KUBERNETES_SERVICE_HOST": self.agent.api_host,
                "KUBERNETES_SERVICE_PORT": str(self.agent.api_port),
                "KUBERNETES_SERVICE_PORT_HTTPS": str(self.agent.api_port),
            }
        )
        if SA_PATH in mapping:
            env["COPD_SA_DIR"] = mapping[SA_PATH]
            env["KUBECONFIG"] = self._sa_kubeconfig(mapping[SA_PATH])
        for ef in c.get("envFrom") or []:
            kind = "secret" if "secretRef" in ef else "cm"
            ref = ef.get("secretRef") or ef.get("configMapRef")
            try:
                data = self._get(kind, ref["name"])
            except ApiException:
                if ref.get("optional"):
                    continue
                raise
            env.update({ef.get("prefix", "") + k: v for k, v in data.items()})
        for e in c.get("env") or []:
            if "valueFrom" not in e:
                env[e["name"]] = expand_vars(e.get("value", ""), env)
                continue
            vf = e["valueFrom"]
            if "fieldRef" in vf:
                env[e["name"]] = self._field(vf["fieldRef"]["fieldPath"])
            elif "secretKeyRef" in vf or "configMapKeyRef" in vf:
                kind = "secret" if "secretKeyRef" in vf else "cm"
                ref = vf.get("secretKeyRef") or vf.get("configMapKeyRef")
                try:
                    env[e["name"]] = self._get(kind, ref["name"])[ref["key"]]
                except (ApiException, KeyError):
                    if not ref.get("optional"):
                        raise
            elif "resourceFieldRef" in vf:
                env[e["name"]] = "1"
        return {k: rewrite(v, mapping) for k, v in env.items()}

    # ---- running ------------------------------------------------------------
    def _run_once(self, c, volumes, table):
        """Run container c once to completion; returns its exit code."""
        cname = c["name"]
        tlog_src = c.get("terminationMessagePath") or DEFAULT_TERMINATION_LOG
        tlog = os.path.join(self.dir, f"{cname}.termination-log")
        mapping = {tlog_src: tlog}
        for m in c.get("volumeMounts") or []:
            if m["name"] in volumes:
                host = os.path.join(volumes[m["name"]], m.get("subPath", ""))
                os.makedirs(host, exist_ok=True)
                mapping[m["mountPath"].rstrip("/") or "/"] = host.rstrip("/")
        env = self._env(c, mapping)
        argv = [
            rewrite(expand_vars(a, env), mapping) for a in (c.get("command") or []) + (c.get("args") or [])
        ]
        if not c.get("command"):
            raise RuntimeError("procnode needs an explicit command (images are ignored)")
        cwd = rewrite(c.get("workingDir") or "", mapping)
        if not (cwd and os.path.isdir(cwd)):
            cwd = os.path.join(self.dir, "work")
        os.makedirs(cwd, exist_ok=True)
        if os.path.exists(tlog):
            os.unlink(tlog)
        logpath = pod_log_path(self.agent.workdir, self.ns, self.name, cname)
        started = now()
        with open(logpath, "ab") as out:
            with self.lock:
                if self.stopping.is_set():
                    return 137
                p = subprocess.Popen(
                    argv,
                    env=env,
                    cwd=cwd,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
                self.procs[cname] = p
                self._set(table, c, {"running": {"startedAt": started}}, ready=table is self.statuses)
            log.info("%s/%s: started %s pid %d: %s", self.ns, self.name, cname, p.pid, argv)
            self.report()
            code = p.wait()
        code = 128 - code if code < 0 else code  # killed by signal N -> 128+N
        msg = ""
        if os.path.exists(tlog):
            with open(tlog, errors="replace") as f:
                msg = f.read(4096)
        if not msg and code != 0 and c.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            with open(logpath, errors="replace") as f:
                msg = "".join(f.readlines()[-80:])[-2048:]
        term = {
            "exitCode": code,
            "reason": "Completed" if code == 0 else "Error",
            "startedAt": started,
            "finishedAt": now(),
            "containerID": f"proc://{self.uid}/{cname}",
        }
        if msg:
            term["message"] = msg
        with self.lock:
            self._set(table, c, {"terminated": term})
        return code

    def _run_container(self, c, volumes, table, policy):
        """Run with restarts per restartPolicy; returns the final exit code."""
        delay = 1
        while True:
            try:
                code = self._run_once(c, volumes, table)
            except Exception as e:  # noqa: BLE001 - a bad spec fails the container, not the agent
                log.warning("%s/%s: container %s cannot start: %s", self.ns, self.name, c["name"], e)
                with self.lock:
                    self._set(
                        table,
                        c,
                        {
                            "terminated": {
                                "exitCode": 128,
                                "reason": "StartError",
                                "message": str(e),
                                "startedAt": now(),
                                "finishedAt": now(),
                            }
                        },
                    )
                code = 128
            if self.stopping.is_set() or policy == "Never" or (policy == "OnFailure" and code == 0):
                return code
            self.report()
            if self.stopping.wait(delay):
                return code
            delay = min(delay * 2, 10)
            with self.lock:
                restarts = table[c["name"]].get("restartCount", 0) + 1
                self._set(table, c, {"waiting": {"reason": "CrashLoopBackOff"}}, restarts=restarts)

    def _main(self):
        spec = self.pod["spec"]
        policy = spec.get("restartPolicy") or "Always"
        try:
            os.makedirs(self.dir, exist_ok=True)
            volumes = self._volumes()
            with self.lock:
                for c in spec.get("initContainers") or []:
                    self._set(self.init_statuses, c, {"waiting": {"reason": "PodInitializing"}})
                for c in spec["containers"]:
                    self._set(self.statuses, c, {"waiting": {"reason": "ContainerCreating"}})
            self.report()
            for c in spec.get("initContainers") or []:
                if self._run_container(
                    c, volumes, self.init_statuses, "OnFailure" if policy == "Always" else policy
                ):
                    self.phase = "Failed"
                    return
            self.initialized, self.phase = True, "Running"
            threads = [
                threading.Thread(
                    target=lambda c=c: self._run_container(c, volumes, self.statuses, policy), daemon=True
                )
                for c in spec["containers"]
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            codes = [s["state"].get("terminated", {}).get("exitCode", 1) for s in self.statuses.values()]
            self.phase = "Succeeded" if all(c == 0 for c in codes) else "Failed"
        except Exception as e:  # noqa: BLE001
            log.exception("%s/%s failed to run", self.ns, self.name)
            self.phase = "Failed"
            self.pod.setdefault("status", {})["message"] = str(e)
        finally:
            if not self.stopping.is_set():
                self.report()

    # ---- lifecycle ------------------------------------------------------------
    def start(self):
        self.thread.start()

    def kill(self, grace):
        """SIGTERM every container's process group, SIGKILL after grace seconds."""
        self.stopping.set()
        with self.lock:
            procs = list(self.procs.values())
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for p in procs:
                if p.poll() is None:
                    try:
                        os.killpg(p.pid, sig)
                    except ProcessLookupError:
                        pass
            deadline = time.time() + grace
            while time.time() < deadline and any(p.poll() is None for p in procs):
                time.sleep(0.1)
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass

    def delete(self, grace):
        """Kubelet side of a pod deletion: kill, report terminal status, remove the object."""
        self.kill(grace)
        if self.thread.ident:
            self.thread.join(timeout=10)
        if self.phase not in ("Succeeded", "Failed"):
            self.phase = "Failed"
        self.report()
        try:
            self.v1.delete_namespaced_pod(
                self.name,
                self.ns,
                grace_period_seconds=0,
                body={"preconditions": {"uid": self.uid}, "gracePeriodSeconds": 0},
            )
        except ApiException as e:
            if e.status not in (404, 409):
                log.warning("delete %s/%s: %s", self.ns, self.name, e.reason)
        shutil.rmtree(os.path.join(self.dir, "volumes"), ignore_errors=True)
