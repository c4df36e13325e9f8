"""Thin kopf handlers: every watch event about a run or its children enqueues (namespace, run).

No handler changes any object, so kopf writes nothing to CoPDRuns (no finalizer,
no progress annotations); the reconcile itself lives in reconcile.py and runs on
the work queue's threads. Everything a handler needs is the OperatorRuntime that
main passes to kopf.run as `memo=kopf.Memo(runtime=...)` (kopf hands it to every
handler as the `memo` kwarg; per-object memos are shallow copies: the same runtime).
"""

from __future__ import annotations

import kopf

from copd_operator.logic.naming import BRANCH_PLURAL, GROUP, LABEL_RUN, RUN_PLURAL, VERSION
from copd_operator.runtime import OperatorRuntime


def runtime_of(memo: kopf.Memo) -> OperatorRuntime:
    return memo.runtime


@kopf.on.startup()
def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_) -> None:
    settings.peering.standalone = True
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="copd.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="copd.io")
    settings.posting.enabled = False  # our Events come from reconcile, not from kopf's logs
    settings.watching.server_timeout = 300
    runtime_of(memo).start()


@kopf.on.cleanup()
def cleanup(memo: kopf.Memo, **_) -> None:
    # workers stop, in-flight reconciles finish, then the Lease is released (main repeats this
    # after kopf.run returns, in case this handler was cut short)
    runtime_of(memo).shutdown()


@kopf.on.event(GROUP, VERSION, RUN_PLURAL)
def run_event(type: str | None, name: str, namespace: str, memo: kopf.Memo, **_) -> None:
    rt = runtime_of(memo)
    key = (namespace, name)
    if type == "DELETED":
        rt.reconciler.metrics.forget_run(namespace, name)
        rt.queue.add(key, delay=1.0)  # a reconcile racing the delete sees 404, forgets series and key
        return
    rt.queue.add(key)


def _child_event(labels: dict, namespace: str, memo: kopf.Memo, **_) -> None:
    run = (labels or {}).get(LABEL_RUN)
    if run:
        runtime_of(memo).queue.add((namespace, run))


kopf.on.event("batch", "v1", "jobs", labels={LABEL_RUN: kopf.PRESENT})(_child_event)
# Branches: a trainer's live status.progress is folded into the Branch's step at once (not at the next resync)
kopf.on.event(GROUP, VERSION, BRANCH_PLURAL, labels={LABEL_RUN: kopf.PRESENT})(_child_event)
kopf.on.event("", "v1", "pods", labels={LABEL_RUN: kopf.PRESENT})(_child_event)
