"""One reconcile of one CoPDRun: gather -> decide -> write status (once, if changed) -> act -> events.

    gather(run + children)            gather.py      (reads)
      -> observe(...) : Observed      observe.py     (pure)
      -> decide(spec, status, ...)    copd_core.cycle (pure, shared with `copd run`)
      -> write status                 act.py         (one PUT, only when it changed)
      -> plan(...) : [ops]            plan.py        (pure)
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

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from kubernetes.client.rest import ApiException

from copd_core.conditions import R_INVALID_SPEC, iso
from copd_core.cycle import Event, RunStatus, decide, fail_run
from copd_core.metrics import CoPDMetrics
from copd_core.spec import SpecError, parse_manifest
from copd_operator.io.act import apply_ops, create, write_run_status
from copd_operator.io.gather import Apis, gather
from copd_operator.logic.builders import OperatorConfig, RunRef, build_event
from copd_operator.logic.observe import observe
from copd_operator.logic.plan import Create, Op, branch_statuses, plan

log = logging.getLogger("copd_operator.reconcile")


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
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)):
        self.apis, self.cfg, self.metrics, self.clock = apis, cfg, metrics, clock

    def reconcile(self, namespace: str, name: str) -> Outcome:
        snap = gather(self.apis, namespace, name, self.cfg.trainer_service_account)
        if snap is None:
            self.metrics.forget_run(namespace, name)
            return GONE
        obj = snap.run
        md = obj["metadata"]
        gen = int(md.get("generation", 0))
        now = self.clock()
        old = obj.get("status") or {}
        status = RunStatus.model_validate(old)
        try:
            manifest = parse_manifest({"apiVersion": obj["apiVersion"], "kind": obj["kind"],
                                       "metadata": {"name": md["name"], "namespace": namespace},
                                       "spec": obj.get("spec") or {}})
        except SpecError as e:
            new, actions = fail_run(status, R_INVALID_SPEC, str(e), now, gen)
            self._write(obj, old, new)
            self._events(RunRef(name, namespace, md["uid"], None), actions, now)  # type: ignore[arg-type]
            return DONE
        run = RunRef(name, namespace, md["uid"], manifest.spec)

        observed = observe(run.spec, status, snap)
        new, actions = decide(run.spec, status, observed, now, gen)
        self._write(obj, old, new)
        ops = plan(run, self.cfg, new, actions, snap, now, gen)
        apply_ops(self.apis, namespace, [op for op in ops if not _is_event(op)])
        for branch, st in branch_statuses(run, new, snap, gen).items():  # live step/reward, as the Branches show
            self.metrics.set_branch(namespace, name, branch, st)
        self._events(run, actions, now)
        return AGAIN if needs_another_pass(ops) else DONE

    def _write(self, obj: dict, old: dict, new: RunStatus) -> None:
        md = obj["metadata"]
        body = new.to_k8s()
        if body != old:
            try:
                write_run_status(self.apis, obj, body)
            except ApiException as e:
                if e.status == 409:
                    raise Conflict(f"{md['namespace']}/{md['name']}") from None
                raise
        self.metrics.set_status(md["namespace"], md["name"], body)

    def _events(self, run: RunRef, actions: list, now: datetime) -> None:
        n = 0
        for a in actions:
            if not isinstance(a, Event):
                continue
            self.metrics.transition(a.ended, a.started, a.duration_s)
            log.info("%s/%s %s: %s", run.namespace, run.name, a.reason, a.message)
            try:
                create(self.apis, run.namespace,
                       build_event(run, a.type, a.reason, a.message, iso(now), f"{int(now.timestamp() * 1000):x}{n}"))
            except ApiException as e:  # events are best effort; the transition is in the status already
                log.warning("cannot record event %s: %s", a.reason, e.reason)
            n += 1


def _is_event(op) -> bool:
    return isinstance(op, Create) and op.obj.get("kind") == "Event"
