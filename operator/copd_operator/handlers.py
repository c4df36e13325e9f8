"""Thin kopf handlers: every watch event about a run or its children enqueues (namespace, run).

No handler changes any object, so kopf writes nothing to CoPDRuns (no finalizer,
no progress annotations); the reconcile itself lives in reconcile.py and runs on
the work queue's threads.
"""

from __future__ import annotations

import logging

import kopf
from kubernetes.client.rest import ApiException

from copd_operator.control.workqueue import Key, Workers, WorkQueue
from copd_operator.logic.naming import GROUP, LABEL_RUN, RUN_PLURAL, VERSION
from copd_operator.reconcile import Conflict, Reconciler

log = logging.getLogger("copd_operator")

# Filled by main.configure() before kopf starts.
STATE: dict = {}


def _queue() -> WorkQueue:
    return STATE["queue"]


@kopf.on.startup()
def startup(settings: kopf.OperatorSettings, **_) -> None:
    settings.peering.standalone = True
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="copd.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="copd.io")
    settings.posting.enabled = False  # our Events come from reconcile, not from kopf's logs
    settings.watching.server_timeout = 300
    reconciler: Reconciler = STATE["reconciler"]

    def work(key: Key) -> bool:
        return reconciler.reconcile(*key)

    def on_error(key: Key, err: BaseException) -> float:
        if isinstance(err, Conflict):
            return 0.2
        kind = type(err).__name__ if not isinstance(err, ApiException) else f"ApiException{err.status}"
        reconciler.metrics.reconcile_errors.labels(kind).inc()
        log.exception("reconcile %s/%s failed", *key, exc_info=err)
        return 2.0

    workers = Workers(_queue(), work, STATE["workers"], STATE["resync_s"], on_error)
    STATE["worker_threads"] = workers
    elector = STATE.get("elector")
    if elector is None:
        workers.start()
    else:  # leader election (leader.py): only the Lease holder runs workers and resync
        elector.on_started_leading = workers.start
        elector.start()


@kopf.on.cleanup()
def cleanup(**_) -> None:
    if "worker_threads" in STATE:
        STATE["worker_threads"].stop()
    if STATE.get("elector") is not None:
        for t in getattr(STATE.get("worker_threads"), "_threads", []):
            if t.ident is not None:
                t.join(timeout=5)  # let an in-flight reconcile finish before another leader may start
        STATE["elector"].release()


@kopf.on.event(GROUP, VERSION, RUN_PLURAL)
def run_event(type: str | None, name: str, namespace: str, **_) -> None:
    key = (namespace, name)
    if type == "DELETED":
        STATE["reconciler"].metrics.forget_run(namespace, name)
        _queue().add(key, delay=1.0)  # a reconcile racing the delete sees 404, forgets series and key
        return
    _queue().add(key)


def _child_event(labels: dict, namespace: str, **_) -> None:
    run = (labels or {}).get(LABEL_RUN)
    if run:
        _queue().add((namespace, run))


kopf.on.event("batch", "v1", "jobs", labels={LABEL_RUN: kopf.PRESENT})(_child_event)
kopf.on.event("", "v1", "pods", labels={LABEL_RUN: kopf.PRESENT})(_child_event)
