"""Live progress of a stage's trainer: step, reward and per-step OPD overlap, patched into its Branch.

    reporter = ProgressReporter.from_pod("demo-arith", Path(SA_DIR))   # None when there is no API to talk to
    reporter.update(record)     # per step, from run_branch_stage's sink: never blocks, never raises
    reporter.close()            # at the stage's end: sends the last step (bounded wait), stops the thread

On a cluster the operator gives stage pods (only them) a projected service-account token,
the cluster CA and the namespace at the standard path, and `copd stage --branch-object NAME`
names the pod's Branch. The reporter then sends a JSON merge patch to the Branch's status
subresource that touches only `status.progress`:

    {"status": {"progress": {"cycle": 1, "stage": "OPD", "step": 3, "steps": 4, "reward": 0.5,
                             "topkOverlap": {"reverse": 0.93}, "updateTime": "2026-01-01T00:00:03Z"}}}

(`topkOverlap` is null on RL steps, so an OPD step's map does not linger). The operator keeps
that key and folds it into the Branch's `step`/`reward` columns, so `kubectl get branches -w`
shows steps moving. The stage's outcome still travels only in the termination message.

Best effort, by construction: a background thread sends the newest progress at most once every
`interval_s` seconds (plus the final step at close), with a short timeout and no retries of an
old step: a newer step replaces an unsent one. After a failure the next try waits longer
(doubling, up to `max_backoff_s`); the first failure of each kind is logged on stderr, the rest
are counted. Training never waits for the API server, except for at most `timeout_s` at close.

Standard library only (the runtime never imports Kubernetes clients); the token is read again
for every patch, since the kubelet rotates projected tokens.
"""

from __future__ import annotations

import json
import os
import ssl
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

# The Branch resource (copd_operator.logic.naming; the runtime does not import the operator,
# tests/unit/runtime/test_progress_report.py checks they agree).
GROUP, VERSION, PLURAL = "copd.io", "v1alpha1", "branches"
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
MERGE_PATCH = "application/merge-patch+json"


def progress_of(record: dict, now: datetime | None = None) -> dict:
    """The `status.progress` object for one step record of run_branch_stage's sink."""
    overlap = {k.split("/", 1)[1]: round(float(v), 6) for k, v in record.items()
               if k.startswith("topk_overlap/") and v is not None}
    reward = record.get("reward_mean")
    when = (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"cycle": int(record["cycle"]), "stage": str(record["phase"]), "step": int(record["step"]),
            "steps": int(record["steps"]), "reward": None if reward is None else round(float(reward), 6),
            "topkOverlap": overlap or None, "updateTime": when}


def branch_status_url(host: str, port: str | int, namespace: str, name: str, scheme: str = "https") -> str:
    host = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"{scheme}://{host}:{port}/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}/status"


class ProgressReporter:
    def __init__(self, url: str, token_file: Path | None = None, ca_file: Path | None = None,
                 interval_s: float = 5.0, timeout_s: float = 2.0, max_backoff_s: float = 60.0,
                 log: Callable[[str], None] | None = None, clock: Callable[[], float] = time.monotonic):
        self.url, self.token_file, self.ca_file = url, token_file, ca_file
        self.interval_s, self.timeout_s, self.max_backoff_s = max(0.0, interval_s), timeout_s, max_backoff_s
        self._log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self._clock = clock
        handlers: list = [urllib.request.ProxyHandler({})]  # the API server is never behind the pod's proxy
        if url.startswith("https:"):
            ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file and ca_file.exists() else None)
            handlers.append(urllib.request.HTTPSHandler(context=ctx))
        self._opener = urllib.request.build_opener(*handlers)
        self._cv = threading.Condition()
        self._pending: dict | None = None
        self._closing = False
        self._next_at = 0.0  # clock() time before which no patch goes out
        self._failures = 0  # consecutive
        self._logged: set[str] = set()
        self.sent = self.failed = 0
        self.last_sent: dict | None = None
        self._thread = threading.Thread(target=self._loop, name="copd-progress", daemon=True)
        self._thread.start()

    @classmethod
    def from_pod(cls, branch_object: str | None, credentials: Path = Path(SA_DIR), interval_s: float = 5.0,
                 environ: dict | None = None, log: Callable[[str], None] | None = None) -> ProgressReporter | None:
        """A reporter for the Branch `branch_object` of the pod's namespace, or None (and one line on
        stderr) when there is nothing to report to: no Branch named, no API server address, no token."""
        env = os.environ if environ is None else environ
        say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        if not branch_object:
            return None
        host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT")
        token, ns_file = credentials / "token", credentials / "namespace"
        namespace = ns_file.read_text().strip() if ns_file.is_file() else env.get("POD_NAMESPACE", "")
        missing = [what for what, ok in (("KUBERNETES_SERVICE_HOST/PORT", host and port),
                                         (str(token), token.is_file()), ("the namespace", namespace)) if not ok]
        if missing:
            say(f"live progress off (no {', '.join(missing)}): the Branch's step moves when the stage ends")
            return None
        return cls(branch_status_url(host, port, namespace, branch_object), token, credentials / "ca.crt",
                   interval_s=interval_s, log=log)

    # -- the training side: never blocks, never raises

    def update(self, record: dict) -> None:
        try:
            body = progress_of(record)
        except (KeyError, TypeError, ValueError):
            return
        with self._cv:
            if not self._closing:
                self._pending = body
                self._cv.notify()

    def close(self, timeout_s: float | None = None) -> None:
        """Send the newest unsent step now (unless the last try failed), then stop; waits at most
        `timeout_s` (default: the request timeout plus a little)."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        self._thread.join(self.timeout_s + 0.5 if timeout_s is None else timeout_s)

    def __enter__(self) -> ProgressReporter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the sending thread

    def _loop(self) -> None:
        while True:
            with self._cv:
                while True:
                    if self._pending is not None:
                        if self._closing and self._failures:
                            return  # the API is failing: do not hold up the end of the stage
                        wait = self._next_at - self._clock()
                        if wait <= 0 or self._closing:
                            break
                        self._cv.wait(wait)
                    elif self._closing:
                        return
                    else:
                        self._cv.wait()
                body, self._pending = self._pending, None
            ok = self._send(body)
            with self._cv:
                if ok:
                    self._failures, self.sent, self.last_sent = 0, self.sent + 1, body
                    self._next_at = self._clock() + self.interval_s
                else:
                    self._failures, self.failed = self._failures + 1, self.failed + 1
                    backoff = max(self.interval_s, 1.0) * 2 ** min(self._failures, 16)
                    self._next_at = self._clock() + min(self.max_backoff_s, backoff)

    def _send(self, progress: dict) -> bool:
        data = json.dumps({"status": {"progress": progress}}, separators=(",", ":")).encode()
        req = urllib.request.Request(self.url, data=data, method="PATCH",
                                     headers={"Content-Type": MERGE_PATCH, "Accept": "application/json"})
        try:
            if self.token_file is not None:
                req.add_header("Authorization", f"Bearer {self.token_file.read_text().strip()}")
            with self._opener.open(req, timeout=self.timeout_s) as resp:
                resp.read()
            return True
        except urllib.error.HTTPError as e:
            detail = ""
            try:
                detail = json.loads(e.read() or b"{}").get("message", "")
            except (ValueError, OSError, AttributeError):
                pass
            self._note(f"HTTP {e.code}", f"HTTP {e.code} {e.reason}: {detail}"[:300])
        except Exception as e:  # noqa: BLE001 - OSError, TLS, a bad token file: never the trainer's problem
            self._note(type(e).__name__, f"{type(e).__name__}: {e}"[:300])
        return False

    def _note(self, kind: str, message: str) -> None:
        if kind not in self._logged:
            self._logged.add(kind)
            self._log(f"warning: live progress report failed ({message}); training goes on, "
                      f"retrying at most every {self.max_backoff_s:.0f}s")
