"""HttpHub against local HTTP servers: retries with backoff, re-resolving a replaced hub's address,
no retry on a 4xx, a bounded total wait."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from safetensors.torch import save as st_save

from copd_runtime.data.examples import Example
from copd_runtime.hub import HttpHub, HubRefused, HubUnavailable, read_hub_address, write_hub_address
from copd_runtime.rollout import Rollout
from tests.unit.runtime.test_preflight import COPD, manifest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ANSWER = {"token_logprobs": torch.zeros(1, 3)}


def rollout() -> Rollout:
    z = torch.zeros(1, 3)
    return Rollout(examples=[Example("", "", "")], input_ids=z.long(), attention_mask=z.long(), response_mask=z,
                   old_logprobs=z, truncated=torch.zeros(1, dtype=torch.bool), responses=[""])


class FakeHub:
    """A hub that answers `/v1/score` with `codes` in turn (then 200 forever)."""

    def __init__(self, codes=(), body: bytes = b"nope"):
        self.codes = list(codes)
        self.posts = 0
        hub = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code, body):
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                self._send(200, b"{}")

            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                hub.posts += 1
                code = hub.codes.pop(0) if hub.codes else 200
                self._send(code, st_save(ANSWER) if code == 200 else body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hubs():
    made = []

    def make(codes=(), body: bytes = b"nope"):
        h = FakeHub(codes, body)
        made.append(h)
        return h

    yield make
    for h in made:
        h.stop()


def client(url, **kw) -> HttpHub:
    kw.setdefault("backoff_s", 0.01)
    kw.setdefault("max_backoff_s", 0.05)
    return HttpHub(url, wait_ready_s=5, **kw)


@pytest.mark.parametrize("codes, retries", [
    ((), 0),
    ((503,), 1),
    ((500, 502, 503), 3),
])
def test_5xx_is_retried_until_it_answers(hubs, codes, retries):
    h = hubs(codes)
    c = client(h.url)
    out = c.score("a", rollout(), 2)
    assert torch.equal(out["token_logprobs"], ANSWER["token_logprobs"])
    assert c.retries == retries and h.posts == retries + 1


@pytest.mark.parametrize("code", [400, 404])
def test_4xx_is_not_retried(hubs, code):
    h = hubs((code,))
    c = client(h.url)
    with pytest.raises(RuntimeError, match=str(code)):
        c.score("a", rollout(), 2)
    assert h.posts == 1 and c.retries == 0


def test_an_invalid_input_refusal_is_a_hub_refused_with_its_reason(hubs):
    h = hubs((400,), body=b"InvalidInput: media[0].images[0]: '/etc/x.png' is outside the hub's media roots (/copd)")
    with pytest.raises(HubRefused) as err:
        client(h.url).score("a", rollout(), 2)
    assert err.value.code == 400 and err.value.reason == "InvalidInput" and "/etc/x.png" in str(err.value)


def test_copd_stage_fails_with_invalid_input_when_the_hub_refuses_its_input(hubs, tmp_path):
    """An OPD stage whose request the hub refuses as InvalidInput exits 2 (a FailJob rule) with an
    InvalidInput report, instead of crash-looping on a request that can never succeed."""
    h = hubs([400] * 10, body=b"InvalidInput: media[0].images[0]: '/x.png' is outside the hub's media roots (/copd)")
    path = manifest(tmp_path)
    storage, rep = tmp_path / "storage", tmp_path / "termination-log"
    storage.mkdir()
    r = subprocess.run([COPD, "stage", "--manifest", str(path), "--storage", str(storage), "--branch", "b0",
                        "--cycle", "1", "--stage", "OPD", "--hub-url", h.url, "--report-file", str(rep)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    report = json.loads(rep.read_text())
    assert report["failed"] and report["reason"] == "InvalidInput" and "outside the hub's media roots" in \
        report["message"]
    assert h.posts == 1, "not retried"


def test_a_replaced_hub_is_found_at_its_published_address(hubs, tmp_path):
    old = hubs()
    write_hub_address(tmp_path, 2, old.url)
    c = client("http://127.0.0.1:1", storage=tmp_path, cycle=2)  # the fallback URL is dead
    assert c.url == old.url
    c.score("a", rollout(), 2)
    old.stop()  # the hub pod is evicted ...
    new = hubs()  # ... and replaced elsewhere, which publishes its address
    write_hub_address(tmp_path, 2, new.url)
    c.score("a", rollout(), 2)
    assert c.url == new.url and new.posts == 1 and c.retries >= 1


def test_the_total_wait_is_bounded(hubs):
    h = hubs()
    c = HttpHub(h.url, wait_ready_s=5, retry_budget_s=5.0, backoff_s=1.0, max_backoff_s=2.0)
    h.stop()  # the hub goes and never comes back
    t, slept = [0.0], []

    def sleep(s):
        slept.append(s)
        t[0] += s

    c.sleep, c.clock = sleep, lambda: t[0]
    with pytest.raises(HubUnavailable, match="not answering after 5s"):
        c.score("a", rollout(), 2)
    assert sum(slept) <= 5.0 + 1e-9 and all(s <= 2.0 for s in slept) and len(slept) >= 3


def test_readiness_wait_gives_up_after_its_budget():
    t = [0.0]

    def sleep(s):
        t[0] += s

    with pytest.raises(HubUnavailable, match="not ready"):
        HttpHub(f"http://127.0.0.1:{free_port()}", wait_ready_s=3, sleep=sleep, clock=lambda: t[0])


def test_address_file_round_trip(tmp_path):
    assert read_hub_address(tmp_path, 1) is None
    write_hub_address(tmp_path, 1, "http://10.0.0.7:8000/")
    assert read_hub_address(tmp_path, 1) == "http://10.0.0.7:8000"
    (tmp_path / "hub" / "cycle-001.json").write_text("{broken")
    assert read_hub_address(tmp_path, 1) is None


def test_copd_hub_allows_media_under_the_storage_and_the_dataset_files_directories(tmp_path):
    import yaml

    from copd_core.spec import parse_manifest
    from copd_runtime.hub import media_roots

    (tmp_path / "elsewhere").mkdir()
    path = manifest(tmp_path, datasets=[{"path": "data/a.jsonl"},
                                        {"path": str(tmp_path / "elsewhere" / "b.jsonl"), "evalPath": "ev/b.jsonl"},
                                        {"builtin": "arith"}])
    spec = parse_manifest(yaml.safe_load(path.read_text())).spec
    storage = tmp_path / "storage"
    assert media_roots(spec, storage) == [storage, storage / "data", tmp_path / "elsewhere", storage / "ev"]
