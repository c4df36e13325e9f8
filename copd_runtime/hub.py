"""The hub: all teacher scoring goes through it.

It holds frozen snapshots of the teacher branches (taken at the start of an OPD
phase) and answers, per response token of a student's rollout, the teacher's
log-prob of the sampled token and its top-k ids and log-probs, in batches
(`rollout.teacher_scores`: hidden states at response positions only, the LM head a
few positions at a time; zeros elsewhere in the [N, L, ...] tensors it returns).

- `InProcessHub`: used by `copd run` on one machine. With `rollout.engine: vllm` (`copd hub` only)
  each teacher is a vLLM engine scoring through prompt log-probs (`vllm_engine.TeacherEngine`).
- `BatchingScorer`: what the HTTP hub scores through. Concurrent requests (trainers of
  several students) wait in one queue; a single worker takes every waiting request for
  the same teacher (and k, query width) up to `max_batch_tokens` padded tokens, pads
  them to one length on the right (earlier positions are unchanged: causal attention,
  positions from the attention mask), runs ONE forward, and hands each request its rows.
  One forward at a time: peak memory is one batch, not one forward per client thread.
- `serve(...)` / `HttpHub`: the same hub as an HTTP service (`copd hub serve`),
  which the operator runs as a pod behind a Service during OPD phases. Tensors
  travel as safetensors bytes; the JSON header carries the metadata.

Media travel by path, not as pixels: a VLM rollout's request carries each row's image and
video-frame paths (as the trainer read them: inside the run's storage or a dataset's
directory, which the hub pod mounts at the same place). The hub checks every path against
its media roots (`make_server(media_roots=...)`; `copd hub`: the storage and the directories
of the branches' dataset files), loads the files and runs the TEACHER's own processor on them
(`load_media`). A path outside the roots, or one it cannot read, is refused with a 400 whose
body starts with `InvalidInput:`; the client raises `HubRefused` (not retried).

A hub pod can be evicted or deleted mid-stage; the operator creates a new one, maybe
at another address. Once it listens (teachers loaded), `copd hub` writes its address to
`<storage>/hub/cycle-NNN.json`; `HttpHub` given the storage reads it before every try
(else it uses the URL it was given), and retries a failed request (connection refused or
reset, a timeout, a 5xx) with exponential backoff and jitter, within a bounded total
wait. A 4xx (a bad request, an unknown teacher) is not retried.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from copd_runtime.data.examples import Example
from copd_runtime.models.device import CPU_FP32, Placement
from copd_runtime.models.policy import Policy, load_policy
from copd_runtime.models.vlm import encode_vlm_prompts
from copd_runtime.rollout import Rollout, teacher_scores

VISION_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


class InProcessHub:
    """The teachers of one OPD phase, loaded on first use. `engine` "vllm": each teacher is a vLLM
    engine (`vllm_engine.TeacherEngine`, `memory_fraction` of the GPU shared among them) scoring
    through prompt log-probs, at temperature 1 only (the spec's rule); "hf": a transformers model."""

    def __init__(self, teacher_dirs: dict[str, Path], temperature: float, kind: str = "auto",
                 placement: Placement = CPU_FP32, engine: str = "hf", memory_fraction: float = 0.3,
                 max_logprobs: int = 20):
        self.teacher_dirs = {k: Path(v) for k, v in teacher_dirs.items()}
        self.temperature = temperature
        self.kind = kind
        self.placement = placement
        self.engine, self.memory_fraction, self.max_logprobs = engine, memory_fraction, max_logprobs
        if engine == "vllm" and temperature != 1.0:
            raise ValueError(f"rollout.engine vllm scores at temperature 1, not {temperature}")
        self._teachers: dict[str, Policy] = {}
        self._lock = threading.Lock()
        self.requests = 0
        self.tokens = 0

    def teacher(self, name: str) -> Policy:
        with self._lock:
            if name not in self._teachers:
                if name not in self.teacher_dirs:
                    raise KeyError(f"hub has no teacher {name!r} (has {sorted(self.teacher_dirs)})")
                if self.engine == "vllm":
                    from copd_runtime.vllm_engine import TeacherEngine

                    self._teachers[name] = TeacherEngine(self.teacher_dirs[name], self.placement,
                                                         self.memory_fraction / len(self.teacher_dirs),
                                                         self.max_logprobs)
                else:
                    p = load_policy(self.teacher_dirs[name], self.kind, self.placement)
                    p.model.requires_grad_(False)
                    self._teachers[name] = p
            return self._teachers[name]

    def score(self, teacher: str, rollout: Rollout, k: int, query_ids: torch.Tensor | None = None):
        policy = self.teacher(teacher)
        self.requests += 1
        self.tokens += int(rollout.response_mask.sum())
        if self.engine == "vllm":
            out = policy.score(rollout, k, query_ids)
        else:
            out = teacher_scores(policy, rollout, self.temperature, k, query_ids)
        return {n: v.to(rollout.device) for n, v in out.items()}


# ---------------------------------------------------------------------------
# Coalescing concurrent requests

DEFAULT_BATCH_TOKENS = 65_536  # padded tokens (rows × length) in one hub forward


class _Request:
    def __init__(self, teacher: str, rollout: Rollout, k: int, query_ids: torch.Tensor | None):
        self.teacher, self.rollout, self.k, self.query_ids = teacher, rollout, k, query_ids
        self.done = threading.Event()
        self.result: dict | None = None
        self.error: BaseException | None = None

    def key(self) -> tuple:
        q = None if self.query_ids is None else self.query_ids.shape[-1]
        return (self.teacher, self.k, q)


def _pad_right(t: torch.Tensor, length: int, value) -> torch.Tensor:
    pad = length - t.shape[1]
    if pad == 0:
        return t
    filler = torch.full((t.shape[0], pad, *t.shape[2:]), value, dtype=t.dtype, device=t.device)
    return torch.cat([t, filler], 1)


def coalesce(rollouts: list[Rollout], pad_id: int) -> Rollout:
    """Rows of several rollouts as one, right-padded to the longest (vision tensors packed in order)."""
    L = max(r.input_ids.shape[1] for r in rollouts)
    vision: dict[str, torch.Tensor] = {}
    for name in {n for r in rollouts for n in r.vision}:
        vision[name] = torch.cat([r.vision[name] for r in rollouts if name in r.vision])
    return Rollout(
        examples=[e for r in rollouts for e in r.examples],
        input_ids=torch.cat([_pad_right(r.input_ids, L, pad_id) for r in rollouts]),
        attention_mask=torch.cat([_pad_right(r.attention_mask, L, 0) for r in rollouts]),
        response_mask=torch.cat([_pad_right(r.response_mask, L, 0) for r in rollouts]),
        old_logprobs=torch.cat([_pad_right(r.old_logprobs, L, 0) for r in rollouts]),
        truncated=torch.cat([r.truncated for r in rollouts]),
        responses=[t for r in rollouts for t in r.responses],
        vision=vision,
    )


class BatchingScorer:
    """`score` like InProcessHub's, safe to call from many threads; see the module docstring."""

    def __init__(self, hub: InProcessHub, max_batch_tokens: int = DEFAULT_BATCH_TOKENS, start: bool = True):
        self.hub, self.max_batch_tokens = hub, max_batch_tokens
        self._queue: list[_Request] = []
        self._cv = threading.Condition()
        self.forwards = 0  # batched forwards run
        self._stop = False
        self._worker = threading.Thread(target=self._run, name="hub-batcher", daemon=True)
        if start:
            self.start()

    @property
    def teacher_dirs(self):
        return self.hub.teacher_dirs

    def start(self) -> None:
        self._worker.start()

    def pending(self) -> int:
        with self._cv:
            return len(self._queue)

    def close(self) -> None:
        """Stop the worker after the forward it is running, and wait for it."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._worker.is_alive() and self._worker is not threading.current_thread():
            self._worker.join()

    def score(self, teacher: str, rollout: Rollout, k: int, query_ids: torch.Tensor | None = None):
        if teacher not in self.hub.teacher_dirs:
            raise KeyError(f"hub has no teacher {teacher!r} (has {sorted(self.hub.teacher_dirs)})")
        req = _Request(teacher, rollout, k, query_ids)
        with self._cv:
            self._queue.append(req)
            self._cv.notify_all()
        req.done.wait()
        if req.error is not None:
            raise req.error
        return req.result

    def _take(self) -> list[_Request]:
        """The oldest request and every waiting one like it, within the token budget."""
        first = self._queue.pop(0)
        batch = [first]
        L = first.rollout.input_ids.shape[1]
        for req in list(self._queue):
            if req.key() != first.key():
                continue
            L2 = max(L, req.rollout.input_ids.shape[1])
            rows = sum(len(r.rollout) for r in batch) + len(req.rollout)
            if rows * L2 > self.max_batch_tokens:
                continue
            batch.append(req)
            self._queue.remove(req)
            L = L2
        return batch

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._stop:
                    self._cv.wait()
                if self._stop:
                    return
                batch = self._take()
            try:
                self._score(batch)
            except BaseException as e:  # each waiting client gets the error, the worker lives on
                for req in batch:
                    req.error = e
            finally:
                for req in batch:
                    req.done.set()

    def _score(self, batch: list[_Request]) -> None:
        self.forwards += 1
        first = batch[0]
        if len(batch) == 1:
            first.result = self.hub.score(first.teacher, first.rollout, first.k, first.query_ids)
            return
        policy = self.hub.teacher(first.teacher)
        merged = coalesce([r.rollout.to("cpu") for r in batch], policy.pad_id)
        query = None
        if first.query_ids is not None:
            L = merged.input_ids.shape[1]
            query = torch.cat([_pad_right(r.query_ids.to("cpu"), L, 0) for r in batch])
        out = self.hub.score(first.teacher, merged, first.k, query)
        start = 0
        for req in batch:
            n, L = len(req.rollout), req.rollout.input_ids.shape[1]
            req.result = {name: v[start : start + n, :L].to(req.rollout.device) for name, v in out.items()}
            start += n


# ---------------------------------------------------------------------------
# Wire format


def encode_request(teacher: str, rollout: Rollout, k: int, query_ids: torch.Tensor | None) -> bytes:
    """The request's tensors (ids and masks, no pixels) and, per row, the paths of its media."""
    tensors = {
        "input_ids": rollout.input_ids.contiguous(),
        "attention_mask": rollout.attention_mask.contiguous(),
        "response_mask": rollout.response_mask.contiguous(),
    }
    if query_ids is not None:
        tensors["query_ids"] = query_ids.contiguous()
    meta = {
        "teacher": teacher,
        "k": str(k),
        "media": json.dumps([{"images": [os.path.abspath(p) for p in e.images],
                               "video": [os.path.abspath(p) for p in e.video]} for e in rollout.examples]),
    }
    return st_save({n: t.cpu() for n, t in tensors.items()}, metadata=meta)


def decode_request(blob: bytes) -> tuple[str, Rollout, int, torch.Tensor | None]:
    """The rollout of a request; its rows' media are paths (`Rollout.examples`), not yet loaded."""
    tensors = st_load(blob)
    meta = _metadata(blob)
    media = json.loads(meta.get("media", "[]"))
    n = tensors["input_ids"].shape[0]
    if len(media) != n or not all(isinstance(m, dict) for m in media):
        raise InvalidMedia(f"'media' must list one {{images, video}} object per row ({n} rows)")
    examples = []
    for i, m in enumerate(media):
        paths = {}
        for kind in ("images", "video"):
            v = m.get(kind, [])
            if not isinstance(v, list) or not all(isinstance(p, str) and p for p in v):
                raise InvalidMedia(f"media[{i}].{kind}: expected a list of paths")
            paths[kind] = tuple(v)
        examples.append(Example("", "", "", images=paths["images"], video=paths["video"]))
    rollout = Rollout(
        examples=examples,
        input_ids=tensors["input_ids"],
        attention_mask=tensors["attention_mask"],
        response_mask=tensors["response_mask"],
        old_logprobs=torch.zeros_like(tensors["response_mask"]),
        truncated=torch.zeros(n, dtype=torch.bool),
        responses=[""] * n,
    )
    return meta["teacher"], rollout, int(meta["k"]), tensors.get("query_ids")


# ---------------------------------------------------------------------------
# Media by path


class InvalidMedia(ValueError):
    """A request's media the hub refuses (outside its roots, unreadable, or for a text teacher)."""


def check_media_path(path: str, roots: list[Path], where: str) -> Path:
    """`path` resolved (symlinks and `..` followed) if it lies inside one of `roots`, else InvalidMedia."""
    try:
        real = Path(os.path.realpath(path))
    except (OSError, ValueError) as e:
        raise InvalidMedia(f"{where}: {path!r}: {e}") from None
    if not any(real == r or r in real.parents for r in roots):
        allowed = ", ".join(str(r) for r in roots) or "none (the hub has no media roots)"
        raise InvalidMedia(f"{where}: {path!r} is outside the hub's media roots ({allowed})")
    if not real.is_file():
        raise InvalidMedia(f"{where}: {path!r} is not a readable file on the hub")
    return real


def load_media(policy: Policy, rollout: Rollout, roots: list[Path]) -> Rollout:
    """The rollout with its vision tensors made by `policy`'s processor from its rows' media paths
    (each checked against `roots`), in the policy's dtype: what the trainer's `encode_prompts` made."""
    if not any(e.images or e.video for e in rollout.examples):
        return rollout
    if not policy.is_vlm:
        raise InvalidMedia("the request carries media but the teacher is a text model")
    roots = [Path(os.path.realpath(r)) for r in roots]
    examples = []
    for i, e in enumerate(rollout.examples):
        images = tuple(str(check_media_path(p, roots, f"media[{i}].images[{j}]")) for j, p in enumerate(e.images))
        video = tuple(str(check_media_path(p, roots, f"media[{i}].video[{j}]")) for j, p in enumerate(e.video))
        examples.append(Example("", "", "", images=images, video=video))
    try:
        enc = encode_vlm_prompts(policy.processor, examples)
    except (OSError, ValueError) as e:  # not an image, a truncated file
        raise InvalidMedia(f"cannot load the media: {type(e).__name__}: {e}") from None
    dtype = policy.model.dtype
    vision = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in enc.items() if k in VISION_KEYS}
    return Rollout(rollout.examples, rollout.input_ids, rollout.attention_mask, rollout.response_mask,
                   rollout.old_logprobs, rollout.truncated, rollout.responses, vision)


def _metadata(blob: bytes) -> dict[str, str]:
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8 : 8 + n]).get("__metadata__", {})


# ---------------------------------------------------------------------------
# HTTP service


def make_server(hub: InProcessHub, host: str, port: int, max_batch_tokens: int = DEFAULT_BATCH_TOKENS,
                media_roots: list[Path] = ()) -> ThreadingHTTPServer:
    """The hub over HTTP: each connection on its own thread (which also loads the request's media
    from `media_roots`), all scoring through one `BatchingScorer`."""
    scorer = BatchingScorer(hub, max_batch_tokens)
    roots = [Path(r) for r in media_roots]

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
                rollout = load_media(hub.teacher(teacher), rollout, roots)
                out = scorer.score(teacher, rollout, k, query_ids)
                self._send(200, st_save({n: t.cpu().contiguous() for n, t in out.items()}),
                           "application/octet-stream")
            except InvalidMedia as e:
                self._send(400, f"InvalidInput: {e}".encode(), "text/plain")
            except KeyError as e:
                self._send(404, str(e).encode(), "text/plain")
            except Exception as e:  # a bad request must not kill the hub
                self._send(400, f"{type(e).__name__}: {e}".encode(), "text/plain")

    server = ThreadingHTTPServer((host, port), Handler)
    server.scorer = scorer
    return server


def media_roots(spec, storage: Path) -> list[Path]:
    """Where a run's media may lie: its storage and the directories of its branches' dataset files
    (a JSONL's relative media paths are relative to the file)."""
    roots = [Path(storage)]
    for b in spec.branches:
        for p in (b.dataset.path, b.dataset.eval_path):
            if p:
                path = Path(p) if Path(p).is_absolute() else Path(storage) / p
                roots.append(path.parent)
    out: list[Path] = []
    for r in roots:
        r = Path(os.path.realpath(r))
        if r not in out:
            out.append(r)
    return out


def hub_address_file(storage: Path, cycle: int) -> Path:
    return Path(storage) / "hub" / f"cycle-{cycle:03d}.json"


def write_hub_address(storage: Path, cycle: int, url: str) -> Path:
    """Publish where the hub of `cycle` listens (atomic: a reader sees the old or the new address)."""
    path = hub_address_file(storage, cycle)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"url": url, "cycle": cycle, "time": time.time()}))
    os.replace(tmp, path)
    return path


def read_hub_address(storage: Path, cycle: int) -> str | None:
    try:
        url = json.loads(hub_address_file(storage, cycle).read_text()).get("url")
    except (OSError, ValueError, AttributeError):
        return None
    return url.rstrip("/") if isinstance(url, str) and url else None


class HubUnavailable(RuntimeError):
    """The hub did not answer within the client's whole retry budget."""


class HubRefused(RuntimeError):
    """The hub answered 4xx: the request itself is wrong (retrying cannot help). `reason` is
    `InvalidInput` when the hub said so (e.g. a media path outside its roots)."""

    def __init__(self, message: str, code: int, reason: str | None):
        super().__init__(message)
        self.code, self.reason = code, reason


class _Transient(Exception):
    pass


class HttpHub:
    """Client of `copd hub serve`; same `score` as InProcessHub.

    `storage` + `cycle`: re-read the hub's published address before each try (a replaced hub pod may
    listen elsewhere); `url` is the fallback. Failed tries are retried with exponential backoff
    (`backoff_s`·2^n, at most `max_backoff_s`, times a random 0.5-1 jitter) for at most `retry_budget_s`.
    """

    def __init__(self, url: str, timeout_s: float = 300.0, wait_ready_s: float = 300.0,
                 storage: Path | None = None, cycle: int | None = None, retry_budget_s: float = 900.0,
                 backoff_s: float = 1.0, max_backoff_s: float = 30.0,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic):
        self.fallback_url = url.rstrip("/")
        self.storage, self.cycle = storage, cycle
        self.timeout_s = timeout_s
        self.retry_budget_s, self.backoff_s, self.max_backoff_s = retry_budget_s, backoff_s, max_backoff_s
        self.sleep, self.clock = sleep, clock
        self.retries = 0
        self.url = self._resolve()
        self._wait_ready(wait_ready_s)

    def _resolve(self) -> str:
        if self.storage is not None and self.cycle is not None:
            return read_hub_address(self.storage, self.cycle) or self.fallback_url
        return self.fallback_url

    def _wait_ready(self, budget_s: float) -> None:
        self._retrying(lambda: self._get_ready(), budget_s, "ready")

    def _get_ready(self) -> None:
        try:
            with urllib.request.urlopen(self.url + "/readyz", timeout=5) as r:
                if r.status == 200:
                    return
        except urllib.error.HTTPError as e:
            raise _Transient(f"{e.code}") from None
        except OSError as e:
            raise _Transient(str(e)) from None
        raise _Transient("not ready")

    def _retrying(self, call: Callable, budget_s: float, what: str):
        deadline = self.clock() + budget_s
        n = 0
        while True:
            try:
                return call()
            except _Transient as e:
                now = self.clock()
                if now >= deadline:
                    raise HubUnavailable(f"hub {self.url} not {what} after {budget_s:.0f}s ({n} retries): {e}") \
                        from None
                wait = min(self.max_backoff_s, self.backoff_s * 2 ** n) * random.uniform(0.5, 1.0)
                self.sleep(max(0.0, min(wait, deadline - now)))
                n += 1
                self.retries += 1
                self.url = self._resolve()

    def _post(self, body: bytes) -> dict:
        req = urllib.request.Request(self.url + "/v1/score", data=body, method="POST",
                                     headers={"Content-Type": "application/octet-stream"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                return st_load(r.read())
        except urllib.error.HTTPError as e:
            text = e.read().decode(errors="replace")
            if e.code >= 500:
                raise _Transient(f"{e.code} {text[:200]}") from None
            reason = "InvalidInput" if text.startswith("InvalidInput:") else None
            raise HubRefused(f"hub {self.url}: {e.code} {text}", e.code, reason) from None
        except (OSError, http.client.HTTPException) as e:  # refused, reset, unreachable, DNS, timeout, cut off
            raise _Transient(f"{type(e).__name__}: {e}") from None

    def score(self, teacher: str, rollout: Rollout, k: int, query_ids: torch.Tensor | None = None):
        body = encode_request(teacher, rollout, k, query_ids)
        return self._retrying(lambda: self._post(body), self.retry_budget_s, "answering")
