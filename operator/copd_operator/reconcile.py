"""One reconcile of one CoPDRun: gather -> decide -> write status (once, if changed) -> act -> events.

    gather(run + children)            gather.py      (reads)
      -> observe(...) : Observed      observe.py     (pure)
      -> decide(spec, status, ...)    copd_core.cycle (pure, shared with `copd run`)
      -> write status                 act.py         (one PUT, only when it changed)
      -> plan(...) : [ops]            plan.py        (pure)
         + finished_job_cleanup(...)   cleanup.py     (pure: TTL on Jobs whose reports the written status holds)
      -> apply ops, then Events       act.py         (writes)
      -> Branch step/reward gauges    (the Branch statuses written: trainers' live progress folded in)

Everything starts from the CoPDRun's status and the children that exist, so any
reconcile may be the first after an operator restart.

A spec the apiserver admitted but the model refuses (schema drift) cannot reach
`decide` (it needs a spec): `copd_core.cycle.fail_run` makes the same failure
decision instead. A Branch object the plan creates has no uid yet, so its stage
Job waits for the next reconcile: the outcome asks for one at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from kubernetes.client.rest import ApiException

from copd_core.conditions import (
    COND_RECONCILE_ERROR,
    R_API_ERROR,
    R_CREATE_REJECTED,
    R_INTERNAL_ERROR,
    R_INVALID_SPEC,
    R_QUOTA_EXCEEDED,
    R_RECONCILED,
    condition,
    iso,
    set_condition,
)
from copd_core.cycle import Event, RunStatus, decide, fail_run, next_wakeup_s
from copd_core.metrics import CoPDMetrics
from copd_core.spec import SpecError
from copd_operator.io.act import NameConflict, apply_ops, create, patch_run_conditions, write_run_status
from copd_operator.io.gather import Apis, gather, read_run
from copd_operator.io.informer import RUN_KIND
from copd_operator.logic.builders import R_NAME_CONFLICT, OperatorConfig, RunRef, build_event
from copd_operator.logic.cleanup import finished_job_cleanup
from copd_operator.logic.lenient import parse_lenient
from copd_operator.logic.observe import observe
from copd_operator.logic.plan import Create, Op, branch_statuses, plan
from copd_operator.logic.queueing import queue_status

log = logging.getLogger("copd_operator.reconcile")

EVENT_TRIES = 3
EVENT_RETRY_S = 0.2
UNSENT_MAX = 50
STATUS_WRITE_TRIES = 5  # 409s from writers that changed neither the spec nor the status (labels, annotations)
BLOCKED_RECHECK_S = 10.0  # a Blocked run looks again this often (what it waits for is not watched)


class Conflict(Exception):
    """Someone else wrote the run between our read and our write: reconcile again."""


@dataclass(frozen=True)
class Outcome:
    """What one reconcile tells the work queue."""

    exists: bool = True  # False: the run is gone (the queue forgets the key)
    requeue_after_s: float | None = None  # reconcile again this soon: children just made unblock more work


GONE = Outcome(exists=False)
DONE = Outcome()
# A Branch created by this reconcile: its stage Job needs the Branch's uid (owner), known from the next gather.
AGAIN = Outcome(requeue_after_s=0.0)


def needs_another_pass(ops: list[Op]) -> bool:
    """Ops whose results the next plan builds on (a Branch's uid owns its stage Jobs)."""
    return any(isinstance(op, Create) and op.obj.get("kind") == "Branch" for op in ops)


class Reconciler:
    def __init__(self, apis: Apis, cfg: OperatorConfig, metrics: CoPDMetrics,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC), finished_job_ttl_s: int | None = None):
        self.apis, self.cfg, self.metrics, self.clock = apis, cfg, metrics, clock
        # Events whose every try failed (e.g. the apiserver restarting): sent again, under the same name,
        # at the start of the run's next reconcile; at most UNSENT_MAX per run, oldest dropped first
        self.unsent: dict[tuple[str, str], list[dict]] = {}
        self.finished_job_ttl_s = finished_job_ttl_s  # None: finished Jobs stay until the run is deleted
        self._written: dict[tuple[str, str], str] = {}  # (ns, run) -> resourceVersion of our last status write
        self.stopping = False  # set by OperatorRuntime.shutdown(): an error now is the shutdown's, not the run's

    def wrote(self, namespace: str, name: str, resource_version: str | None) -> bool:
        """Whether this resourceVersion of the run is the one our own last status write made."""
        return resource_version is not None and self._written.get((namespace, name)) == resource_version

    def reconcile(self, namespace: str, name: str) -> Outcome:
        snap = gather(self.apis, namespace, name, self.cfg.trainer_service_account,
                      network_policies=self.cfg.network_policy)
        if snap is None:
            self.metrics.forget_run(namespace, name)
            self.unsent.pop((namespace, name), None)
            self._written.pop((namespace, name), None)
            return GONE
        obj = snap.run
        md = obj["metadata"]
        self._resend(namespace, name)
        gen = int(md.get("generation", 0))
        now = self.clock()
        old = obj.get("status") or {}
        status = RunStatus.model_validate(old)
        try:  # fields of a newer CRD are dropped and reported (SpecWarning), never fatal
            manifest, unknown = parse_lenient({"apiVersion": obj["apiVersion"], "kind": obj["kind"],
                                               "metadata": {"name": md["name"], "namespace": namespace},
                                               "spec": obj.get("spec") or {}})
        except SpecError as e:
            new, actions = fail_run(status, R_INVALID_SPEC, str(e), now, gen)
            self._write(obj, old, new)
            self._events(RunRef(name, namespace, md["uid"], None), actions, now)  # type: ignore[arg-type]
            return DONE
        run = RunRef(name, namespace, md["uid"], manifest.spec)

        new = status
        try:
            observed = replace(observe(run.spec, status, snap), unknown_fields=unknown)
            new, actions = decide(run.spec, status, observed, now, gen)
            if snap.kueue is not None:  # a queued run: where its current stage stands with Kueue
                new, queue_events = queue_status(snap.kueue, run, new, now, gen)
                actions = [*actions, *queue_events]
            self._write(obj, old, new)
            # right after the status write: a failing op below cannot lose them (with a pool, posted while
            # the ops go out, and waited for before anything is raised)
            pool = getattr(self.apis, "pool", None)
            posted = pool.submit(self._events, run, actions, now) if pool is not None else None
            if posted is None:
                self._events(run, actions, now)
            try:
                ops = plan(run, self.cfg, new, actions, snap, now, gen)
                if self.finished_job_ttl_s is not None:  # `new` is written: the reports it holds are safe
                    ops += finished_job_cleanup(run, [b.name for b in run.spec.branches], new, snap,
                                                self.finished_job_ttl_s)
                conflicts = apply_ops(self.apis, namespace, [op for op in ops if not _is_event(op)])
            finally:
                if posted is not None:
                    posted.result()
        except Conflict:
            raise
        except Exception as e:  # a condition and an event; the queue retries with per-key backoff
            self._record_error(obj, new, e, now, gen)
            raise
        self._clear_error(obj, new, now, gen)
        for branch, st in branch_statuses(run, new, snap, gen).items():  # live step/reward, as the Branches show
            self.metrics.set_branch(namespace, name, branch, st)
        self._name_conflicts(run, conflicts, now)
        if needs_another_pass(ops):
            return AGAIN
        wake = next_wakeup_s(new, now)  # a branch attempt in backoff: come back when it may start
        if observed.blocked:  # a claim / PriorityClass that is not watched: look again soon
            wake = BLOCKED_RECHECK_S if wake is None else min(wake, BLOCKED_RECHECK_S)
        return DONE if wake is None else Outcome(requeue_after_s=wake + 0.5)

    def _record_error(self, obj: dict, status: RunStatus, err: BaseException, now: datetime, gen: int) -> None:
        """Make a reconcile's exception visible: condition ReconcileError (reason from the error) and a Warning
        event, once per distinct error (a retry of the same one writes nothing)."""
        md = obj["metadata"]
        if self.stopping:
            return  # nothing to record: the next leader or process reconciles the run again
        reason, message = error_condition(err)
        prev = condition(status.conditions, COND_RECONCILE_ERROR)
        if prev is not None and (prev.status, prev.reason, prev.message) == ("True", reason, message):
            return
        conds = set_condition(status.conditions, COND_RECONCILE_ERROR, "True", reason, message, now, gen)
        try:
            self._remember_run(patch_run_conditions(self.apis, md["namespace"], md["name"],
                                                    [c.model_dump(by_alias=True, mode="json") for c in conds]))
        except Exception as e:  # noqa: BLE001 - the error itself is what matters; the queue retries
            log.warning("cannot record reconcile error on %s/%s: %s", md["namespace"], md["name"], e)
        run = RunRef(md["name"], md["namespace"], md["uid"], None)  # type: ignore[arg-type]
        self._events(run, [Event("Warning", reason, message)], now)

    def _clear_error(self, obj: dict, status: RunStatus, now: datetime, gen: int) -> None:
        prev = condition(status.conditions, COND_RECONCILE_ERROR)
        if prev is None or prev.status != "True":
            return
        md = obj["metadata"]
        conds = set_condition(status.conditions, COND_RECONCILE_ERROR, "False", R_RECONCILED,
                              f"recovered from {prev.reason}", now, gen)
        self._remember_run(patch_run_conditions(self.apis, md["namespace"], md["name"],
                                                [c.model_dump(by_alias=True, mode="json") for c in conds]))
        run = RunRef(md["name"], md["namespace"], md["uid"], None)  # type: ignore[arg-type]
        self._events(run, [Event("Normal", R_RECONCILED, f"recovered from {prev.reason}: {prev.message}")], now)

    def _write(self, obj: dict, old: dict, new: RunStatus) -> None:
        """One status PUT with the resourceVersion read. A 409 whose cause left the spec (generation) and the
        status as we read them (another writer's labels or annotations, however often) is retried at once
        with the new resourceVersion: the decision still holds. Anything else is a Conflict (decide again)."""
        md = obj["metadata"]
        body = new.to_k8s()
        if body != old:
            for attempt in range(STATUS_WRITE_TRIES):
                try:
                    res = write_run_status(self.apis, obj, body)
                    rv = ((res or {}).get("metadata") or {}).get("resourceVersion") if isinstance(res, dict) \
                        else None
                    if rv:
                        self._written[(md["namespace"], md["name"])] = rv
                    self._remember_run(res)
                    break
                except ApiException as e:
                    if e.status != 409:
                        raise
                fresh = read_run(self.apis, md["namespace"], md["name"]) if attempt + 1 < STATUS_WRITE_TRIES \
                    else None
                if fresh is None or fresh["metadata"].get("generation") != md.get("generation") or \
                        (fresh.get("status") or {}) != old or fresh["metadata"].get("uid") != md.get("uid"):
                    if self._index is not None:  # decide again from what the apiserver has, not the held copy
                        self._index.forget(RUN_KIND, md["namespace"], md["name"])
                    raise Conflict(f"{md['namespace']}/{md['name']}") from None
                obj = {**obj, "metadata": fresh["metadata"]}
        self.metrics.set_status(md["namespace"], md["name"], body)

    @property
    def _index(self):
        """The informers' index the reconcile reads its run from (None: tests and tools without one)."""
        return getattr(self.apis, "index", None)

    def _remember_run(self, obj) -> None:
        """The apiserver's answer to our write of the run: the newest copy, for the next reconcile to read."""
        if self._index is not None and isinstance(obj, dict):
            self._index.remember(RUN_KIND, obj)

    def _events(self, run: RunRef, actions: list, now: datetime) -> None:
        n = 0
        for a in actions:
            if not isinstance(a, Event):
                continue
            if a.ended is not None or a.started is not None:
                self.metrics.transition(a.ended, a.started, a.duration_s)
            log.info("%s/%s %s: %s", run.namespace, run.name, a.reason, a.message)
            ev = build_event(run, a.type, a.reason, a.message, iso(now), f"{int(now.timestamp() * 1000):x}{n}")
            if not self._send(run.namespace, ev):
                pending = self.unsent.setdefault((run.namespace, run.name), [])
                pending.append(ev)
                del pending[:-UNSENT_MAX]
            n += 1

    def _send(self, namespace: str, ev: dict) -> bool:
        for attempt in range(EVENT_TRIES):  # the name is fixed: a retry after a lost answer is a 409
            try:
                create(self.apis, namespace, ev)
                return True
            except Exception as e:  # noqa: BLE001 - the transition is in the status already
                if attempt == EVENT_TRIES - 1:
                    log.warning("cannot record event %s (sent again next reconcile): %s", ev["reason"],
                                getattr(e, "reason", e))
                else:
                    time.sleep(EVENT_RETRY_S * 2 ** attempt)
        return False

    def _resend(self, namespace: str, name: str) -> None:
        """Events that could not be posted earlier, in order; those that fail again stay for the next time."""
        pending = self.unsent.pop((namespace, name), [])
        for i, ev in enumerate(pending):
            if not self._send(namespace, ev):
                self.unsent[(namespace, name)] = pending[i:]
                return


    def _name_conflicts(self, run: RunRef, conflicts: list[NameConflict], now: datetime) -> None:
        """One Warning Event per taken name (its Event name is fixed: a repeat is a harmless 409)."""
        for c in conflicts:
            suffix = "name-conflict-" + hashlib.sha256(f"{c.kind}/{c.name}".encode()).hexdigest()[:10]
            try:
                create(self.apis, run.namespace, build_event(run, "Warning", R_NAME_CONFLICT, str(c), iso(now), suffix))
            except ApiException as e:
                log.warning("cannot record event %s: %s", R_NAME_CONFLICT, e.reason)


def error_condition(err: BaseException) -> tuple[str, str]:
    """(reason, message) of a reconcile's exception: a quota refusal, a rejected create, another API error,
    or a bug."""
    if isinstance(err, ApiException):
        body = str(err.body or "")
        try:
            body = json.loads(body).get("message", body)
        except (ValueError, AttributeError):
            pass
        text = f"{err.status} {err.reason}: {body}"[:1000]
        if err.status == 403 and "exceeded quota" in body:
            return R_QUOTA_EXCEEDED, text
        if err.status in (403, 422):
            return R_CREATE_REJECTED, text
        return R_API_ERROR, text
    return R_INTERNAL_ERROR, f"{type(err).__name__}: {err}"[:1000]


def _is_event(op) -> bool:
    return isinstance(op, Create) and op.obj.get("kind") == "Event"
