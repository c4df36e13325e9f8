"""Pure `build_*` builders: manifests (plain dicts) for every child of a CoPDRun.

    CoPDRun <run>                                  (every name below ends in -<h>: naming.py)
     ├─ PersistentVolumeClaim <run>-storage         (unless spec.storage.claimName; owned by the run
     │                                                only with spec.storage.retainPolicy Delete)
     ├─ Branch <run>-<branch>                       (one per spec branch)
     │    └─ Job <run>-<branch>-c<cycle>-<stage>    (trainer: `copd stage`, one per stage; patches the
     │                                                Branch's status.progress while it runs)
     ├─ NetworkPolicy <run>-hub                     (only the run's trainers reach its hub; --network-policy)
     ├─ Pod + Service <run>-hub-c<cycle>            (during OPD only: `copd hub`)
     ├─ Job <run>-diagnose-c<cycle>                 (`copd diagnose`)
     └─ Job <run>-merge                             (`copd merge`)

Every child but a retained claim carries an owner reference (deletion cascades) and the
labels in naming.py (the gatherer lists by `copd.io/run`). Every pod passes the Pod
Security Standards' `restricted` profile (`pod_security_context`, `container_security_context`). Pods get the whole manifest in
env COPD_MANIFEST (`--manifest env:COPD_MANIFEST`: no ConfigMap to keep in sync)
and the run's storage mounted at spec.storage.path. Each entry point writes its
one-line JSON report to /dev/termination-log, which is how results come back.

Only stage pods get API credentials, and only for live progress: a projected
service-account token (short-lived, rotated by the kubelet), the cluster CA and the
namespace at the standard path, which the trainer uses to patch its own Branch's
`status.progress` (the shipped Role `copd-trainer` allows `patch` on `branches/status`).
Hub, diagnose and merge pods get no token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from copd_core.consolidation import StageWork
from copd_core.spec import CoPDRunSpec, ResourceSpec
from copd_operator.logic.naming import (
    ANNOTATION_RUN_UID,
    API_TOKEN_EXPIRATION_S,
    API_TOKEN_VOLUME,
    BRANCH_KIND,
    GROUP,
    HUB_PORT,
    LABEL_BRANCH,
    LABEL_COMPONENT,
    LABEL_CYCLE,
    LABEL_MANAGED,
    LABEL_RUN,
    LABEL_STAGE,
    MANAGER,
    MANIFEST_ENV,
    RUN_KIND,
    SA_DIR,
    STORAGE_VOLUME,
    TERMINATION_LOG,
    TRAINER_CONTAINER,
    VERSION,
    branch_cr_name,
    diagnose_job_name,
    hub_name,
    hub_network_policy_name,
    hub_port_for,
    merge_job_name,
    pvc_name,
    rendezvous_name,
    stage_job_name,
)

EXIT_BAD_INPUT = 2  # `copd` exits 2 for a bad manifest/arguments: retrying cannot help
EXIT_STORAGE_FULL = 3  # `copd stage` exits 3 when the run's storage is full (reason StorageFull): nor can it
TRAINER_UID = 65532  # the trainer image's user (trainer_image/Dockerfile: USER 65532:65532)
RDZV_PORT = 29400  # torchrun's c10d rendezvous store, on the stage's pod of index 0
SHM_VOLUME = "dshm"  # a memory-backed /dev/shm (NCCL, DataLoader workers): the runtime's default is 64Mi
R_NAME_CONFLICT = "NameConflict"  # a child's name is taken by an object another run (or someone) owns


@dataclass(frozen=True)
class OperatorConfig:
    """Flags that shape what the operator builds (main.py fills it)."""

    trainer_command: tuple[str, ...] = ("copd",)
    hub_address: str = "service"  # "service": <hub>.<ns>.svc:8000; "pod-ip": the hub pod's IP
    checkpoint_every: int = 2
    trainer_service_account: str = "copd-trainer"
    backoff_limit: int = 2
    extra_env: dict[str, str] = field(default_factory=dict)
    network_policy: bool = True  # a NetworkPolicy per run: only its trainers reach its hub


@dataclass(frozen=True)
class RunRef:
    """What builders need to know about the parent CoPDRun object."""

    name: str
    namespace: str
    uid: str
    spec: CoPDRunSpec

    @property
    def owner(self) -> dict:
        return owner_ref(RUN_KIND, self.name, self.uid)


def owner_ref(kind: str, name: str, uid: str) -> dict:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": kind, "name": name, "uid": uid,
            "controller": True, "blockOwnerDeletion": True}


def labels(run: str, component: str, **extra: object) -> dict[str, str]:
    out = {LABEL_MANAGED: MANAGER, LABEL_RUN: run, LABEL_COMPONENT: component}
    keys = {"branch": LABEL_BRANCH, "cycle": LABEL_CYCLE, "stage": LABEL_STAGE}
    out.update({keys[k]: str(v) for k, v in extra.items() if v is not None})
    return out


def pod_metadata(run: RunRef, lab: dict[str, str]) -> dict:
    """A pod's labels and annotations: spec.trainer.podLabels/podAnnotations, then the operator's own labels
    (the spec's validation refuses operator-owned keys; the operator's win here anyway)."""
    t = run.spec.trainer
    md: dict = {"labels": {**t.pod_labels, **lab}}
    if t.pod_annotations:
        md["annotations"] = dict(t.pod_annotations)
    return md


def manifest_json(run: RunRef) -> str:
    return json.dumps({
        "apiVersion": f"{GROUP}/{VERSION}", "kind": RUN_KIND,
        "metadata": {"name": run.name, "namespace": run.namespace},
        "spec": run.spec.model_dump(by_alias=True, exclude_none=True, mode="json"),
    }, separators=(",", ":"))


def claim_name(run: RunRef) -> str:
    return run.spec.storage.claim_name or pvc_name(run)


# ---------------------------------------------------------------------------
# Storage and Branch objects


def pvc_owner_refs(run: RunRef) -> list[dict]:
    """retainPolicy Delete: the run owns its claim (deleted with it); Retain: nobody does (it stays)."""
    return [run.owner] if run.spec.storage.retain_policy == "Delete" else []


def build_pvc(run: RunRef) -> dict:
    st = run.spec.storage
    spec = {"accessModes": [st.access_mode], "resources": {"requests": {"storage": st.size}}}
    if st.storage_class_name:
        spec["storageClassName"] = st.storage_class_name
    return {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        # the annotation names the run whatever the owner references say (a kept claim has none)
        "metadata": {"name": pvc_name(run), "namespace": run.namespace, "labels": labels(run.name, "storage"),
                     "annotations": {ANNOTATION_RUN_UID: run.uid}, "ownerReferences": pvc_owner_refs(run)},
        "spec": spec,
    }


def made_for(existing: dict, wanted: dict) -> bool | None:
    """Is `existing` (found under `wanted`'s name) the object we would have made, by owner?
    True/False where `wanted` names an owner (an owner reference's uid, else the run-uid annotation);
    None for shared children that no run owns (the trainer ServiceAccount, Events)."""
    md, emd = wanted.get("metadata") or {}, existing.get("metadata") or {}
    owners = {r["uid"] for r in md.get("ownerReferences") or []}
    if owners:
        return bool(owners & {r.get("uid") for r in emd.get("ownerReferences") or []})
    uid = (md.get("annotations") or {}).get(ANNOTATION_RUN_UID)
    if uid:
        return (emd.get("annotations") or {}).get(ANNOTATION_RUN_UID) == uid
    return None


def build_branch(run: RunRef, branch: str, cycle: int = 0, stage: str | None = None,
                 hub_url: str | None = None) -> dict:
    spec = {"run": run.name, "branch": branch, "cycle": cycle, "suspend": run.spec.suspend}
    if stage:
        spec["stage"] = stage
    if hub_url:
        spec["hubUrl"] = hub_url
    return {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": BRANCH_KIND,
        "metadata": {"name": branch_cr_name(run, branch), "namespace": run.namespace,
                     "labels": labels(run.name, "branch", branch=branch), "ownerReferences": [run.owner]},
        "spec": spec,
    }


# ---------------------------------------------------------------------------
# Pods


def _resources(r: ResourceSpec, gpu: bool = True) -> dict:
    amounts = {"cpu": r.cpu, "memory": r.memory}
    limits = dict(amounts)
    if gpu and r.gpu > 0:
        limits["nvidia.com/gpu"] = str(r.gpu)
    return {"requests": amounts, "limits": limits}


def _container(run: RunRef, cfg: OperatorConfig, args: list[str], resources: dict, ports: list | None = None) -> dict:
    spec = run.spec
    env = {MANIFEST_ENV: manifest_json(run), "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
           **cfg.extra_env, **spec.trainer.env}
    c = {
        "name": TRAINER_CONTAINER,
        "image": spec.trainer.image,
        "command": list(cfg.trainer_command),
        "args": args,
        "env": [{"name": k, "value": v} for k, v in env.items()],
        "resources": resources,
        "volumeMounts": [{"name": STORAGE_VOLUME, "mountPath": spec.storage.path}],
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if ports:
        c["ports"] = ports
    return c


def pod_security_context() -> dict:
    """Pod Security Standards `restricted`: non-root, RuntimeDefault seccomp. fsGroup makes the run's
    storage writable by the trainer's uid (OnRootMismatch: no recursive chown of a large claim each start)."""
    return {"runAsNonRoot": True, "runAsUser": TRAINER_UID, "runAsGroup": TRAINER_UID, "fsGroup": TRAINER_UID,
            "fsGroupChangePolicy": "OnRootMismatch", "seccompProfile": {"type": "RuntimeDefault"}}


def container_security_context() -> dict:
    """Pod Security Standards `restricted`: no privilege escalation, every capability dropped."""
    return {"allowPrivilegeEscalation": False, "privileged": False, "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}


def _pod_spec(run: RunRef, cfg: OperatorConfig, container: dict, restart: str) -> dict:
    t = run.spec.trainer
    container["securityContext"] = container_security_context()
    spec: dict = {
        "restartPolicy": restart,
        "serviceAccountName": cfg.trainer_service_account,
        # results travel in termination messages; only stage pods get a token (api_token_volume)
        "automountServiceAccountToken": False,
        "securityContext": pod_security_context(),
        "containers": [container],
        "volumes": [{"name": STORAGE_VOLUME, "persistentVolumeClaim": {"claimName": claim_name(run)}}],
    }
    if t.node_selector:
        spec["nodeSelector"] = dict(t.node_selector)
    if t.tolerations:
        spec["tolerations"] = [x.model_dump(by_alias=True, exclude_none=True) for x in t.tolerations]
    if t.priority_class_name:
        spec["priorityClassName"] = t.priority_class_name
    if t.image_pull_secrets:
        spec["imagePullSecrets"] = [{"name": n} for n in t.image_pull_secrets]
    return spec


def pod_failure_policy() -> dict:
    """A bad manifest/input (exit 2) or a full storage volume (exit 3) fails the Job at once; an eviction,
    preemption or drain (the pod's DisruptionTarget condition) is not counted against backoffLimit; anything
    else retries from the checkpoint."""
    return {"rules": [
        {"action": "FailJob", "onExitCodes": {
            "containerName": TRAINER_CONTAINER, "operator": "In", "values": [EXIT_BAD_INPUT, EXIT_STORAGE_FULL]}},
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
    ]}


def stage_deadline_s(spec: CoPDRunSpec, stage: str) -> int | None:
    """spec.failurePolicy.stageDeadlineSeconds for a stage: RL, OPD, Diagnose or Merge."""
    return getattr(spec.failure_policy.stage_deadline_seconds, stage.lower())


def _job(run: RunRef, cfg: OperatorConfig, name: str, lab: dict, owner: dict, container: dict,
         suspend: bool = False, deadline_s: int | None = None) -> dict:
    job = {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": name, "namespace": run.namespace, "labels": lab, "ownerReferences": [owner]},
        "spec": {
            "backoffLimit": cfg.backoff_limit,
            "suspend": suspend,
            "podFailurePolicy": pod_failure_policy(),
            "template": {
                "metadata": pod_metadata(run, lab),
                "spec": _pod_spec(run, cfg, container, "Never"),
            },
        },
    }
    if deadline_s:
        job["spec"]["activeDeadlineSeconds"] = deadline_s
    return job


def api_token_volume() -> dict:
    """What the kubelet would automount, for one pod only: a short-lived token of the pod's service
    account (default audience: the apiserver), the cluster CA and the pod's namespace."""
    return {"name": API_TOKEN_VOLUME, "projected": {"defaultMode": 0o644, "sources": [
        {"serviceAccountToken": {"path": "token", "expirationSeconds": API_TOKEN_EXPIRATION_S}},
        {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
        {"downwardAPI": {"items": [{"path": "namespace",
                                    "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}},
    ]}}


def trainer_processes(spec: CoPDRunSpec) -> int:
    """Processes per trainer pod: one per GPU (one on a CPU-only pod)."""
    return max(1, spec.trainer.resources.gpu)


def distributed(spec: CoPDRunSpec) -> bool:
    return trainer_processes(spec) > 1 or spec.trainer.nodes > 1


def torchrun_command(run: RunRef, cfg: OperatorConfig, job: str, branch: str) -> list[str]:
    """`torchrun` around the trainer command: one process per GPU of the pod; with nodes > 1 the pods
    meet at the c10d store on the pod of index 0 (`<job>-0.<rendezvous service>`); a pod lost or
    restarted makes every pod's agent restart its workers from the last checkpoint (all or nothing)."""
    t = run.spec.trainer
    cmd = ["torchrun", f"--nproc-per-node={trainer_processes(run.spec)}", f"--nnodes={t.nodes}"]
    if t.nodes > 1:
        host = f"{job}-0.{rendezvous_name(run, branch)}.{run.namespace}.svc"
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={host}:{RDZV_PORT}", f"--rdzv-id={job}",
                f"--max-restarts={cfg.backoff_limit}"]
    else:
        cmd += ["--standalone"]
    return [*cmd, "--no-python", *cfg.trainer_command]


def shm_volume() -> dict:
    return {"name": SHM_VOLUME, "emptyDir": {"medium": "Memory"}}


def build_rendezvous_service(run: RunRef, branch: str, branch_uid: str) -> dict:
    """Headless: gives each pod of a multi-pod stage Job a DNS name (`<job>-<index>.<service>`), ready or not."""
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": rendezvous_name(run, branch), "namespace": run.namespace,
                     "labels": labels(run.name, "rendezvous", branch=branch),
                     "ownerReferences": [owner_ref(BRANCH_KIND, branch_cr_name(run, branch), branch_uid)]},
        "spec": {"clusterIP": "None", "publishNotReadyAddresses": True,
                 "selector": {LABEL_RUN: run.name, LABEL_COMPONENT: "trainer", LABEL_BRANCH: branch},
                 "ports": [{"name": "rdzv", "port": RDZV_PORT, "targetPort": RDZV_PORT}]},
    }


def build_stage_job(run: RunRef, cfg: OperatorConfig, branch: str, branch_uid: str, cycle: int, stage: str,
                    hub_url: str | None = None, attempt: int = 0, suspend: bool | None = None,
                    work: StageWork | None = None) -> dict:
    """The trainer of one (branch, cycle, stage): `copd stage`, resuming from the newest checkpoint,
    reporting its progress live into its Branch's status (`--branch-object`, `--api-credentials`).

    More than one process (resources.gpu > 1 or trainer.nodes > 1): `torchrun` runs one `copd stage`
    per GPU (DeepSpeed ZeRO across them, global rank 0 reports), with a memory-backed /dev/shm;
    trainer.nodes > 1 makes it an Indexed Job of that many pods, found through the branch's headless
    rendezvous Service (`build_rendezvous_service`, created with the Job). `work` (schedule.mode
    adaptive): the branch's steps and OPD teachers this cycle, as the cycle decision planned them."""
    args = ["stage", "--manifest", f"env:{MANIFEST_ENV}", "--storage", run.spec.storage.path,
            "--branch", branch, "--cycle", str(cycle), "--stage", stage,
            "--checkpoint-every", str(cfg.checkpoint_every), "--report-file", TERMINATION_LOG,
            "--branch-object", branch_cr_name(run, branch), "--api-credentials", SA_DIR]
    if hub_url:
        # a replaced hub pod may have another address: trainers re-read it from the storage (hub.py)
        args += ["--hub-url", hub_url]
    if work is not None:
        args += ["--steps", str(work.steps)]
        if stage == "OPD":
            args += ["--teachers", ",".join(work.teachers)]
    lab = labels(run.name, "trainer", branch=branch, cycle=cycle, stage=stage)
    container = _container(run, cfg, args, _resources(run.spec.trainer.resources))
    container["volumeMounts"].append({"name": API_TOKEN_VOLUME, "mountPath": SA_DIR, "readOnly": True})
    name = stage_job_name(run, branch, cycle, stage, attempt)
    pod_volumes = [api_token_volume()]
    if distributed(run.spec) or run.spec.trainer.resources.gpu > 0:
        container["volumeMounts"].append({"name": SHM_VOLUME, "mountPath": "/dev/shm"})
        pod_volumes.append(shm_volume())
    if distributed(run.spec):
        container["command"] = torchrun_command(run, cfg, name, branch)
    job = _job(run, cfg, name, lab, owner_ref(BRANCH_KIND, branch_cr_name(run, branch), branch_uid), container,
               suspend=run.spec.suspend if suspend is None else suspend,
               deadline_s=stage_deadline_s(run.spec, stage))
    job["spec"]["template"]["spec"]["volumes"].extend(pod_volumes)
    nodes = run.spec.trainer.nodes
    if nodes > 1:
        job["spec"].update({"completionMode": "Indexed", "completions": nodes, "parallelism": nodes,
                            # one pod lost fails the attempt; the operator's replacement restarts them all
                            "backoffLimit": 0})
        job["spec"]["template"]["spec"]["subdomain"] = rendezvous_name(run, branch)
        container["ports"] = [{"name": "rdzv", "containerPort": RDZV_PORT}]
    return job


def build_diagnose_job(run: RunRef, cfg: OperatorConfig, cycle: int, attempt: int = 0,
                       suspend: bool = False) -> dict:
    args = ["diagnose", "--manifest", f"env:{MANIFEST_ENV}", "--storage", run.spec.storage.path,
            "--cycle", str(cycle), "--report-file", TERMINATION_LOG]
    container = _container(run, cfg, args, _resources(run.spec.trainer.hub_resources))
    return _job(run, cfg, diagnose_job_name(run, cycle, attempt), labels(run.name, "diagnose", cycle=cycle),
                run.owner, container, suspend=suspend, deadline_s=stage_deadline_s(run.spec, "Diagnose"))


def merged_path(spec: CoPDRunSpec) -> str:
    return spec.storage.path.rstrip("/") + "/merged"


def build_merge_job(run: RunRef, cfg: OperatorConfig, attempt: int = 0, suspend: bool = False) -> dict:
    args = ["merge", "--manifest", f"env:{MANIFEST_ENV}", "--storage", run.spec.storage.path,
            "--output", merged_path(run.spec), "--report-file", TERMINATION_LOG]
    container = _container(run, cfg, args, _resources(run.spec.trainer.hub_resources, gpu=False))
    return _job(run, cfg, merge_job_name(run, attempt), labels(run.name, "merge"), run.owner, container,
                suspend=suspend, deadline_s=stage_deadline_s(run.spec, "Merge"))


def hub_port(run: RunRef, cfg: OperatorConfig, cycle: int) -> int:
    return HUB_PORT if cfg.hub_address == "service" else hub_port_for(run.namespace, run.name, cycle)


def build_hub_pod(run: RunRef, cfg: OperatorConfig, cycle: int) -> dict:
    """`copd hub`: teachers frozen at the start of OPD of `cycle`; lives for that stage only."""
    port = hub_port(run, cfg, cycle)
    args = ["hub", "--manifest", f"env:{MANIFEST_ENV}", "--storage", run.spec.storage.path,
            "--cycle", str(cycle), "--port", str(port), "--host", "0.0.0.0",
            "--report-file", TERMINATION_LOG]  # bad input: exit 2 + an InvalidInput report (observe.py)
    lab = labels(run.name, "hub", cycle=cycle)
    container = _container(run, cfg, args, _resources(run.spec.trainer.hub_resources),
                           ports=[{"name": "hub", "containerPort": port}])
    container["readinessProbe"] = {"httpGet": {"path": "/readyz", "port": port}, "periodSeconds": 5}
    # the hub publishes http://<its pod IP>:<port> in the storage once listening; trainers re-read it
    container["env"].append({"name": "COPD_POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}})
    spec = _pod_spec(run, cfg, container, "Always")
    if run.spec.trainer.hub_resources.gpu > 0:
        container["volumeMounts"].append({"name": SHM_VOLUME, "mountPath": "/dev/shm"})
        spec["volumes"].append(shm_volume())
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": hub_name(run, cycle), "namespace": run.namespace, **pod_metadata(run, lab),
                     "ownerReferences": [run.owner]},
        "spec": spec,
    }


def build_hub_service(run: RunRef, cfg: OperatorConfig, cycle: int) -> dict:
    port = hub_port(run, cfg, cycle)
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": hub_name(run, cycle), "namespace": run.namespace,
                     "labels": labels(run.name, "hub", cycle=cycle), "ownerReferences": [run.owner]},
        "spec": {"selector": {LABEL_RUN: run.name, LABEL_COMPONENT: "hub", LABEL_CYCLE: str(cycle)},
                 "ports": [{"name": "hub", "port": port, "targetPort": port}]},
    }


def build_hub_network_policy(run: RunRef) -> dict:
    """Ingress to the run's hub pods (any cycle) only from the run's own trainer pods, only on the hub's
    port (by name: the port differs by cycle in pod-ip mode). Inert where the network plugin ignores it."""
    return {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": hub_network_policy_name(run), "namespace": run.namespace,
                     "labels": labels(run.name, "hub"), "ownerReferences": [run.owner]},
        "spec": {
            "podSelector": {"matchLabels": {LABEL_RUN: run.name, LABEL_COMPONENT: "hub"}},
            "policyTypes": ["Ingress"],
            "ingress": [{
                "from": [{"podSelector": {"matchLabels": {LABEL_RUN: run.name, LABEL_COMPONENT: "trainer"}}}],
                "ports": [{"protocol": "TCP", "port": "hub"}],
            }],
        },
    }


def hub_url(run: RunRef, cfg: OperatorConfig, cycle: int, pod_ip: str | None) -> str | None:
    """None while the address is not known yet (pod-ip mode, hub pod without an IP)."""
    port = hub_port(run, cfg, cycle)
    if cfg.hub_address == "service":
        return f"http://{hub_name(run, cycle)}.{run.namespace}.svc:{port}"
    return f"http://{pod_ip}:{port}" if pod_ip else None


def build_event(run: RunRef, type_: str, reason: str, message: str, now_iso: str, suffix: str) -> dict:
    return {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"name": f"{run.name}.{suffix}", "namespace": run.namespace},
        "involvedObject": {"apiVersion": f"{GROUP}/{VERSION}", "kind": RUN_KIND, "name": run.name,
                           "namespace": run.namespace, "uid": run.uid},
        "type": type_, "reason": reason, "message": message[:1024],
        "firstTimestamp": now_iso, "lastTimestamp": now_iso, "count": 1,
        "source": {"component": MANAGER}, "reportingComponent": MANAGER, "reportingInstance": MANAGER,
    }
