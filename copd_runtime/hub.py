"""The hub: all teacher scoring goes through it.

It holds frozen snapshots of the teacher branches (taken at the start of an OPD
phase) and answers, per response token of a student's rollout, the teacher's
log-prob of the sampled token and its top-k ids and log-probs, in batches
(`rollout.teacher_scores`: hidden states at response positions only, the LM head a
few positions at a time; zeros elsewhere in the [N, L, ...] tensors it returns).

- `InProcessHub`: used by `copd run` on one machine.
- `serve(...)` / `HttpHub`: the same hub as an HTTP service (`copd hub serve`),
  which the operator runs as a pod behind a Service during OPD phases. Tensors
  travel as safetensors bytes; the JSON header carries the metadata.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from copd_runtime.data.examples import Example
from copd_runtime.models.policy import Policy, load_policy
from copd_runtime.rollout import Rollout, teacher_scores


class InProcessHub:
    def __init__(self, teacher_dirs: dict[str, Path], temperature: float, kind: str = "auto"):
        self.teacher_dirs = {k: Path(v) for k, v in teacher_dirs.items()}
        self.temperature = temperature
        self.kind = kind
        self._teachers: dict[str, Policy] = {}
        self._lock = threading.Lock()
        self.requests = 0
        self.tokens = 0

    def teacher(self, name: str) -> Policy:
        with self._lock:
            if name not in self._teachers:
                if name not in self.teacher_dirs:
                    raise KeyError(f"hub has no teacher {name!r} (has {sorted(self.teacher_dirs)})")
                p = load_policy(self.teacher_dirs[name], self.kind)
                p.model.requires_grad_(False)
                self._teachers[name] = p
            return self._teachers[name]

    def score(self, teacher: str, rollout: Rollout, k: int, query_ids: torch.Tensor | None = None):
        policy = self.teacher(teacher)
        self.requests += 1
        self.tokens += int(rollout.response_mask.sum())
        return teacher_scores(policy, rollout, self.temperature, k, query_ids)


# ---------------------------------------------------------------------------
# Wire format


def encode_request(teacher: str, rollout: Rollout, k: int, query_ids: torch.Tensor | None) -> bytes:
    tensors = {
        "input_ids": rollout.input_ids.contiguous(),
        "attention_mask": rollout.attention_mask.contiguous(),
        "response_mask": rollout.response_mask.contiguous(),
        **{f"vision.{n}": t.contiguous() for n, t in rollout.vision.items()},
    }
    if query_ids is not None:
        tensors["query_ids"] = query_ids.contiguous()
    meta = {
        "teacher": teacher,
        "k": str(k),
        "media": json.dumps([[len(e.images), len(e.video)] for e in rollout.examples]),
    }
    return st_save(tensors, metadata=meta)


def decode_request(blob: bytes) -> tuple[str, Rollout, int, torch.Tensor | None]:
    tensors = st_load(blob)
    meta = _metadata(blob)
    media = json.loads(meta["media"])
    examples = [Example("", "", "", images=("",) * a, video=("",) * b) for a, b in media]
    n = tensors["input_ids"].shape[0]
    rollout = Rollout(
        examples=examples,
        input_ids=tensors["input_ids"],
        attention_mask=tensors["attention_mask"],
        response_mask=tensors["response_mask"],
        old_logprobs=torch.zeros_like(tensors["response_mask"]),
        truncated=torch.zeros(n, dtype=torch.bool),
        responses=[""] * n,
        vision={k.removeprefix("vision."): v for k, v in tensors.items() if k.startswith("vision.")},
    )
    return meta["teacher"], rollout, int(meta["k"]), tensors.get("query_ids")


def _metadata(blob: bytes) -> dict[str, str]:
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8 : 8 + n]).get("__metadata__", {})


# ---------------------------------------------------------------------------
# HTTP service


def make_server(hub: InProcessHub, host: str, port: int) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def _send(self, code: int, body: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path in ("/healthz", "/readyz"):
                body = json.dumps({"teachers": sorted(hub.teacher_dirs), "requests": hub.requests,
                                   "tokens": hub.tokens}).encode()
                self._send(200, body, "application/json")
            else:
                self._send(404, b"not found", "text/plain")

        def do_POST(self):
            if self.path != "/v1/score":
                self._send(404, b"not found", "text/plain")
                return
            try:
                blob = self.rfile.read(int(self.headers["Content-Length"]))
                teacher, rollout, k, query_ids = decode_request(blob)
                out = hub.score(teacher, rollout, k, query_ids)
                self._send(200, st_save({n: t.contiguous() for n, t in out.items()}), "application/octet-stream")
            except KeyError as e:
                self._send(404, str(e).encode(), "text/plain")
            except Exception as e:  # a bad request must not kill the hub
                self._send(400, f"{type(e).__name__}: {e}".encode(), "text/plain")

    return ThreadingHTTPServer((host, port), Handler)


class HttpHub:
    """Client of `copd hub serve`; same `score` as InProcessHub."""

    def __init__(self, url: str, timeout_s: float = 300.0, wait_ready_s: float = 300.0):
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self._wait_ready(wait_ready_s)

    def _wait_ready(self, budget_s: float) -> None:
        deadline = time.monotonic() + budget_s
        while True:
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"hub at {self.url} not ready after {budget_s:.0f}s")
            time.sleep(1.0)

    def score(self, teacher: str, rollout: Rollout, k: int, query_ids: torch.Tensor | None = None):
        req = urllib.request.Request(
            self.url + "/v1/score", data=encode_request(teacher, rollout, k, query_ids), method="POST",
            headers={"Content-Type": "application/octet-stream"},
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                return st_load(r.read())
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"hub {self.url}: {e.code} {e.read().decode(errors='replace')}") from None
