"""The only code that writes children: idempotent creates, merge patches, background deletes.

A create that meets an existing object (409) reads it: if it is ours (builders.made_for: the
owner we would have given it), the create is done; if another run or someone else owns it, the
name is taken: `NameConflict`, which `apply_ops` collects (the other ops still run) and the
reconcile reports as a Warning Event. Names hash the run's uid (naming.py), so this takes a
hand-made object under our name or a hash collision.
"""

from __future__ import annotations

import json
import logging

from kubernetes.client.rest import ApiException

from copd_operator.io.gather import Apis
from copd_operator.logic.builders import made_for
from copd_operator.logic.naming import (
    BRANCH_PLURAL,
    GROUP,
    KUEUE_GROUP,
    KUEUE_VERSION,
    RUN_PLURAL,
    VERSION,
    WORKLOAD_PLURAL,
)
from copd_operator.logic.plan import Create, Delete, Op, Patch

log = logging.getLogger("copd_operator.io.act")


class NameConflict(Exception):
    """A child's name is taken by an object this run does not own."""

    def __init__(self, kind: str, name: str, owners: list[dict]):
        self.kind, self.name = kind, name
        held = ", ".join(f"{r.get('kind')} {r.get('name')}" for r in owners) or "no owner of ours"
        super().__init__(f"{kind} {name!r} already exists and belongs to {held}, not this run: "
                         f"delete or rename it")


def _read(apis: Apis, namespace: str, kind: str, name: str) -> dict | None:
    try:
        if kind == "Branch":
            return apis.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, BRANCH_PLURAL, name)
        if kind == "Workload":
            return apis.custom.get_namespaced_custom_object(KUEUE_GROUP, KUEUE_VERSION, namespace,
                                                            WORKLOAD_PLURAL, name)
        read = {
            "Job": apis.batch.read_namespaced_job,
            "Pod": apis.core.read_namespaced_pod,
            "Service": apis.core.read_namespaced_service,
            "PersistentVolumeClaim": apis.core.read_namespaced_persistent_volume_claim,
            "NetworkPolicy": apis.networking.read_namespaced_network_policy,
        }[kind]
        return json.loads(read(name, namespace, _preload_content=False).data)
    except ApiException as e:
        if e.status == 404:
            return None  # gone since the 409 (being deleted): the next reconcile creates it
        raise


def _remember(apis: Apis, kind: str, res) -> None:
    """Fold the apiserver's answer to our write into the informers' index (read-your-writes)."""
    if apis.index is None or res is None:
        return
    if hasattr(res, "data"):
        try:
            res = json.loads(res.data)
        except (TypeError, ValueError):
            return
    apis.index.remember(kind, res)


def create(apis: Apis, namespace: str, obj: dict) -> dict | None:
    """Create; an object of ours that already exists is fine (deterministic names). Returns the object.
    Raises NameConflict when the name is taken by an object we did not make."""
    kind = obj["kind"]
    try:
        if kind == "Branch":
            res = apis.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, BRANCH_PLURAL, obj)
            _remember(apis, kind, res)
            return res
        if kind == "Workload":  # not in the informers' index (gather lists a queued run's Workloads)
            res = apis.custom.create_namespaced_custom_object(KUEUE_GROUP, KUEUE_VERSION, namespace,
                                                              WORKLOAD_PLURAL, obj)
            log.info("created Workload %s/%s", namespace, obj["metadata"]["name"])
            return res
        call = {
            "Job": apis.batch.create_namespaced_job,
            "Pod": apis.core.create_namespaced_pod,
            "Service": apis.core.create_namespaced_service,
            "PersistentVolumeClaim": apis.core.create_namespaced_persistent_volume_claim,
            "NetworkPolicy": apis.networking.create_namespaced_network_policy,
            "ServiceAccount": apis.core.create_namespaced_service_account,
            "Event": apis.core.create_namespaced_event,
        }[kind]
        res = call(namespace, obj, _preload_content=False)
        _remember(apis, kind, res)
        log.info("created %s %s/%s", kind, namespace, obj["metadata"]["name"])
        return res
    except ApiException as e:
        if e.status != 409:
            raise
    if kind in ("ServiceAccount", "Event"):
        return None  # shared by every run of the namespace / best effort
    existing = _read(apis, namespace, kind, obj["metadata"]["name"])
    if existing is None or made_for(existing, obj) is not False:
        return None
    raise NameConflict(kind, obj["metadata"]["name"], existing["metadata"].get("ownerReferences") or [])


def patch(apis: Apis, namespace: str, op: Patch) -> None:
    try:
        if op.kind == "Branch":
            fn = (apis.custom.patch_namespaced_custom_object_status if op.status
                  else apis.custom.patch_namespaced_custom_object)
            _remember(apis, op.kind, fn(GROUP, VERSION, namespace, BRANCH_PLURAL, op.name, op.body))
        elif op.kind == "Workload":
            fn = (apis.custom.patch_namespaced_custom_object_status if op.status
                  else apis.custom.patch_namespaced_custom_object)
            fn(KUEUE_GROUP, KUEUE_VERSION, namespace, WORKLOAD_PLURAL, op.name, op.body)
            log.info("patched Workload %s/%s%s", namespace, op.name, " status" if op.status else "")
        elif op.kind == "Job":
            _remember(apis, op.kind, apis.batch.patch_namespaced_job(op.name, namespace, op.body,
                                                                     _preload_content=False))
        elif op.kind == "PersistentVolumeClaim":
            _remember(apis, op.kind, apis.core.patch_namespaced_persistent_volume_claim(
                op.name, namespace, op.body, _preload_content=False))
        else:
            raise ValueError(f"cannot patch {op.kind}")
    except ApiException as e:
        if e.status == 409 and op.conflict_ok:
            log.info("%s %s/%s changed since it was read: the next reconcile looks again", op.kind, namespace,
                     op.name)
            return
        if e.status != 404:
            raise


def delete(apis: Apis, namespace: str, op: Delete) -> None:
    call = {"Job": apis.batch.delete_namespaced_job, "Pod": apis.core.delete_namespaced_pod,
            "Service": apis.core.delete_namespaced_service}[op.kind]
    try:
        call(op.name, namespace, propagation_policy="Background")
        log.info("deleted %s %s/%s", op.kind, namespace, op.name)
    except ApiException as e:
        if e.status != 404:
            raise


def _apply_one(apis: Apis, namespace: str, op: Op) -> NameConflict | None:
    if isinstance(op, Create):
        try:
            create(apis, namespace, op.obj)
        except NameConflict as e:
            log.warning("%s: %s", namespace, e)
            return e
    elif isinstance(op, Patch):
        patch(apis, namespace, op)
    elif isinstance(op, Delete):
        delete(apis, namespace, op)
    return None


def _first(op: Op) -> bool:
    """Ops that must be done before the others start: the hub's NetworkPolicy exists before its pod."""
    return isinstance(op, Create) and op.obj.get("kind") == "NetworkPolicy"


def apply_ops(apis: Apis, namespace: str, ops: list[Op]) -> list[NameConflict]:
    """Apply every op; returns the name conflicts met (the other ops still ran).

    The ops of one plan are independent (a Job whose Branch is created in the same plan waits for
    the next one), so with `apis.pool` (an executor) they go out at once and a stage transition costs
    about one round trip instead of one per child; every op is waited for, then the first error raised."""
    pool = getattr(apis, "pool", None)
    first = [op for op in ops if _first(op)]
    rest = [op for op in ops if not _first(op)]
    results = [_apply_one(apis, namespace, op) for op in first]
    if pool is None or len(rest) < 2:
        results += [_apply_one(apis, namespace, op) for op in rest]
    else:
        futures = [pool.submit(_apply_one, apis, namespace, op) for op in rest]
        errors = []
        for f in futures:
            try:
                results.append(f.result())
            except Exception as e:  # noqa: BLE001 - re-raised below, once every op has ended
                errors.append(e)
        if errors:
            raise errors[0]
    return [c for c in results if c is not None]


def write_run_status(apis: Apis, run: dict, status: dict) -> dict:
    """PUT the whole status with the resourceVersion we read: a concurrent writer makes it 409."""
    body = {"apiVersion": run["apiVersion"], "kind": run["kind"], "metadata": run["metadata"],
            "spec": run.get("spec"), "status": status}
    md = run["metadata"]
    return apis.custom.replace_namespaced_custom_object_status(GROUP, VERSION, md["namespace"], RUN_PLURAL,
                                                               md["name"], body)


def patch_run_conditions(apis: Apis, namespace: str, name: str, conditions: list[dict]) -> dict:
    """Merge-patch the run's status.conditions (the whole list), without a resourceVersion: how a reconcile
    that raised after its status write records the error (reconcile.py). Returns the patched run."""
    return apis.custom.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, RUN_PLURAL, name,
                                                      {"status": {"conditions": conditions}})
