"""Thin kopf handlers: every watch event about a run enqueues (namespace, run).

kopf watches the CoPDRuns only. The children (Branches, Jobs, Pods, Services, NetworkPolicies,
claims) are watched by the operator's informers (io/informer.py) with a server-side label selector
(`copd.io/run`), which feed the index the reconciles read and enqueue the run a child belongs to;
kopf's own `labels=` filters are applied client-side, after the apiserver has sent every object.
A run's status write by the reconcile itself comes back as a watch event: skipped (`Reconciler.wrote`).
Every event's object also goes into the index, from which the reconcile reads its run (no GET).

No handler changes any object, so kopf writes nothing to CoPDRuns (no finalizer,
no progress annotations); the reconcile itself lives in reconcile.py and runs on
the work queue's threads. Everything a handler needs is the OperatorRuntime that
main passes to kopf.run as `memo=kopf.Memo(runtime=...)` (kopf hands it to every
handler as the `memo` kwarg; per-object memos are shallow copies: the same runtime).
"""

from __future__ import annotations

import kopf

from copd_operator.io.informer import RUN_KIND
from copd_operator.logic.naming import (
    GROUP,
    KUEUE_GROUP,
    KUEUE_VERSION,
    LABEL_RUN,
    RUN_PLURAL,
    VERSION,
    WORKLOAD_PLURAL,
)
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


@kopf.on.login()
async def login(memo: kopf.Memo, **kwargs) -> kopf.AiohttpSession | None:
    """kopf's default login (the kubernetes client's kubeconfig or in-cluster credentials), with its
    requests counted in copd_api_requests_total: the same connection, in an aiohttp session that
    carries our TraceConfig (kopf's documented custom-session hook; kopf closes it on re-login)."""
    import warnings

    import aiohttp

    from copd_operator.io.apiclient import aiohttp_counter

    info = kopf.login_via_client(**kwargs)
    if info is None:
        return None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        auth = info.as_aiohttp_basic_auth()
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, ssl=info.as_ssl_context()),
        headers=info.as_http_headers(), auth=auth, proxy=info.proxy_url, trust_env=info.trust_env,
        trace_configs=[aiohttp_counter(runtime_of(memo).reconciler.metrics.api_request)])
    return kopf.AiohttpSession(aiohttp_session=session, server=info.server,
                               default_namespace=info.default_namespace, priority=info.priority,
                               expiration=info.expiration)


@kopf.on.cleanup()
def cleanup(memo: kopf.Memo, **_) -> None:
    # workers stop, in-flight reconciles finish, then the Lease is released (main repeats this
    # after kopf.run returns, in case this handler was cut short)
    runtime_of(memo).shutdown()


@kopf.on.event(GROUP, VERSION, RUN_PLURAL)
def run_event(type: str | None, name: str, namespace: str, body: kopf.Body, memo: kopf.Memo,
              event: dict | None = None, **_) -> None:
    rt = runtime_of(memo)
    key = (namespace, name)
    index = getattr(rt.reconciler.apis, "index", None)
    raw = (event or {}).get("object")
    if index is not None and isinstance(raw, dict) and (raw.get("metadata") or {}).get("name"):
        # the reconcile reads its run from here (no GET); an older copy than the one held is ignored
        (index.remove if type == "DELETED" else index.upsert)(RUN_KIND, raw)
    if type == "DELETED":
        rt.reconciler.metrics.forget_run(namespace, name)
        rt.queue.add(key, delay=1.0)  # a reconcile racing the delete sees 404, forgets series and key
        return
    if rt.reconciler.wrote(namespace, name, body.get("metadata", {}).get("resourceVersion")):
        return  # the echo of our own status write: that reconcile has seen everything it holds
    rt.queue.add(key)


@kopf.on.event(KUEUE_GROUP, KUEUE_VERSION, WORKLOAD_PLURAL, labels={LABEL_RUN: kopf.PRESENT})
def workload_event(labels: dict, namespace: str, memo: kopf.Memo, **_) -> None:
    """Kueue admitted or evicted a queued run's stage (its Workload, logic/queueing.py). Not in the informers'
    index: only queued runs have Workloads, and kopf skips this watch where Kueue is not installed."""
    run = (labels or {}).get(LABEL_RUN)
    if run:
        runtime_of(memo).queue.add((namespace, run))
