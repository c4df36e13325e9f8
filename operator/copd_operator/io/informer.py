"""An in-memory index of every run's children, fed by watch streams with a server-side label selector.

    Informer(kind, namespace)  one thread: LIST ?labelSelector=copd.io/run, then WATCH from its
                               resourceVersion (bookmarks on; a 410 Gone lists again); every event
                               updates the ChildIndex and enqueues the run its label names
    ChildIndex                 (kind, namespace, run label) -> objects, thread-safe; `synced()` once
                               every informer has listed, so a reconcile reads children from memory
                               (gather.py) instead of making four to six LISTs

Only objects labelled `copd.io/run` travel (the apiserver filters, not the operator), so an
operator watching every namespace does not stream the cluster's other Pods and Jobs. Objects are
stored without `metadata.managedFields` and, for Pods and Jobs, without the pod template/spec the
reconcile never reads, which keeps the index a few KB per child.

The CoPDRuns themselves are held too (kind CoPDRun), fed by kopf's watch of the runs, so a
reconcile reads its run from memory as well: no request at all until it writes.

Writes the reconcile makes are folded in at once from the apiserver's answer (`remember`), so the
next reconcile does not plan a create again before the watch event arrives; a stale read is still
safe (creates are idempotent, a 409 of our own object is success), merely one request more.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from kubernetes.client.rest import ApiException
from kubernetes.watch.watch import iter_resp_lines

from copd_operator.logic.naming import BRANCH_PLURAL, GROUP, LABEL_RUN, VERSION

log = logging.getLogger("copd_operator.informer")

KINDS = ("Branch", "Job", "Pod", "Service", "NetworkPolicy", "PersistentVolumeClaim")
RUN_KIND = "CoPDRun"  # also held, fed by kopf's watch of the runs (handlers.run_event), not by an informer
WATCH_TIMEOUT_S = 300  # the server ends each watch after this; the informer resumes from its resourceVersion
RETRY_S = (0.5, 1, 2, 5, 10)

Obj = dict
RunKey = tuple[str, str]  # (namespace, run label)


POD_STATUS_KEPT = frozenset({"phase", "podIP", "conditions", "containerStatuses", "reason", "message", "startTime"})
CONTAINER_STATUS_KEPT = frozenset({"name", "state", "lastState", "restartCount"})
INTERN_MAX = 48  # string values up to this long are interned (states, reasons, label values, names)


def compact(o):
    """A copy with every dict key and every short string value interned: thousands of children repeat
    the same keys and values, which json.loads otherwise allocates again for every object (per watch
    event)."""
    if isinstance(o, dict):
        return {sys.intern(k): compact(v) for k, v in o.items()}
    if isinstance(o, list):
        return [compact(v) for v in o]
    if isinstance(o, str) and len(o) <= INTERN_MAX:
        return sys.intern(o)
    return o


def slim(kind: str, obj: Obj) -> Obj:
    """What the reconcile reads of a child (observe/plan): metadata without managedFields, the few spec
    fields it looks at, and the status (of a Pod: its phase, IP, conditions and what each container's
    state says, its termination message included), compacted."""
    md = {k: v for k, v in (obj.get("metadata") or {}).items() if k != "managedFields"}
    out = {"apiVersion": obj.get("apiVersion"), "kind": obj.get("kind") or kind, "metadata": md}
    spec, status = obj.get("spec"), obj.get("status")
    if kind == "Pod":
        spec = {k: v for k, v in (spec or {}).items() if k in ("nodeName",)}
        if status is not None:
            status = {k: v for k, v in status.items() if k in POD_STATUS_KEPT}
            if "containerStatuses" in status:
                status["containerStatuses"] = [{k: v for k, v in cs.items() if k in CONTAINER_STATUS_KEPT}
                                               for cs in status["containerStatuses"] or []]
    elif kind == "Job":
        spec = {k: v for k, v in (spec or {}).items() if k != "template"}
    if spec is not None:
        out["spec"] = spec
    if status is not None:
        out["status"] = status
    return compact(out)


def _rv(obj: Obj) -> int | None:
    try:
        return int(obj["metadata"]["resourceVersion"])
    except (KeyError, TypeError, ValueError):
        return None


class ChildIndex:
    """Children by kind, namespace and the run they are labelled with. Thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self._objs: dict[str, dict[tuple[str, str], Obj]] = {k: {} for k in (*KINDS, RUN_KIND)}
        self._by_run: dict[str, dict[RunKey, set[str]]] = {k: {} for k in (*KINDS, RUN_KIND)}
        self._expected: set[tuple[str, str | None]] = set()  # (kind, namespace or None) informers
        self._synced: set[tuple[str, str | None]] = set()

    # -- sync state

    def expect(self, kind: str, namespace: str | None) -> None:
        with self._lock:
            self._expected.add((kind, namespace))

    def synced(self) -> bool:
        """True once every informer registered with `expect` has listed at least once."""
        with self._lock:
            return bool(self._expected) and self._expected <= self._synced

    # -- writes (informers, and the reconcile's own writes)

    def _put(self, kind: str, obj: Obj) -> None:
        md = obj["metadata"]
        key = (md["namespace"], md["name"])
        old = self._objs[kind].get(key)
        if old is not None:
            o, n = _rv(old), _rv(obj)
            if o is not None and n is not None and n < o:
                return  # an older copy (e.g. a create's answer after the watch's newer event)
            self._unlink(kind, old)
        self._objs[kind][key] = obj
        run = (md.get("labels") or {}).get(LABEL_RUN)
        if run:
            self._by_run[kind].setdefault((md["namespace"], run), set()).add(md["name"])

    def _unlink(self, kind: str, obj: Obj) -> None:
        md = obj["metadata"]
        run = (md.get("labels") or {}).get(LABEL_RUN)
        if run:
            names = self._by_run[kind].get((md["namespace"], run))
            if names is not None:
                names.discard(md["name"])
                if not names:
                    del self._by_run[kind][(md["namespace"], run)]

    def upsert(self, kind: str, obj: Obj) -> None:
        with self._lock:
            self._put(kind, slim(kind, obj))

    def remove(self, kind: str, obj: Obj) -> None:
        md = obj["metadata"]
        with self._lock:
            old = self._objs[kind].pop((md["namespace"], md["name"]), None)
            if old is not None:
                self._unlink(kind, old)

    def forget(self, kind: str, namespace: str, name: str) -> None:
        """Drop one object (a run whose status write met a 409: the next reconcile reads it afresh)."""
        self.remove(kind, {"metadata": {"namespace": namespace, "name": name}})

    def replace(self, kind: str, namespace: str | None, objs: Iterable[Obj]) -> None:
        """A fresh LIST of one informer's scope (one namespace, or all when None): drop what it lacks."""
        with self._lock:
            for key, old in list(self._objs[kind].items()):
                if namespace is None or key[0] == namespace:
                    del self._objs[kind][key]
                    self._unlink(kind, old)
            for o in objs:
                self._put(kind, slim(kind, o))
            self._synced.add((kind, namespace))

    def remember(self, kind: str, obj: Obj | None) -> None:
        """The apiserver's answer to our own create/patch: newer than what the watch showed so far."""
        if kind in self._objs and isinstance(obj, dict) and (obj.get("metadata") or {}).get("name"):
            self.upsert(kind, obj)

    # -- reads

    def children(self, kind: str, namespace: str, run: str) -> list[Obj]:
        with self._lock:
            names = self._by_run[kind].get((namespace, run), ())
            return [self._objs[kind][(namespace, n)] for n in names]

    def get(self, kind: str, namespace: str, name: str) -> Obj | None:
        with self._lock:
            return self._objs[kind].get((namespace, name))

    def size(self) -> int:
        with self._lock:
            return sum(len(v) for v in self._objs.values())


@dataclass
class Informer:
    """LIST + WATCH of one kind in one namespace (None: all namespaces), label `copd.io/run` present."""

    kind: str
    namespace: str | None
    list_call: Callable[..., object]  # a kubernetes client list function, bound to its scope
    index: ChildIndex
    on_event: Callable[[str, str], None]  # (namespace, run) of a child that changed
    stop: threading.Event

    def start(self) -> threading.Thread:
        self.index.expect(self.kind, self.namespace)
        t = threading.Thread(target=self._run, name=f"copd-informer-{self.kind}-{self.namespace or 'all'}",
                             daemon=True)
        t.start()
        return t

    def _notify(self, obj: Obj) -> None:
        md = obj.get("metadata") or {}
        run = (md.get("labels") or {}).get(LABEL_RUN)
        if run and md.get("namespace"):
            self.on_event(md["namespace"], run)

    def _run(self) -> None:
        failures = 0
        while not self.stop.is_set():
            try:
                rv = self._list()
                failures = 0
                while not self.stop.is_set():
                    rv = self._watch(rv)
                    if rv is None:
                        break  # 410 Gone: list again
            except Exception as e:  # noqa: BLE001 - an informer must outlive API errors
                wait = RETRY_S[min(failures, len(RETRY_S) - 1)]
                failures += 1
                log.warning("informer %s/%s: %s (retry in %.1fs)", self.kind, self.namespace or "*",
                            getattr(e, "reason", e), wait)
                self.stop.wait(wait)

    def _list(self) -> str:
        resp = self.list_call(label_selector=LABEL_RUN, _preload_content=False)
        body = json.loads(resp.data)
        items = body.get("items") or []
        self.index.replace(self.kind, self.namespace, items)
        for o in items:  # a relist after a gap: every run with children gets a look
            self._notify(o)
        return body["metadata"]["resourceVersion"]

    def _watch(self, rv: str) -> str | None:
        """One watch request; returns the resourceVersion to resume from, None when a relist is needed."""
        try:
            resp = self.list_call(label_selector=LABEL_RUN, watch=True, resource_version=rv,
                                  allow_watch_bookmarks=True, timeout_seconds=WATCH_TIMEOUT_S,
                                  _preload_content=False, _request_timeout=(10, WATCH_TIMEOUT_S + 30))
        except ApiException as e:
            if e.status == 410:
                return None
            raise
        try:
            for line in iter_resp_lines(resp):
                if self.stop.is_set():
                    return rv
                ev = json.loads(line)
                typ, obj = ev.get("type"), ev.get("object") or {}
                if typ == "ERROR":
                    if obj.get("code") == 410:
                        return None
                    raise RuntimeError(f"watch error: {obj.get('message')}")
                rv = (obj.get("metadata") or {}).get("resourceVersion") or rv
                if typ == "BOOKMARK":
                    continue
                if typ == "DELETED":
                    self.index.remove(self.kind, obj)
                else:
                    self.index.upsert(self.kind, obj)
                self._notify(obj)
        finally:
            resp.release_conn()
        return rv


def list_calls(apis, namespace: str | None) -> dict[str, Callable[..., object]]:
    """The list function of each kind, bound to one namespace or to all of them (None)."""
    c, b, n, x = apis.core, apis.batch, apis.networking, apis.custom
    if namespace is None:
        return {
            "Branch": lambda **kw: x.list_cluster_custom_object(GROUP, VERSION, BRANCH_PLURAL, **kw),
            "Job": b.list_job_for_all_namespaces,
            "Pod": c.list_pod_for_all_namespaces,
            "Service": c.list_service_for_all_namespaces,
            "NetworkPolicy": n.list_network_policy_for_all_namespaces,
            "PersistentVolumeClaim": c.list_persistent_volume_claim_for_all_namespaces,
        }
    return {
        "Branch": lambda **kw: x.list_namespaced_custom_object(GROUP, VERSION, namespace, BRANCH_PLURAL, **kw),
        "Job": lambda **kw: b.list_namespaced_job(namespace, **kw),
        "Pod": lambda **kw: c.list_namespaced_pod(namespace, **kw),
        "Service": lambda **kw: c.list_namespaced_service(namespace, **kw),
        "NetworkPolicy": lambda **kw: n.list_namespaced_network_policy(namespace, **kw),
        "PersistentVolumeClaim": lambda **kw: c.list_namespaced_persistent_volume_claim(namespace, **kw),
    }


def start_informers(apis, index: ChildIndex, namespaces: list[str] | None, on_event: Callable[[str, str], None],
                    stop: threading.Event, kinds: Iterable[str] = KINDS) -> list[threading.Thread]:
    """One informer per kind and namespace (namespaces None: one per kind for the whole cluster)."""
    threads = []
    for ns in namespaces or [None]:
        calls = list_calls(apis, ns)
        for kind in kinds:
            threads.append(Informer(kind, ns, calls[kind], index, on_event, stop).start())
    return threads


def wait_synced(index: ChildIndex, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not index.synced():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
