"""Process node: a tiny kubelet that runs pods as local processes.

    python hack/cluster/procnode/procnode.py --kubeconfig .cluster/kubeconfig --name proc-node-0 \
        --workdir .cluster/procnode [--api-host 127.0.0.1 --api-port 26443]

scripts/cluster.sh starts it as one more component. It registers Node <name>
(Ready; capacity cpu 16, memory 64Gi, pods 110, nvidia.com/gpu 4; label
copd.io/process-node="true"; taint copd.io/process-node=true:NoSchedule, so
only pods that tolerate it land here), keeps the node status and its Lease
fresh, and for every pod bound to it (spec.nodeName=<name>):

* runs init containers one after another, then all containers concurrently,
  each as `command + args` in its own process group (the image is ignored; a
  container without `command` fails with reason StartError). `python` on the
  PATH is the interpreter that runs this agent (the repo's .venv when present).
* env: the agent's environment minus KUBECONFIG, then KUBERNETES_SERVICE_HOST /
  KUBERNETES_SERVICE_PORT (the loopback apiserver), envFrom, env (literal values
  with $(VAR) expansion, fieldRef for metadata.name/namespace/uid/labels/
  annotations and spec.nodeName, secretKeyRef, configMapKeyRef).
* volumes become host directories: emptyDir/configMap/secret/projected ->
  <workdir>/<ns>/<pod>/volumes/<volume>; persistentVolumeClaim ->
  <workdir>/pvc/<ns>/<claimName> (shared by all pods of that claim, so data
  persists across pods); hostPath -> the path itself. The projected
  service-account volume gets a real token from the TokenRequest API for the
  pod's serviceAccountName, plus ca.crt and namespace.
* PATH REWRITE RULE (no bind mounts): every occurrence of a container's
  volumeMount mountPath (and of its terminationMessagePath) as a whole path
  prefix in command, args, env values and workingDir is replaced by the host
  directory (or file). E.g. with a PVC mounted at /ckpt, args
  ["--out", "/ckpt/step-3"] run as ["--out", "<workdir>/pvc/<ns>/<claim>/step-3"].
* service account: besides the rewrite of /var/run/secrets/kubernetes.io/
  serviceaccount, the env var COPD_SA_DIR points at the local token dir
  (token, ca.crt, namespace, kubeconfig); the kubernetes Python client's
  in-cluster loader reads a fixed path, so use
  `InClusterConfigLoader(token_filename=$COPD_SA_DIR/token, cert_filename=$COPD_SA_DIR/ca.crt)`.
  KUBECONFIG is set to $COPD_SA_DIR/kubeconfig (the service account's token,
  default namespace = the pod's), so clients that fall back from in-cluster
  config to a kubeconfig (kopf, `load_kube_config()`) act as the pod's SA.
* logs: stdout+stderr of each container go to
  <workdir>/<namespace>/<pod>/<container>.log (see pod_log_path()); there is
  no `kubectl logs` (no kubelet API).
* status: Pending -> Running (podIP/hostIP 127.0.0.1, containers ready while
  running; probes are not run) -> Succeeded/Failed with per-container exit
  codes; restartPolicy Never / OnFailure / Always is honoured with backoff.
  The termination message is the file at terminationMessagePath (default
  /dev/termination-log, rewritten to <workdir>/<ns>/<pod>/<container>.termination-log);
  with FallbackToLogsOnError and an empty file, the last 80 log lines.
* storage: claims of StorageClass copd-local (the cluster's default, created
  by scripts/cluster.sh) are bound to hostPath PVs at <workdir>/pvc/<ns>/<claim>
  by this agent, so pods with PVCs schedule on any node.
* deletion (deletionTimestamp set, or the object gone): SIGTERM each process
  group, SIGKILL after the grace period (capped at 30 s), then the pod object
  is deleted with grace 0.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import signal
import threading
import time

from kubernetes import client, config, watch  # noqa: E402
from kubernetes.client.rest import ApiException  # noqa: E402
from pods import MERGE, PodRunner, now, pod_log_path  # noqa: E402  (beside this script)

__all__ = ["pod_log_path", "Agent", "main"]

log = logging.getLogger("procnode")
HEARTBEAT_S = 10
SMP = "application/strategic-merge-patch+json"
STORAGE_CLASS = "copd-local"
PROVISIONER = "copd.io/procnode"


class Agent:
    def __init__(self, api_client, name, workdir, api_host, api_port, gpus=4):
        self.api = api_client
        self.v1 = client.CoreV1Api(api_client)
        self.coord = client.CoordinationV1Api(api_client)
        self.name, self.workdir = name, os.path.abspath(workdir)
        self.api_host, self.api_port, self.gpus = api_host, api_port, gpus
        self.pods = {}  # uid -> PodRunner
        self.lock = threading.Lock()
        self.done = threading.Event()

    # ---- node ---------------------------------------------------------------
    def node_status(self):
        t = now()
        conds = [
            {
                "type": "Ready",
                "status": "True",
                "reason": "KubeletReady",
                "message": "procnode is posting ready status",
            }
        ]
        conds += [
            {"type": c, "status": "False", "reason": "KubeletHas" + r, "message": "ok"}
            for c, r in (
                ("MemoryPressure", "SufficientMemory"),
                ("DiskPressure", "NoDiskPressure"),
                ("PIDPressure", "SufficientPID"),
            )
        ]
        for c in conds:
            c.update(lastHeartbeatTime=t, lastTransitionTime=self._started)
        cap = {
            "cpu": "16",
            "memory": "64Gi",
            "pods": "110",
            "ephemeral-storage": "100Gi",
            "nvidia.com/gpu": str(self.gpus),
        }
        return {
            "capacity": cap,
            "allocatable": cap,
            "conditions": conds,
            "phase": "Running",
            "addresses": [
                {"type": "InternalIP", "address": "127.0.0.1"},
                {"type": "Hostname", "address": self.name},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {
                "architecture": "amd64",
                "operatingSystem": "linux",
                "kubeletVersion": "procnode",
                "kubeProxyVersion": "",
                "containerRuntimeVersion": "procnode://1",
                "kernelVersion": "",
                "osImage": "procnode",
                "machineID": "",
                "systemUUID": "",
                "bootID": "",
            },
        }

    def register(self):
        self._started = now()
        body = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.name,
                "labels": {
                    "copd.io/process-node": "true",
                    "kubernetes.io/hostname": self.name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    "node-role/gpu": "true",
                    "nvidia.com/gpu.present": "true",
                    "nvidia.com/gpu.product": "procnode-fake-gpu",
                    "nvidia.com/gpu.count": str(self.gpus),
                },
            },
            "spec": {"taints": [{"key": "copd.io/process-node", "value": "true", "effect": "NoSchedule"}]},
        }
        try:
            self.v1.create_node(body)
        except ApiException as e:
            if e.status != 409:
                raise
            self.v1.patch_node(
                self.name,
                {"metadata": {"labels": body["metadata"]["labels"]}, "spec": body["spec"]},
                _content_type=MERGE,
            )
        self.heartbeat()

    def heartbeat(self):
        self.v1.patch_node_status(self.name, {"status": self.node_status()}, _content_type=SMP)
        renew = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        lease = {
            "metadata": {"name": self.name, "namespace": "kube-node-lease"},
            "spec": {"holderIdentity": self.name, "leaseDurationSeconds": 40, "renewTime": renew},
        }
        try:
            self.coord.patch_namespaced_lease(self.name, "kube-node-lease", lease, _content_type=MERGE)
        except ApiException as e:
            if e.status != 404:
                raise
            self.coord.create_namespaced_lease("kube-node-lease", lease)

    def heartbeat_loop(self):
        while not self.done.wait(HEARTBEAT_S):
            try:
                self.heartbeat()
            except Exception as e:  # noqa: BLE001 - keep beating
                log.warning("heartbeat: %s", e)

    # ---- storage: a provisioner for the default StorageClass ----------------
    def provision_once(self):
        """Bind each pending claim of StorageClass copd-local to a hostPath PV at <workdir>/pvc/<ns>/<claim>."""
        for pvc in self.v1.list_persistent_volume_claim_for_all_namespaces().items:
            m, s = pvc.metadata, pvc.spec
            if (
                pvc.status.phase != "Pending"
                or s.volume_name
                or (s.storage_class_name or "") != STORAGE_CLASS
            ):
                continue
            path = os.path.join(self.workdir, "pvc", m.namespace, m.name)
            os.makedirs(path, exist_ok=True)
            pv = {
                "apiVersion": "v1",
                "kind": "PersistentVolume",
                "metadata": {
                    "name": f"pvc-{m.uid}",
                    "annotations": {"pv.kubernetes.io/provisioned-by": PROVISIONER},
                },
                "spec": {
                    "capacity": {"storage": (s.resources.requests or {}).get("storage", "1Gi")},
                    "accessModes": s.access_modes or ["ReadWriteOnce"],
                    "hostPath": {"path": path},
                    "storageClassName": STORAGE_CLASS,
                    "persistentVolumeReclaimPolicy": "Delete",
                    "claimRef": {"namespace": m.namespace, "name": m.name, "uid": m.uid},
                },
            }
            try:
                self.v1.create_persistent_volume(pv)
                log.info("provisioned %s for %s/%s", pv["metadata"]["name"], m.namespace, m.name)
            except ApiException as e:
                if e.status != 409:
                    raise
        for pv in self.v1.list_persistent_volume().items:
            if (
                pv.status.phase == "Released"
                and (pv.metadata.annotations or {}).get("pv.kubernetes.io/provisioned-by") == PROVISIONER
            ):
                self.v1.delete_persistent_volume(pv.metadata.name)

    def provision_loop(self):
        while not self.done.wait(1):
            try:
                self.provision_once()
            except Exception as e:  # noqa: BLE001
                log.warning("provisioner: %s", e)

    # ---- pods ------------------------------------------------------------------
    def on_pod(self, etype, pod):
        meta, status = pod["metadata"], pod.get("status") or {}
        uid = meta["uid"]
        with self.lock:
            runner = self.pods.get(uid)
            if etype == "DELETED" or meta.get("deletionTimestamp"):
                if runner is None and etype != "DELETED":
                    runner = self.pods[uid] = PodRunner(self, pod)  # never started: just finish it off
                    runner.phase = status.get("phase") or "Failed"
                if runner is not None and not getattr(runner, "deleting", False):
                    runner.deleting = True
                    grace = min(
                        meta.get("deletionGracePeriodSeconds")
                        or pod["spec"].get("terminationGracePeriodSeconds")
                        or 0,
                        30,
                    )
                    threading.Thread(target=self._delete, args=(uid, runner, grace), daemon=True).start()
                return
            if runner is None:
                if status.get("phase") in ("Succeeded", "Failed"):
                    return  # finished before this agent (re)started
                runner = self.pods[uid] = PodRunner(self, pod)
                log.info("new pod %s/%s", meta["namespace"], meta["name"])
                runner.start()
            else:
                runner.pod["status"] = status  # keep scheduler-owned conditions

    def _delete(self, uid, runner, grace):
        try:
            runner.delete(grace)
        except Exception:  # noqa: BLE001
            log.exception("deleting %s/%s", runner.ns, runner.name)
        finally:
            with self.lock:
                self.pods.pop(uid, None)

    def watch_pods(self):
        selector = f"spec.nodeName={self.name}"
        while not self.done.is_set():
            try:
                pods = self.api.sanitize_for_serialization(
                    self.v1.list_pod_for_all_namespaces(field_selector=selector)
                )
                seen = set()
                for p in pods["items"]:
                    seen.add(p["metadata"]["uid"])
                    self.on_pod("ADDED", p)
                with self.lock:
                    gone = [(u, r.pod) for u, r in self.pods.items() if u not in seen]
                for _uid, pod in gone:
                    self.on_pod("DELETED", pod)
                w = watch.Watch()
                for ev in w.stream(
                    self.v1.list_pod_for_all_namespaces,
                    field_selector=selector,
                    resource_version=pods["metadata"]["resourceVersion"],
                    timeout_seconds=300,
                ):
                    if ev["type"] in ("ADDED", "MODIFIED", "DELETED"):
                        self.on_pod(ev["type"], ev["raw_object"])
                    if self.done.is_set():
                        break
            except Exception as e:  # noqa: BLE001 - relist on any watch failure
                if not self.done.is_set():
                    log.warning("pod watch: %s; relisting", e)
                    time.sleep(1)

    def shutdown(self, *_):
        log.info("shutting down: killing all pod processes")
        self.done.set()
        with self.lock:
            runners = list(self.pods.values())
        for r in runners:
            r.kill(2)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kubeconfig", required=True)
    ap.add_argument("--name", default="proc-node-0")
    ap.add_argument("--workdir", default=".cluster/procnode")
    ap.add_argument("--api-host", default="127.0.0.1")
    ap.add_argument("--api-port", type=int, default=None, help="default: the port in the kubeconfig")
    ap.add_argument("--gpus", type=int, default=4)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(threadName)s %(message)s")
    cfg = client.Configuration()
    config.load_kube_config(config_file=a.kubeconfig, client_configuration=cfg)
    cfg.connection_pool_maxsize = 64
    port = a.api_port or int(cfg.host.rsplit(":", 1)[1])
    os.makedirs(a.workdir, exist_ok=True)
    agent = Agent(client.ApiClient(cfg), a.name, a.workdir, a.api_host, port, a.gpus)
    signal.signal(signal.SIGTERM, lambda *_: (agent.shutdown(), os._exit(0)))
    signal.signal(signal.SIGINT, lambda *_: (agent.shutdown(), os._exit(0)))
    agent.register()
    threading.Thread(target=agent.heartbeat_loop, name="heartbeat", daemon=True).start()
    threading.Thread(target=agent.provision_loop, name="provisioner", daemon=True).start()
    log.info("node %s registered; workdir %s", a.name, agent.workdir)
    agent.watch_pods()


if __name__ == "__main__":
    main()
