"""copd_operator.control.health: the /healthz and /readyz endpoints the chart's probes call."""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.error
import urllib.request
from types import SimpleNamespace

from copd_operator.control.health import Health
from copd_operator.control.workqueue import Workers, WorkQueue


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def started_workers(n=2) -> Workers:
    """Real Workers (n reconcile threads + the resync thread) on an empty queue, running."""
    w = Workers(WorkQueue(), lambda key: True, n, resync_s=60, on_error=lambda k, e: 1.0)
    w.start()
    return w


def runtime(workers=None):
    """What Health reads of the OperatorRuntime (control.health.Probed)."""
    return SimpleNamespace(workers=workers, elector=None)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(port, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_not_ready_until_started_then_live_and_ready():
    clock, state = Clock(), runtime()
    h = Health(state, max_beat_age_s=30, clock=clock)
    assert h.live()[0]  # nothing has failed yet: do not get killed while starting
    ok, body = h.ready()
    assert not ok and "starting" in body["problems"]
    workers = started_workers()
    state.workers = workers
    h.beat()
    assert h.live() == (True, {"ok": True, "problems": []})
    assert h.ready()[0]
    workers.stop()


def test_wedged_event_loop_fails_liveness():
    clock, state = Clock(), runtime(started_workers())
    h = Health(state, max_beat_age_s=30, clock=clock)
    h.beat()
    clock.t += 29
    assert h.live()[0]
    clock.t += 2
    ok, body = h.live()
    assert not ok and "event loop silent" in body["problems"][0]
    assert not h.ready()[0]
    state.workers.stop()


def test_dead_worker_thread_fails_liveness():
    workers = started_workers(3)
    h = Health(runtime(workers), clock=Clock())
    h.beat()
    workers.stop()
    assert workers.join(5)
    ok, body = h.live()
    assert not ok and body["problems"] == [f"thread copd-worker-{i} is dead" for i in range(3)] + [
        "thread copd-resync is dead"]


def test_http_codes():
    clock, state = Clock(), runtime()
    h = Health(state, clock=clock)
    port = _port()
    server = h.serve(port, host="127.0.0.1")
    try:
        assert _get(port, "/readyz")[0] == 503
        assert _get(port, "/healthz") == (200, {"ok": True, "problems": []})
        state.workers = started_workers()
        h.beat()
        assert _get(port, "/readyz")[0] == 200
        clock.t += 1000
        code, body = _get(port, "/healthz")
        assert code == 503 and body["ok"] is False
        assert _get(port, "/nope")[0] == 404
        state.workers.stop()
    finally:
        server.shutdown()


def test_beat_forever_beats_on_the_loop():
    h = Health(runtime(), clock=Clock())

    async def go():
        task = asyncio.get_running_loop().create_task(h.beat_forever())
        await asyncio.sleep(0.05)
        task.cancel()

    asyncio.run(go())
    assert h.last_beat == 100.0


def test_main_accepts_health_port():
    from copd_operator.main import parse_args

    assert parse_args(["-A", "--health-port", "8081"]).health_port == 8081
    assert parse_args(["-A"]).health_port is None
