"""Liveness/readiness for the operator pod: `GET /healthz` and `GET /readyz` on `--health-port`.

What can stall in this operator, and what catches it:

* the kopf event loop (it drives every watch stream): an asyncio task started
  by a kopf startup handler beats every `BEAT_S`; a beat older than
  `max_beat_age_s` means the loop is wedged -> /healthz 503. A watch stream
  that goes silent while the loop runs is reconnected by kopf itself
  (`settings.watching.inactivity_timeout`, 70 s; the apiserver sends
  bookmarks every 60 s), so it needs no probe.
* the reconcile workers and the resync thread (`Workers.dead()`): a started
  thread that ended -> /healthz 503.

/readyz is 200 once kopf's startup handlers ran (the workers exist) and the
checks above pass. The server is a plain thread, independent of the loop it
watches. Served only when `copd-operator --health-port N` is given.

Health reads the operator's runtime (copd_operator.runtime.OperatorRuntime) through
the narrow `Probed` view below, so this module needs nothing above the control layer.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Protocol

from copd_operator.control.leader import LeaderElector
from copd_operator.control.workqueue import Workers

BEAT_S = 2.0


class Probed(Protocol):
    """What the probes look at: the workers once the startup handler made them, the elector if any."""

    @property
    def workers(self) -> Workers | None: ...

    @property
    def elector(self) -> LeaderElector | None: ...


class Health:
    def __init__(self, probed: Probed, max_beat_age_s: float = 30.0, clock: Callable[[], float] = time.monotonic):
        self.probed, self.max_beat_age_s, self.clock = probed, max_beat_age_s, clock
        self.last_beat: float | None = None
        self.beat_task: asyncio.Task | None = None

    def beat(self) -> None:
        self.last_beat = self.clock()

    def problems(self) -> list[str]:
        out = []
        if self.last_beat is not None and self.clock() - self.last_beat > self.max_beat_age_s:
            out.append(f"kopf event loop silent for {self.clock() - self.last_beat:.0f}s")
        workers = self.probed.workers
        if workers is not None:  # a leader-election follower never starts them: nothing is dead
            out.extend(f"thread {name} is dead" for name in workers.dead())
        return out

    def live(self) -> tuple[bool, dict]:
        p = self.problems()
        return not p, {"ok": not p, "problems": p}

    def ready(self) -> tuple[bool, dict]:
        ok, body = self.live()
        elector = self.probed.elector
        if elector is not None:
            body["leader"] = elector.is_leader
        if self.last_beat is None or self.probed.workers is None:
            ok = False
            body = {"ok": False, "problems": body["problems"] + ["starting"]}
        return ok, body

    async def beat_forever(self) -> None:
        while True:
            self.beat()
            await asyncio.sleep(BEAT_S)

    def serve(self, port: int, host: str = "0.0.0.0") -> ThreadingHTTPServer:
        health = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                check = {"/healthz": health.live, "/livez": health.live, "/readyz": health.ready}.get(
                    self.path.split("?", 1)[0])
                if check is None:
                    code, body = 404, {"error": "try /healthz or /readyz"}
                else:
                    ok, body = check()
                    code = 200 if ok else 503
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *_):  # probes every few seconds: keep the log quiet
                pass

        server = ThreadingHTTPServer((host, port), Handler)
        threading.Thread(target=server.serve_forever, name="copd-health", daemon=True).start()
        return server


def install(probed: Probed, port: int, max_beat_age_s: float = 30.0) -> Health:
    """Serve /healthz and /readyz on `port`, and register the kopf startup handler that starts the beat."""
    import kopf

    health = Health(probed, max_beat_age_s)
    health.serve(port)

    @kopf.on.startup(id="copd-health")
    async def _start_beat(**_) -> None:
        health.beat_task = asyncio.get_running_loop().create_task(health.beat_forever())

    return health
