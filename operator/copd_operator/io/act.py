"""The only code that writes children: idempotent creates, merge patches, background deletes."""

from __future__ import annotations

import logging

from kubernetes.client.rest import ApiException

from copd_operator.io.gather import Apis
from copd_operator.logic.naming import BRANCH_PLURAL, GROUP, RUN_PLURAL, VERSION
from copd_operator.logic.plan import Create, Delete, Op, Patch

log = logging.getLogger("copd_operator.io.act")


def create(apis: Apis, namespace: str, obj: dict) -> dict | None:
    """Create; an object that already exists is fine (deterministic names). Returns the object."""
    kind = obj["kind"]
    try:
        if kind == "Branch":
            return apis.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, BRANCH_PLURAL, obj)
        call = {
            "Job": apis.batch.create_namespaced_job,
            "Pod": apis.core.create_namespaced_pod,
            "Service": apis.core.create_namespaced_service,
            "PersistentVolumeClaim": apis.core.create_namespaced_persistent_volume_claim,
            "ServiceAccount": apis.core.create_namespaced_service_account,
            "Event": apis.core.create_namespaced_event,
        }[kind]
        res = call(namespace, obj, _preload_content=False)
        log.info("created %s %s/%s", kind, namespace, obj["metadata"]["name"])
        return res
    except ApiException as e:
        if e.status == 409:
            return None
        raise


def patch(apis: Apis, namespace: str, op: Patch) -> None:
    try:
        if op.kind == "Branch":
            fn = (apis.custom.patch_namespaced_custom_object_status if op.status
                  else apis.custom.patch_namespaced_custom_object)
            fn(GROUP, VERSION, namespace, BRANCH_PLURAL, op.name, op.body)
        elif op.kind == "Job":
            apis.batch.patch_namespaced_job(op.name, namespace, op.body)
        else:
            raise ValueError(f"cannot patch {op.kind}")
    except ApiException as e:
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


def apply_ops(apis: Apis, namespace: str, ops: list[Op]) -> None:
    for op in ops:
        if isinstance(op, Create):
            create(apis, namespace, op.obj)
        elif isinstance(op, Patch):
            patch(apis, namespace, op)
        elif isinstance(op, Delete):
            delete(apis, namespace, op)


def write_run_status(apis: Apis, run: dict, status: dict) -> None:
    """PUT the whole status with the resourceVersion we read: a concurrent writer makes it 409."""
    body = {"apiVersion": run["apiVersion"], "kind": run["kind"], "metadata": run["metadata"],
            "spec": run.get("spec"), "status": status}
    md = run["metadata"]
    apis.custom.replace_namespaced_custom_object_status(GROUP, VERSION, md["namespace"], RUN_PLURAL, md["name"],
                                                        body)
