"""The operator's Kubernetes client, limited and counted: a QPS/burst token bucket and one counter per request.

    instrument(api_client, qps=50, burst=100, count=metrics.api_request)

wraps the client's `rest_client.request`, which every call of every generated API class goes
through. A request waits for a token (watches excepted: they are long-lived, and the informers
open at most one per kind and namespace), then counts `copd_api_requests_total{verb,resource}`.
What client-go's `rest.Config{QPS, Burst}` does for a Go controller.

kopf's own requests (API discovery, its LIST + WATCH of the CoPDRuns and, where Kueue is installed,
of the Workloads) go through its own aiohttp session: `aiohttp_counter(count)` is a TraceConfig
that counts them the same way (handlers.login gives kopf that session). They are counted, not limited.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from urllib.parse import parse_qs, urlsplit


class TokenBucket:
    """`qps` tokens a second, at most `burst` saved up; `take()` blocks until one is there. qps <= 0: no limit."""

    def __init__(self, qps: float, burst: int, clock=time.monotonic, sleep=time.sleep):
        self.qps, self.burst = float(qps), max(1, int(burst))
        self.clock, self.sleep = clock, sleep
        self._tokens = float(self.burst)
        self._t = clock()
        self._lock = threading.Lock()

    def take(self) -> float:
        """Take one token; returns the seconds waited for it."""
        if self.qps <= 0:
            return 0.0
        with self._lock:  # a waiter holds the lock: the others queue behind it, in order
            now = self.clock()
            self._tokens = min(self.burst, self._tokens + (now - self._t) * self.qps)
            self._t = now
            if self._tokens >= 1:
                self._tokens -= 1
                return 0.0
            wait = (1 - self._tokens) / self.qps
            self.sleep(wait)
            self._t = self.clock()
            self._tokens = 0.0
            return wait


def classify(method: str, url: str) -> tuple[str, str]:
    """(verb, resource) of a request as the apiserver's audit log names them: get/list/watch/create/update/
    patch/delete, and the plural with its subresource (`copdruns/status`); API discovery (`/api`,
    `/apis/<group>/<version>`, `/version`): ("get", "discovery")."""
    parts = urlsplit(url)
    seg = [s for s in parts.path.split("/") if s]
    if seg[:1] == ["api"]:
        seg = seg[2:]  # /api/v1
    elif seg[:1] == ["apis"]:
        seg = seg[3:]  # /apis/<group>/<version>
    else:
        seg = []  # /version, /openapi/...
    if not seg:
        return "get", "discovery"
    if len(seg) >= 3 and seg[0] == "namespaces":
        seg = seg[2:]
    resource = seg[0] if seg else ""
    named = len(seg) >= 2
    if len(seg) >= 3:
        resource = f"{resource}/{seg[2]}"
    method = method.upper()
    if method == "GET":
        if named:
            verb = "get"
        else:
            verb = "watch" if parse_qs(parts.query).get("watch", ["false"])[0] in ("true", "1") else "list"
    else:
        verb = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(method, method.lower())
    return verb, resource


def instrument(api_client, qps: float, burst: int,
               count: Callable[[str, str], None] | None = None) -> TokenBucket:
    """Make every request of `api_client` wait for the bucket and report (verb, resource) to `count`."""
    bucket = TokenBucket(qps, burst)
    rest = api_client.rest_client
    inner = rest.request

    def request(method, url, *args, **kwargs):
        verb, resource = classify(method, url)
        if verb != "watch":
            bucket.take()
        if count is not None:
            count(verb, resource)
        return inner(method, url, *args, **kwargs)

    rest.request = request
    return bucket


def aiohttp_counter(count: Callable[[str, str], None]):
    """An aiohttp TraceConfig that reports (verb, resource) of every request its session sends to `count`."""
    import aiohttp

    async def on_request_start(_session, _ctx, params) -> None:
        count(*classify(params.method, str(params.url)))

    trace = aiohttp.TraceConfig()
    trace.on_request_start.append(on_request_start)
    return trace
