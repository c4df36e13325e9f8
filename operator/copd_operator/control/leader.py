"""Lease-based leader election (coordination.k8s.io/v1 Lease), the way client-go's leaderelection does it.

Only the leader runs the reconcile workers and the resync; a follower keeps its
watches (events only fill its in-memory queue, which nobody drains) and keeps
trying to take the Lease every `retry_s`.

* `decide_lease()` is the whole decision, pure (no I/O, no clock): given the
  Lease as last read (or None), who I am, the time now and the default
  duration, it says CREATE / ACQUIRE / RENEW / WAIT.
* `LeaderElector` is the thin I/O loop around it (a daemon thread): read the
  Lease, decide, write it with `replace` (the body carries the resourceVersion
  that was read, so two writers race through the apiserver's optimistic
  concurrency: one gets 409 Conflict and loses).

Clock skew: like client-go, expiry of someone else's Lease is judged on *this*
process's clock, from the moment the record last changed as seen here
(`observed_at`), not from the other pod's `renewTime`.

Losing the Lease (renewals failing for `renew_deadline_s`, or another holder in
the record) calls `on_stopped_leading`; main.py makes that exit the process at
once (os._exit), so reconcile threads stuck in an API call cannot write after
another leader took over; the Deployment restarts the pod, which comes back as a
follower. `release()` (graceful shutdown, called by OperatorRuntime.shutdown() after
the workers stopped) clears holderIdentity so a follower takes over on its next
retry instead of waiting out the lease duration; it is idempotent, retried on 409,
and no renewal can take the Lease back once it began.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

log = logging.getLogger("copd_operator.control.leader")

LEASE_DURATION_S = 15.0
RENEW_DEADLINE_S = 10.0
RETRY_S = 2.0


class Action(StrEnum):
    CREATE = "create"    # no Lease: create it holding it
    ACQUIRE = "acquire"  # free or expired: take it over (leaseTransitions + 1)
    RENEW = "renew"      # mine: bump renewTime
    WAIT = "wait"        # someone else holds a live Lease


@dataclass(frozen=True)
class LeaseRecord:
    holder: str | None
    renew_time: float | None  # seconds (any clock, the same one as `now`); None if never renewed
    duration_s: float | None = None  # the record's leaseDurationSeconds, if set
    transitions: int = 0
    resource_version: str | None = None


def decide_lease(lease: LeaseRecord | None, me: str, now: float, duration: float) -> Action:
    if lease is None:
        return Action.CREATE
    if lease.holder == me:
        return Action.RENEW
    if not lease.holder:
        return Action.ACQUIRE
    d = lease.duration_s if lease.duration_s and lease.duration_s > 0 else duration
    if lease.renew_time is None or now >= lease.renew_time + d:
        return Action.ACQUIRE
    return Action.WAIT


def identity() -> str:
    """Pod name (HOSTNAME in a pod) plus a random suffix: a restarted container never mistakes
    the Lease of its previous life for its own."""
    host = os.environ.get("POD_NAME") or os.environ.get("HOSTNAME") or socket.gethostname()
    return f"{host}_{uuid.uuid4().hex[:8]}"


def _micro(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    def __init__(self, api_client, namespace: str, name: str, *, me: str | None = None,
                 lease_duration_s: float = LEASE_DURATION_S, renew_deadline_s: float = RENEW_DEADLINE_S,
                 retry_s: float = RETRY_S, on_started_leading: Callable[[], None] = lambda: None,
                 on_stopped_leading: Callable[[], None] = lambda: None):
        from kubernetes import client

        self.api = client.CoordinationV1Api(api_client)
        self.namespace, self.name = namespace, name
        self.me = me or identity()
        self.lease_duration_s, self.renew_deadline_s, self.retry_s = lease_duration_s, renew_deadline_s, retry_s
        self.on_started_leading, self.on_stopped_leading = on_started_leading, on_stopped_leading
        self.is_leader = False
        self.leader_since: float | None = None
        self.observed_holder: str | None = None
        self._observed_key: tuple | None = None
        self._observed_at: float = 0.0
        self._waiting_on: str | None = None  # the holder last logged as "waiting"
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one write at a time (loop vs release)
        self._thread = threading.Thread(target=self._run, name="copd-leader-election", daemon=True)

    # -- I/O

    def _read(self):
        from kubernetes.client.rest import ApiException

        try:
            return self.api.read_namespaced_lease(self.name, self.namespace)
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def _record(self, lease) -> LeaseRecord | None:
        """The Lease as decide_lease sees it, renew_time on the local monotonic clock (client-go style)."""
        if lease is None:
            return None
        s = lease.spec
        key = (s.holder_identity, s.renew_time, lease.metadata.resource_version)
        if key != self._observed_key:
            self._observed_key, self._observed_at = key, time.monotonic()
        return LeaseRecord(holder=s.holder_identity, renew_time=self._observed_at,
                           duration_s=s.lease_duration_seconds, transitions=s.lease_transitions or 0,
                           resource_version=lease.metadata.resource_version)

    def _body(self, lease, *, holder: str | None, acquire: bool) -> dict:
        now = _micro(dt.datetime.now(dt.UTC))
        spec = {"leaseDurationSeconds": int(self.lease_duration_s)}
        old = lease.spec if lease is not None else None
        transitions = (old.lease_transitions or 0) if old else 0
        if holder is not None:
            spec["holderIdentity"] = holder
            spec["renewTime"] = now
            spec["acquireTime"] = now if acquire or not (old and old.acquire_time) else _micro(old.acquire_time)
            transitions += 1 if acquire and old is not None else 0
        else:  # release: holderIdentity cleared, duration 1 s (what client-go writes)
            spec["leaseDurationSeconds"] = 1
        spec["leaseTransitions"] = transitions
        meta = {"name": self.name, "namespace": self.namespace}
        if lease is not None:
            meta["resourceVersion"] = lease.metadata.resource_version
        return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": meta, "spec": spec}

    def try_acquire_or_renew(self) -> bool:
        """One round: True if I hold the Lease afterwards. A 409 (someone wrote first) is False.
        Once release() has begun it is always False and writes nothing, so a round that was
        waiting for the lock cannot take the Lease back after it was given up."""
        from kubernetes.client.rest import ApiException

        with self._lock:
            if self._stop.is_set():
                return False
            lease = self._read()
            rec = self._record(lease)
            self.observed_holder = rec.holder if rec else None
            action = decide_lease(rec, self.me, time.monotonic(), self.lease_duration_s)
            try:
                if action is Action.WAIT:
                    if self.observed_holder != self._waiting_on:
                        self._waiting_on = self.observed_holder
                        log.info("lease %s/%s is held by %s: waiting", self.namespace, self.name,
                                 self.observed_holder)
                    return False
                if action is Action.CREATE:
                    self.api.create_namespaced_lease(self.namespace, self._body(None, holder=self.me, acquire=True))
                else:
                    self.api.replace_namespaced_lease(
                        self.name, self.namespace,
                        self._body(lease, holder=self.me, acquire=action is Action.ACQUIRE))
            except ApiException as e:
                if e.status in (409, 404):  # lost a race (or it vanished): decide again next round
                    return False
                raise
            if action is not Action.RENEW:
                log.info("acquired lease %s/%s as %s (%s)", self.namespace, self.name, self.me, action.value)
            self.observed_holder = self.me
            return True

    def release(self, attempts: int = 5, request_timeout_s: float = 5.0) -> bool:
        """Graceful shutdown: stop the loop for good, then clear holderIdentity if the Lease names me.

        Idempotent (a second call finds the Lease no longer mine and writes nothing). Decided
        on the Lease as read under the write lock, not on `is_leader`, so a round that took
        the Lease just before the stop is released too. A 409 (the record changed between our
        read and our write) or an apiserver error reads again, up to `attempts` times.
        Returns True when the Lease is not held by me afterwards."""
        from kubernetes.client.rest import ApiException

        self._stop.set()
        self.is_leader = False
        with self._lock:
            for attempt in range(attempts):
                try:
                    lease = self.api.read_namespaced_lease(self.name, self.namespace,
                                                           _request_timeout=request_timeout_s)
                    if lease.spec.holder_identity != self.me:
                        return True
                    self.api.replace_namespaced_lease(self.name, self.namespace,
                                                      self._body(lease, holder=None, acquire=False),
                                                      _request_timeout=request_timeout_s)
                    log.info("released lease %s/%s", self.namespace, self.name)
                    return True
                except ApiException as e:
                    if e.status == 404:
                        return True
                    if e.status != 409:
                        log.warning("releasing lease %s/%s: %s", self.namespace, self.name, e.reason)
                except Exception as e:  # noqa: BLE001 - apiserver unreachable: retry, then let it expire
                    log.warning("releasing lease %s/%s: %s", self.namespace, self.name, e)
                if attempt + 1 < attempts:
                    time.sleep(min(0.1 * 2 ** attempt, 1.0))
        log.error("could not release lease %s/%s; it expires in %.0fs", self.namespace, self.name,
                  self.lease_duration_s)
        return False

    # -- loop

    def start(self) -> LeaderElector:
        self._thread.start()
        return self

    def _round(self) -> bool:
        try:
            return self.try_acquire_or_renew()
        except Exception as e:  # noqa: BLE001 - apiserver hiccup: retry
            log.warning("lease %s/%s: %s", self.namespace, self.name, e)
            return False

    def _run(self) -> None:
        # follower: try every retry period (with jitter, like client-go's JitterFactor 1.2)
        while not self._stop.is_set():
            if self._round():
                break
            self._stop.wait(self.retry_s * (1 + 0.2 * random.random()))
        if self._stop.is_set():
            return
        self.is_leader, self.leader_since = True, time.monotonic()
        self.on_started_leading()
        # leader: renew every retry period; lost when no renewal succeeded within renew_deadline_s,
        # or when the record names someone else
        last_ok = time.monotonic()
        while not self._stop.wait(self.retry_s):
            if self._round():
                last_ok = time.monotonic()
                continue
            other = self.observed_holder not in (None, self.me)
            if other or time.monotonic() - last_ok > self.renew_deadline_s:
                if self._stop.is_set():
                    return
                self.is_leader = False
                log.error("lost lease %s/%s (holder now %s)", self.namespace, self.name, self.observed_holder)
                self.on_stopped_leading()
                return
