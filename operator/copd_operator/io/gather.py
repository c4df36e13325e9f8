"""The only code that reads the cluster: one CoPDRun and everything labelled with it -> Snapshot.

Children are listed by label `copd.io/run=<run>` and kept only when owned by this
very object (uid), so a run deleted and re-created under the same name never
sees its predecessor's children while the garbage collector removes them.
"""

from __future__ import annotations

import json

from kubernetes import client
from kubernetes.client.rest import ApiException

from copd_operator.logic.naming import (
    ANNOTATION_RUN_UID,
    BRANCH_PLURAL,
    GROUP,
    LABEL_RUN,
    RUN_PLURAL,
    VERSION,
    RunKey,
    pvc_name,
)
from copd_operator.logic.observe import Snapshot


class Apis:
    def __init__(self, api_client: client.ApiClient):
        self.api_client = api_client
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
    try:
        run = _raw(apis.custom.get_namespaced_custom_object, GROUP, VERSION, namespace, RUN_PLURAL, name)
    except ApiException as e:
        if e.status == 404:
            return None
        raise
    uid = run["metadata"]["uid"]
    sel = f"{LABEL_RUN}={name}"
    branches = {}
    for b in _raw(apis.custom.list_namespaced_custom_object, GROUP, VERSION, namespace, BRANCH_PLURAL,
                  label_selector=sel)["items"]:
        if _owned_by(b, {uid}):
            branches[b["spec"]["branch"]] = b
    owners = {uid} | {b["metadata"]["uid"] for b in branches.values()}
    jobs = {j["metadata"]["name"]: j
            for j in _raw(apis.batch.list_namespaced_job, namespace, label_selector=sel)["items"]
            if _owned_by(j, owners)}
    job_uids = {j["metadata"]["uid"] for j in jobs.values()}
    pods = [p for p in _raw(apis.core.list_namespaced_pod, namespace, label_selector=sel)["items"]
            if _owned_by(p, {uid} | job_uids)]
    services = {s["metadata"]["name"]: s
                for s in _raw(apis.core.list_namespaced_service, namespace, label_selector=sel)["items"]
                if _owned_by(s, {uid})}
    policies = {p["metadata"]["name"]: p
                for p in _raw(apis.networking.list_namespaced_network_policy, namespace, label_selector=sel)["items"]
                if _owned_by(p, {uid})} if network_policies else {}
    spec = run.get("spec") or {}
    storage = spec.get("storage") or {}
    claim = storage.get("claimName")
    snap = Snapshot(run=run, branches=branches, jobs=jobs, pods=pods, services=services,
                    network_policies=policies)
    if claim:
        snap.pvc_exists = _exists(apis.core.read_namespaced_persistent_volume_claim, claim, namespace)
        snap.claim_missing = None if snap.pvc_exists else claim
    else:
        # someone else's claim under our name is not ours: the create then meets it (NameConflict)
        snap.pvc = _claim_of(_read(apis.core.read_namespaced_persistent_volume_claim,
                                   pvc_name(RunKey.of(run)), namespace), uid)
        snap.pvc_exists = snap.pvc is not None
    pc = (spec.get("trainer") or {}).get("priorityClassName")
    if pc and not _exists(apis.scheduling.read_priority_class, pc):
        snap.priority_class_missing = pc
    snap.trainer_sa_exists = _exists(apis.core.read_namespaced_service_account, trainer_service_account,
                                     namespace)
    return snap


def read_run(apis: Apis, namespace: str, name: str) -> dict | None:
    """The CoPDRun alone (no children): what a status write that met a 409 compares against."""
    return _read(apis.custom.get_namespaced_custom_object, GROUP, VERSION, namespace, RUN_PLURAL, name)
