"""The local control plane is real: apiserver validation, scheduling onto KWOK GPU
nodes, Jobs completing, pods running as processes on the process node."""

from __future__ import annotations

import json
import os
import re
import time
import uuid

import pytest

pytestmark = pytest.mark.cluster

GPU_TOLERATIONS = [{"key": "kwok.x-k8s.io/node", "operator": "Exists", "effect": "NoSchedule"}]
PROC_TOLERATIONS = [{"key": "copd.io/process-node", "operator": "Exists", "effect": "NoSchedule"}]


def apply(cluster, obj, namespace=None, check=True):
    args = ["apply", "-f", "-"] + (["-n", namespace] if namespace else [])
    return cluster.kubectl(*args, input=json.dumps(obj), check=check)


def get(cluster, kind, name, namespace):
    return json.loads(cluster.kubectl("get", kind, name, "-n", namespace, "-o", "json").stdout)


def wait_for(what, fn, timeout=90, interval=0.5):
    deadline = time.time() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def pod_phase(cluster, name, namespace, phase):
    def check():
        p = get(cluster, "pod", name, namespace)
        return p if p.get("status", {}).get("phase") == phase else None

    return check


def proc_pod(name, command, **spec):
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "nodeSelector": {"copd.io/process-node": "true"},
            "tolerations": PROC_TOLERATIONS,
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 5,
            "containers": [{"name": "main", "image": "ignored", "command": command}],
            **spec,
        },
    }


def test_tool_versions(cluster):
    v = cluster.versions
    out = json.loads(cluster.kubectl("version", "-o", "json").stdout)
    assert out["clientVersion"]["gitVersion"] == v["KUBE_VERSION"]
    assert out["serverVersion"]["gitVersion"] == v["KUBE_VERSION"]
    assert cluster.run("helm", "version", "--short").stdout.startswith(v["HELM_VERSION"])
    promtool = cluster.run("promtool", "--version")
    prom = v["PROMETHEUS_VERSION"]  # v0.316.0 is Prometheus 3.16.0
    major_minor = re.match(r"v0\.(\d)(\d+)\.(\d+)", prom).groups()
    assert (
        f"promtool, version {major_minor[0]}.{int(major_minor[1])}.{major_minor[2]}"
        in promtool.stdout + promtool.stderr
    )
    nodes = json.loads(cluster.kubectl("get", "nodes", "-o", "json").stdout)["items"]
    names = {n["metadata"]["name"] for n in nodes}
    assert {"kwok-gpu-0", "kwok-gpu-1", "kwok-gpu-2", "kwok-gpu-3", cluster.procnode_name} <= names


def test_crd_cel_validation(cluster, namespace):
    group = f"t{uuid.uuid4().hex[:8]}.copd.io"
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"widgets.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "required": ["replicas", "minReplicas"],
                                    "properties": {
                                        "replicas": {"type": "integer"},
                                        "minReplicas": {"type": "integer"},
                                    },
                                    "x-kubernetes-validations": [
                                        {
                                            "rule": "self.minReplicas <= self.replicas",
                                            "message": "minReplicas must not exceed replicas",
                                        }
                                    ],
                                }
                            },
                        }
                    },
                }
            ],
        },
    }
    apply(cluster, crd)
    try:
        cluster.kubectl("wait", "--for=condition=Established", f"crd/widgets.{group}", "--timeout=60s")
        bad = {
            "apiVersion": f"{group}/v1",
            "kind": "Widget",
            "metadata": {"name": "bad"},
            "spec": {"replicas": 1, "minReplicas": 3},
        }
        r = wait_for(
            "CRD served",
            lambda: (
                lambda p: (
                    p
                    if "the server could not find" not in p.stderr and "no matches for kind" not in p.stderr
                    else None
                )
            )(apply(cluster, bad, namespace, check=False)),
            timeout=30,
        )
        assert r.returncode != 0
        assert "minReplicas must not exceed replicas" in r.stderr
        good = dict(bad, metadata={"name": "good"}, spec={"replicas": 3, "minReplicas": 1})
        apply(cluster, good, namespace)
        assert get(cluster, f"widgets.{group}", "good", namespace)["spec"]["replicas"] == 3
    finally:
        cluster.kubectl("delete", "crd", f"widgets.{group}", "--wait=false", check=False)


def test_gpu_job_completes_on_kwok_node(cluster, namespace):
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "gpu-job"},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "nodeSelector": {"type": "kwok", "node-role/gpu": "true"},
                    "tolerations": GPU_TOLERATIONS,
                    "containers": [
                        {
                            "name": "train",
                            "image": "trainer:fake",
                            "resources": {"limits": {"nvidia.com/gpu": 1}},
                        }
                    ],
                }
            },
        },
    }
    apply(cluster, job, namespace)
    cluster.kubectl(
        "wait", "--for=condition=Complete", "job/gpu-job", "-n", namespace, "--timeout=120s", timeout=150
    )
    pods = json.loads(
        cluster.kubectl("get", "pods", "-n", namespace, "-l", "job-name=gpu-job", "-o", "json").stdout
    )["items"]
    assert pods and pods[0]["spec"]["nodeName"].startswith("kwok-gpu-")
    assert pods[0]["status"]["phase"] == "Succeeded"


def test_fail_annotation_fails_pod_on_kwok_node(cluster, namespace):
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "doomed",
            "annotations": {
                "kwok.copd.io/fail": "true",
                "kwok.copd.io/exit-code": "7",
                "kwok.copd.io/duration": "3s",
            },
        },
        "spec": {
            "restartPolicy": "Never",
            "nodeSelector": {"type": "kwok"},
            "tolerations": GPU_TOLERATIONS,
            "containers": [
                {"name": "train", "image": "trainer:fake", "resources": {"limits": {"nvidia.com/gpu": 2}}}
            ],
        },
    }
    apply(cluster, pod, namespace)
    wait_for("pod Running", pod_phase(cluster, "doomed", namespace, "Running"))
    t0 = time.time()
    p = wait_for("pod Failed", pod_phase(cluster, "doomed", namespace, "Failed"))
    assert time.time() - t0 > 1.5, "kwok.copd.io/duration should delay the failure"
    assert p["spec"]["nodeName"].startswith("kwok-gpu-")
    assert p["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 7


def test_process_node_runs_pod_and_reports_termination_message(cluster, namespace):
    code = (
        "import os; print('hello from', os.environ['POD_NAME'], flush=True); "
        "open('/dev/termination-log', 'w').write('all done')"
    )
    pod = proc_pod("hello", ["python", "-c", code])
    pod["spec"]["containers"][0]["env"] = [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
    ]
    apply(cluster, pod, namespace)
    p = wait_for("pod Succeeded", pod_phase(cluster, "hello", namespace, "Succeeded"))
    term = p["status"]["containerStatuses"][0]["state"]["terminated"]
    assert term["exitCode"] == 0
    assert term["message"] == "all done"
    assert p["spec"]["nodeName"] == cluster.procnode_name
    assert "hello from hello" in cluster.log_path(namespace, "hello", "main").read_text()


def test_process_node_failure_exit_code_and_fallback_message(cluster, namespace):
    pod = proc_pod("crash", ["python", "-c", "import sys; print('boom: bad config'); sys.exit(3)"])
    pod["spec"]["containers"][0]["terminationMessagePolicy"] = "FallbackToLogsOnError"
    apply(cluster, pod, namespace)
    p = wait_for("pod Failed", pod_phase(cluster, "crash", namespace, "Failed"))
    term = p["status"]["containerStatuses"][0]["state"]["terminated"]
    assert term["exitCode"] == 3
    assert "boom: bad config" in term["message"]


def test_process_node_service_account_token_and_pvc(cluster, namespace):
    """In-cluster credentials work (COPD_SA_DIR); a PVC mount path is rewritten and persists."""
    code = (
        "import os\n"
        "from kubernetes import client\n"
        "from kubernetes.config.incluster_config import InClusterConfigLoader\n"
        "d = os.environ['COPD_SA_DIR']\n"
        "InClusterConfigLoader(token_filename=d + '/token', cert_filename=d + '/ca.crt').load_and_set()\n"
        "r = client.AuthenticationV1Api().create_self_subject_review({'apiVersion': 'authentication.k8s.io/v1',"
        " 'kind': 'SelfSubjectReview'})\n"
        "print('user', r.status.user_info.username, flush=True)\n"
        "open('/ckpt/step-1', 'w').write(open(d + '/namespace').read())\n"
        "from kubernetes import config\n"
        "api = client.AuthenticationV1Api(config.new_client_from_config())\n"  # KUBECONFIG = the SA's
        "r = api.create_self_subject_review({'apiVersion': 'authentication.k8s.io/v1', 'kind': 'SelfSubjectReview'})\n"
        "print('kubeconfig user', r.status.user_info.username, flush=True)\n"
    )
    apply(
        cluster,
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": "ckpt"},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
        },
        namespace,
    )
    pod = proc_pod(
        "sa",
        ["python", "-c", code],
        volumes=[{"name": "ckpt", "persistentVolumeClaim": {"claimName": "ckpt"}}],
    )
    pod["spec"]["containers"][0]["volumeMounts"] = [{"name": "ckpt", "mountPath": "/ckpt"}]
    apply(cluster, pod, namespace)
    wait_for("pod Succeeded", pod_phase(cluster, "sa", namespace, "Succeeded"), timeout=120)
    log = cluster.log_path(namespace, "sa", "main").read_text()
    assert f"user system:serviceaccount:{namespace}:default" in log
    assert f"kubeconfig user system:serviceaccount:{namespace}:default" in log
    ckpt = cluster.procnode_workdir / "pvc" / namespace / "ckpt" / "step-1"
    assert ckpt.read_text() == namespace


def test_process_node_kills_process_when_pod_deleted(cluster, namespace):
    code = "import os, time; print('pid', os.getpid(), flush=True); time.sleep(600)"
    apply(cluster, proc_pod("sleeper", ["python", "-c", code]), namespace)
    wait_for("pod Running", pod_phase(cluster, "sleeper", namespace, "Running"))
    log = cluster.log_path(namespace, "sleeper", "main")
    pid = int(
        wait_for(
            "pid in log",
            lambda: (m := re.search(r"pid (\d+)", log.read_text() if log.exists() else "")) and m.group(1),
        )
    )
    os.kill(pid, 0)  # alive
    cluster.kubectl("delete", "pod", "sleeper", "-n", namespace, "--timeout=60s", timeout=90)

    def gone():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    wait_for(f"pid {pid} to exit", gone, timeout=30)
    assert cluster.kubectl("get", "pod", "sleeper", "-n", namespace, check=False).returncode != 0


def test_process_node_init_containers_restarts_and_jobs(cluster, namespace):
    """Init containers run first (sharing an emptyDir), OnFailure restarts, Jobs complete on the process node."""
    flaky = (
        "import os, sys; p = '/scratch/attempts'; n = int(open(p).read()) if os.path.exists(p) else 0; "
        "open(p, 'w').write(str(n + 1)); print('attempt', n, open('/scratch/init').read(), flush=True); "
        "sys.exit(0 if n >= 1 else 1)"
    )
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "flaky"},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "restartPolicy": "OnFailure",
                    "nodeSelector": {"copd.io/process-node": "true"},
                    "tolerations": PROC_TOLERATIONS,
                    "volumes": [{"name": "scratch", "emptyDir": {}}],
                    "initContainers": [
                        {
                            "name": "init",
                            "image": "x",
                            "command": ["sh", "-c", "echo ready > /scratch/init"],
                            "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}],
                        }
                    ],
                    "containers": [
                        {
                            "name": "main",
                            "image": "x",
                            "command": ["python", "-c", flaky],
                            "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}],
                        }
                    ],
                }
            },
        },
    }
    apply(cluster, job, namespace)
    cluster.kubectl(
        "wait", "--for=condition=Complete", "job/flaky", "-n", namespace, "--timeout=90s", timeout=120
    )
    pod = json.loads(
        cluster.kubectl("get", "pods", "-n", namespace, "-l", "job-name=flaky", "-o", "json").stdout
    )["items"][0]
    st = pod["status"]["containerStatuses"][0]
    assert st["restartCount"] == 1
    assert st["lastState"]["terminated"]["exitCode"] == 1
    assert pod["status"]["initContainerStatuses"][0]["state"]["terminated"]["exitCode"] == 0
    log = cluster.log_path(namespace, pod["metadata"]["name"], "main").read_text()
    assert "attempt 0 ready" in log and "attempt 1 ready" in log
