"""The only code that reads the cluster: one CoPDRun and everything labelled with it -> Snapshot.

Children are those labelled `copd.io/run=<run>`, kept only when owned by this
very object (uid), so a run deleted and re-created under the same name never
sees its predecessor's children while the garbage collector removes them.

Where they come from: the informers' index (io/informer.py, fed by watches) once it
has synced, the run included (fed by kopf's watch of the runs), so a steady-state reconcile
reads nothing from the apiserver: no GET, no LIST; before
that (start-up) and without an index (tests, tools), one LIST per kind. Objects outside
the run's labels are checked with a short-lived cache of positive answers (`Ttl`): a
PriorityClass, the shared trainer ServiceAccount, a claim named in spec.storage.claimName.
A missing one is asked again each time (the run is Blocked until it exists).
"""

from __future__ import annotations

import json
import threading
import time

from kubernetes import client
from kubernetes.client.rest import ApiException

from copd_operator.io.informer import RUN_KIND
from copd_operator.logic.naming import (
    ANNOTATION_RUN_UID,
    BRANCH_PLURAL,
    GROUP,
    KUEUE_GROUP,
    KUEUE_VERSION,
    LABEL_RUN,
    LOCAL_QUEUE_PLURAL,
    PRIORITY_LABEL,
    RUN_PLURAL,
    VERSION,
    WORKLOAD_PLURAL,
    WORKLOAD_PRIORITY_CLASS_PLURAL,
    RunKey,
    pvc_name,
)
from copd_operator.logic.observe import Snapshot
from copd_operator.logic.queueing import KueueView, queue_of

EXISTS_TTL_S = 60.0  # how long a seen PriorityClass / ServiceAccount / named claim is taken to still exist


class Ttl:
    """Positive answers of existence checks, kept for `ttl_s`. Thread-safe."""

    def __init__(self, ttl_s: float = EXISTS_TTL_S, clock=time.monotonic):
        self.ttl_s, self.clock = ttl_s, clock
        self._seen: dict[tuple, float] = {}
        self._lock = threading.Lock()

    def fresh(self, key: tuple) -> bool:
        with self._lock:
            t = self._seen.get(key)
            return t is not None and self.clock() - t < self.ttl_s

    def saw(self, key: tuple) -> None:
        with self._lock:
            self._seen[key] = self.clock()

    def forget(self, key: tuple) -> None:
        with self._lock:
            self._seen.pop(key, None)


class Apis:
    def __init__(self, api_client: client.ApiClient, index=None, pool=None):
        self.api_client = api_client
        self.index = index  # informer.ChildIndex, or None: LIST every time
        self.pool = pool  # a concurrent.futures executor: one plan's writes go out at once (act.apply_ops)
        self.exists_cache = Ttl()
        self.core = client.CoreV1Api(api_client)
        self.batch = client.BatchV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self.scheduling = client.SchedulingV1Api(api_client)
        self.networking = client.NetworkingV1Api(api_client)


def _raw(call, *args, **kw) -> dict:
    resp = call(*args, _preload_content=False, **kw)
    return json.loads(resp.data)


def _exists(call, *args) -> bool:
    try:
        call(*args, _preload_content=False)
        return True
    except ApiException as e:
        if e.status == 404:
            return False
        raise


def _exists_cached(apis: Apis, key: tuple, call, *args) -> bool:
    if apis.exists_cache.fresh(key):
        return True
    if _exists(call, *args):
        apis.exists_cache.saw(key)
        return True
    return False


def _owned_by(obj: dict, uids: set[str]) -> bool:
    return any(r.get("uid") in uids for r in obj["metadata"].get("ownerReferences") or [])


def _read(call, *args) -> dict | None:
    try:
        return _raw(call, *args)
    except ApiException as e:
        if e.status == 404:
            return None
        raise


def _claim_of(pvc: dict | None, uid: str) -> dict | None:
    """The operator-made claim, if it is this run's (owned, or annotated when kept by retainPolicy Retain)."""
    if pvc is None:
        return None
    ours = _owned_by(pvc, {uid}) or (pvc["metadata"].get("annotations") or {}).get(ANNOTATION_RUN_UID) == uid
    return pvc if ours else None


def gather(apis: Apis, namespace: str, name: str, trainer_service_account: str,
           network_policies: bool = True) -> Snapshot | None:
    idx = apis.index if apis.index is not None and apis.index.synced() else None
    run = idx.get(RUN_KIND, namespace, name) if idx is not None else None
    if run is None:  # not seen by the watch yet (or forgotten after a 409): ask
        try:
            run = _raw(apis.custom.get_namespaced_custom_object, GROUP, VERSION, namespace, RUN_PLURAL, name)
        except ApiException as e:
            if e.status == 404:
                return None
            raise
    uid = run["metadata"]["uid"]
    if idx is not None:
        def children(kind: str) -> list[dict]:
            return idx.children(kind, namespace, name)
    else:
        sel = f"{LABEL_RUN}={name}"
        lists = {
            "Branch": lambda: apis.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, BRANCH_PLURAL,
                                                                        label_selector=sel, _preload_content=False),
            "Job": lambda: apis.batch.list_namespaced_job(namespace, label_selector=sel, _preload_content=False),
            "Pod": lambda: apis.core.list_namespaced_pod(namespace, label_selector=sel, _preload_content=False),
            "Service": lambda: apis.core.list_namespaced_service(namespace, label_selector=sel,
                                                                 _preload_content=False),
            "NetworkPolicy": lambda: apis.networking.list_namespaced_network_policy(
                namespace, label_selector=sel, _preload_content=False),
        }

        def children(kind: str) -> list[dict]:
            return json.loads(lists[kind]().data)["items"]
    branches = {}
    for b in children("Branch"):
        if _owned_by(b, {uid}):
            branches[b["spec"]["branch"]] = b
    owners = {uid} | {b["metadata"]["uid"] for b in branches.values()}
    jobs = {j["metadata"]["name"]: j for j in children("Job") if _owned_by(j, owners)}
    job_uids = {j["metadata"]["uid"] for j in jobs.values()}
    pods = [p for p in children("Pod") if _owned_by(p, {uid} | job_uids)]
    services = {s["metadata"]["name"]: s for s in children("Service") if _owned_by(s, {uid})}
    policies = {p["metadata"]["name"]: p for p in children("NetworkPolicy")
                if _owned_by(p, {uid})} if network_policies else {}
    spec = run.get("spec") or {}
    storage = spec.get("storage") or {}
    claim = storage.get("claimName")
    snap = Snapshot(run=run, branches=branches, jobs=jobs, pods=pods, services=services,
                    network_policies=policies)
    if claim:
        snap.pvc_exists = _exists_cached(apis, ("pvc", namespace, claim),
                                         apis.core.read_namespaced_persistent_volume_claim, claim, namespace)
        snap.claim_missing = None if snap.pvc_exists else claim
    else:
        # someone else's claim under our name is not ours: the create then meets it (NameConflict)
        own = pvc_name(RunKey.of(run))
        found = idx.get("PersistentVolumeClaim", namespace, own) if idx is not None else \
            _read(apis.core.read_namespaced_persistent_volume_claim, own, namespace)
        snap.pvc = _claim_of(found, uid)
        snap.pvc_exists = snap.pvc is not None
    pc = (spec.get("trainer") or {}).get("priorityClassName")
    if pc and not _exists_cached(apis, ("priorityclass", pc), apis.scheduling.read_priority_class, pc):
        snap.priority_class_missing = pc
    snap.trainer_sa_exists = _exists_cached(apis, ("serviceaccount", namespace, trainer_service_account),
                                            apis.core.read_namespaced_service_account, trainer_service_account,
                                            namespace)
    queue = queue_of(run)
    if queue:  # a queued run: its Workloads (listed: not in the informers' index), LocalQueue, priority
        snap.kueue = gather_kueue(apis, namespace, run, queue, f"{LABEL_RUN}={name}", pc)
    return snap


def read_run(apis: Apis, namespace: str, name: str) -> dict | None:
    """The CoPDRun alone (no children): what a status write that met a 409 compares against."""
    return _read(apis.custom.get_namespaced_custom_object, GROUP, VERSION, namespace, RUN_PLURAL, name)


def gather_kueue(apis: Apis, namespace: str, run: dict, queue: str, sel: str, pc: str | None) -> KueueView:
    """A queued run's Workloads (owned by it), whether its LocalQueue exists, and its priority: the
    WorkloadPriorityClass its label kueue.x-k8s.io/priority-class names, else spec.trainer.priorityClassName."""
    uid = run["metadata"]["uid"]
    try:
        items = _raw(apis.custom.list_namespaced_custom_object, KUEUE_GROUP, KUEUE_VERSION, namespace,
                     WORKLOAD_PLURAL, label_selector=sel)["items"]
    except ApiException as e:
        if e.status == 404:  # Kueue's CRDs are not installed
            return KueueView(queue, {}, local_queue_exists=False, kueue_installed=False)
        raise
    workloads = {w["metadata"]["name"]: w for w in items if _owned_by(w, {uid})}
    lq = _read(apis.custom.get_namespaced_custom_object, KUEUE_GROUP, KUEUE_VERSION, namespace,
               LOCAL_QUEUE_PLURAL, queue)
    priority, ref = None, None
    wpc = ((run["metadata"].get("labels") or {}).get(PRIORITY_LABEL))
    if wpc:
        obj = _read(apis.custom.get_cluster_custom_object, KUEUE_GROUP, KUEUE_VERSION,
                    WORKLOAD_PRIORITY_CLASS_PLURAL, wpc)
        if obj is not None:
            priority = int(obj.get("value", 0))
            ref = {"group": KUEUE_GROUP, "kind": "WorkloadPriorityClass", "name": wpc}
    elif pc and (pc_obj := _read(apis.scheduling.read_priority_class, pc)) is not None:
        priority = int(pc_obj.get("value", 0))
        ref = {"group": "scheduling.k8s.io", "kind": "PriorityClass", "name": pc_obj["metadata"]["name"]}
    return KueueView(queue, workloads, local_queue_exists=lq is not None, priority=priority,
                     priority_class_ref=ref)
