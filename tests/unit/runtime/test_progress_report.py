"""The trainer's live progress reporter against a tiny local HTTP server standing in for the apiserver."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from copd_operator.api import BranchProgress
from copd_operator.logic import naming

from copd_runtime import progress_report as pr

PATH = "/apis/copd.io/v1alpha1/namespaces/ns/branches/demo-arith/status"


class FakeApiServer:
    """Records every request; answers `status` (after `delay` seconds)."""

    def __init__(self, status: int = 200, delay: float = 0.0):
        self.status, self.delay, self.requests = status, delay, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_PATCH(self):  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.requests.append({"t": time.monotonic(), "method": "PATCH", "path": self.path,
                                       "headers": dict(self.headers), "body": json.loads(body)})
                time.sleep(outer.delay)
                reply = json.dumps({"kind": "Status", "message": "branches.copd.io is forbidden"} if
                                   outer.status >= 400 else {"kind": "Branch"}).encode()
                self.send_response(outer.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *_):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}{PATH}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def api():
    servers = []

    def make(**kw) -> FakeApiServer:
        servers.append(FakeApiServer(**kw))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def record(step: int, steps: int = 30, stage: str = "RL", **extra) -> dict:
    rec = {"run": "demo", "branch": "arith", "phase": stage, "cycle": 2, "step": step, "steps": steps,
           "seconds": 0.01, "reward_mean": 0.25 + step / 100, "loss": 0.1, "tokens": 64}
    return {**rec, **extra}


def test_the_patch_touches_only_status_progress_with_a_fresh_token(api, tmp_path):
    srv = api()
    token = tmp_path / "token"
    token.write_text("tok-1\n")
    r = pr.ProgressReporter(srv.url, token_file=token, interval_s=0.0)
    r.update(record(3, stage="OPD", **{"topk_overlap/reverse": 0.93, "topk_union_symmetric_kl/reverse": 0.2,
                                       "topk_overlap/maxbox": 0.81}))
    wait_until(lambda: len(srv.requests) == 1)
    token.write_text("tok-2")  # the kubelet rotated the projected token
    r.update(record(4))
    r.close()
    first, second = srv.requests
    assert first["path"] == PATH and first["method"] == "PATCH"
    assert first["headers"]["Content-Type"] == "application/merge-patch+json"
    assert first["headers"]["Authorization"] == "Bearer tok-1" and second["headers"]["Authorization"] == "Bearer tok-2"
    assert list(first["body"]) == ["status"] and list(first["body"]["status"]) == ["progress"]
    p = first["body"]["status"]["progress"]
    assert {k: v for k, v in p.items() if k != "updateTime"} == {
        "cycle": 2, "stage": "OPD", "step": 3, "steps": 30, "reward": 0.28,
        "topkOverlap": {"reverse": 0.93, "maxbox": 0.81}}
    assert p["updateTime"].endswith("Z")
    # an RL step clears the OPD overlap (merge patch: null deletes), and the operator's model reads it back
    p2 = second["body"]["status"]["progress"]
    assert p2["topkOverlap"] is None and p2["step"] == 4
    assert BranchProgress.model_validate(p).model_dump(by_alias=True, exclude_none=True).keys() == p.keys()
    assert (r.sent, r.failed) == (2, 0) and r.last_sent == p2


def test_at_most_one_patch_per_interval_and_the_last_step_at_close(api):
    srv = api()
    interval = 0.4
    r = pr.ProgressReporter(srv.url, interval_s=interval)
    t0 = time.monotonic()
    for step in range(1, 31):
        r.update(record(step))
        time.sleep(0.03)
    fed = time.monotonic() - t0
    r.close()
    times = [q["t"] for q in srv.requests]
    steps = [q["body"]["status"]["progress"]["step"] for q in srv.requests]
    assert steps[0] == 1 and steps[-1] == 30 and steps == sorted(steps)  # the newest replaces unsent ones
    assert len(srv.requests) <= 2 + int(fed / interval)  # the first, one per interval, the final flush
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert all(g >= interval - 0.02 for g in gaps[:-1]), gaps  # the close flush alone may come sooner
    assert len(srv.requests) >= 3


@pytest.mark.parametrize("status", [403, 404, 500])
def test_a_refused_patch_never_raises_and_backs_off(api, status):
    srv = api(status=status)
    logged = []
    r = pr.ProgressReporter(srv.url, interval_s=0.05, log=logged.append)
    for step in range(1, 21):
        r.update(record(step))
        time.sleep(0.02)
    t = time.monotonic()
    r.close()
    assert time.monotonic() - t < 0.5  # failing: the end of the stage does not wait for a final try
    assert len(srv.requests) == 1  # backed off (>= 2 s) rather than one try per step
    assert (r.sent, r.failed) == (0, 1)
    assert len(logged) == 1 and f"HTTP {status}" in logged[0] and "forbidden" in logged[0]


def test_an_unreachable_or_hanging_apiserver_never_slows_a_step(api):
    hang = api(delay=3.0)
    r = pr.ProgressReporter(hang.url, interval_s=0.0, timeout_s=0.3, log=lambda _: None)
    worst = 0.0
    for step in range(1, 50):
        t = time.perf_counter()
        r.update(record(step))
        worst = max(worst, time.perf_counter() - t)
    t = time.monotonic()
    r.close()
    assert worst < 0.05 and time.monotonic() - t < 1.0
    refused = pr.ProgressReporter("http://127.0.0.1:9/x", interval_s=0.0, timeout_s=0.3, log=lambda _: None)
    refused.update(record(1))
    wait_until(lambda: refused.failed == 1)
    refused.update(record(2))
    refused.close()
    assert refused.sent == 0 and refused.failed == 1  # backing off: no second try


def test_bad_records_are_skipped():
    r = pr.ProgressReporter("http://127.0.0.1:9/x", interval_s=0.0, log=lambda _: None)
    r.update({"step": 1})  # no cycle/phase
    r.update({**record(1), "step": "x"})
    r.close()
    assert r.sent == r.failed == 0


def test_from_pod_needs_a_branch_an_address_and_a_token(tmp_path: Path):
    said = []
    env = {"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "6443"}
    assert pr.ProgressReporter.from_pod(None, tmp_path, environ=env, log=said.append) is None and said == []
    assert pr.ProgressReporter.from_pod("demo-arith", tmp_path, environ=env, log=said.append) is None
    assert "live progress off" in said[-1] and "token" in said[-1]
    (tmp_path / "token").write_text("t")
    (tmp_path / "namespace").write_text("ns\n")
    assert pr.ProgressReporter.from_pod("demo-arith", tmp_path, environ={}, log=said.append) is None
    assert "KUBERNETES_SERVICE_HOST" in said[-1]
    r = pr.ProgressReporter.from_pod("demo-arith", tmp_path, environ=env, log=said.append)
    try:
        assert r.url == f"https://[fd00::1]:6443{PATH}" and r.token_file == tmp_path / "token"
    finally:
        r.close()


def test_the_branch_resource_is_the_operators():
    assert (pr.GROUP, pr.VERSION, pr.PLURAL) == (naming.GROUP, naming.VERSION, naming.BRANCH_PLURAL)
    assert pr.SA_DIR == naming.SA_DIR


def wait_until(fn, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not fn():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)
