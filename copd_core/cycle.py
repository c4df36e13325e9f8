"""The CoPD cycle: one pure decision, shared by both executors.

    decide(spec, status, observed, now, generation) -> (new_status, actions)

No kopf, no Kubernetes client, no torch, no clock of its own: the executor
gathers what it sees (`Observed`), calls `decide`, writes the new status once,
then carries out the actions. `copd run` carries them out with local processes;
the operator with Branch objects, pods, a hub and a merge Job. Everything is
level-based: `decide` can start from the status alone, any number of times,
and re-asking for work that is already running is harmless (executors make it
idempotent).

    Pending ──► Running ─────────────────────────────────────────► Merging ──► Succeeded
                 │ cycle c:  RL ──► OPD ──► Diagnose ─┬─ ready ──────►  ▲          │
                 │            ▲                       ├─ c < cycles: c+1, RL       │
                 │            └───────────────────────┘                 │          ▼
                 │                                    └─ c = cycles ────┘ (policy) Failed
                 └─ spec.suspend ──► Suspended ──► (resume) Running at the same stage

A stage ends for the run only when every branch has reported it done (barrier).
A stage with zero steps is skipped. Reasons are constants: they appear in
conditions, events, metrics labels and docs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from copd_core.conditions import (
    COND_BLOCKED,
    COND_FAILED,
    COND_MERGE_READY,
    COND_PROGRESSING,
    COND_READY,
    COND_SPEC_WARNING,
    COND_STORAGE_WARNING,
    COND_SUCCEEDED,
    R_BRANCH_FAILED,
    R_BRANCH_RESTARTED,
    R_CHECKPOINTS_MAY_NOT_FIT,
    R_CONSOLIDATION,
    R_DIAGNOSE_FAILED,
    R_DIAGNOSE_RESTARTED,
    R_INVALID_INPUT,
    R_INVALID_SPEC,
    R_MERGE_FAILED,
    R_MERGE_RESTARTED,
    R_MERGE_WITHOUT_READINESS,
    R_MERGED,
    R_MERGING,
    R_NO_UNKNOWN_FIELDS,
    R_NOT_ALIGNED,
    R_RESUMED,
    R_STAGE_STARTED,
    R_STARTED,
    R_SUSPENDED,
    R_UNBLOCKED,
    R_UNKNOWN_FIELDS,
    Condition,
    condition,
    iso,
    set_condition,
)
from copd_core.consolidation import (
    DirectionPhase,
    adaptive,
    alignment_of,
    initial_phases,
    next_phases,
    stage_work,
)
from copd_core.readiness import DirectionDiagnostic, merge_readiness
from copd_core.spec import CoPDRunSpec, NotReadyPolicy


class Phase(StrEnum):
    PENDING = "Pending"
    RUNNING = "Running"
    SUSPENDED = "Suspended"
    MERGING = "Merging"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


TERMINAL = (Phase.SUCCEEDED, Phase.FAILED)


class Stage(StrEnum):
    RL = "RL"
    OPD = "OPD"
    DIAGNOSE = "Diagnose"


class _Status(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


class BranchStatus(_Status):
    cycle: int = 0
    stage: str | None = None
    step: int = 0
    reward: float | None = None
    done: bool = False
    message: str = ""
    attempt: int = Field(0, description="Replacement attempts of this stage (spec.failurePolicy); 0: the first.")
    retry_time: str | None = Field(None, description="When the next attempt may start (backoff).")


class DiagnosticStatus(_Status):
    cycle: int
    student: str
    teacher: str
    topk_overlap: float
    symmetric_kl: float
    mass_overlap: float | None = Field(None, description="Σ min(p, q) over the union of both top-k sets: the "
                                       "alignment schedule.mode adaptive decides on.")


class QueueStatus(_Status):
    """Where a run labelled kueue.x-k8s.io/queue-name stands with Kueue (the operator writes it)."""

    name: str = Field(description="The LocalQueue (the run's kueue.x-k8s.io/queue-name label).")
    state: str = Field(description="Queued (waiting for quota), Admitted, QueueNotFound or Idle (no work "
                                   "that needs quota right now).")
    workload: str | None = Field(None, description="The Kueue Workload of the current stage.")
    message: str = ""


class RunStatus(_Status):
    phase: Phase = Phase.PENDING
    cycle: int = 0
    stage: Stage | None = None
    branches: dict[str, BranchStatus] = Field(default_factory=dict)
    diagnostics: list[DiagnosticStatus] = Field(default_factory=list, description="Latest cycle's diagnostics.")
    min_topk_overlap: float | None = None
    max_symmetric_kl: float | None = None
    merge_ready: bool = False
    merged_model: str | None = None
    stage_start_time: str | None = None
    start_time: str | None = None
    completion_time: str | None = None
    restarts: int = Field(0, description="Failed attempts replaced so far, of branch stages, diagnose and merge "
                                         "(spec.failurePolicy.maxRestarts).")
    diagnose_attempt: int | None = Field(None, description="Replacement attempts of this cycle's diagnose Job.")
    merge_attempt: int | None = Field(None, description="Replacement attempts of the merge Job.")
    conditions: list[Condition] = Field(default_factory=list)
    observed_generation: int = 0
    queue: QueueStatus | None = Field(None, description="Kueue admission of the current stage (queued runs only).")
    consolidation: list[DirectionPhase] = Field(
        default_factory=list, description="schedule.mode adaptive: each direction's state for the current cycle "
        "(distilling or resting, since how many cycles, the alignment it was decided on).")

    def to_k8s(self) -> dict:
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


# ---------------------------------------------------------------------------
# What executors observe and what they are asked to do


@dataclass(frozen=True)
class BranchReport:
    """What a branch's trainer says about one (cycle, stage)."""

    cycle: int
    stage: Stage
    step: int = 0
    reward: float | None = None
    done: bool = False
    failed: bool = False
    message: str = ""
    reason: str | None = None  # why it failed, when the trainer knows (e.g. InvalidInput): retrying cannot help
    storage_warning: str | None = None  # the planned checkpoints will not fit the run's volume (a trainer's estimate)


@dataclass(frozen=True)
class DiagnoseReport:
    cycle: int
    diagnostics: tuple[DirectionDiagnostic, ...] = ()
    failed: bool = False
    message: str = ""
    reason: str | None = None


@dataclass(frozen=True)
class MergeReport:
    done: bool = False
    failed: bool = False
    path: str | None = None
    message: str = ""
    reason: str | None = None


@dataclass(frozen=True)
class Observed:
    branches: dict[str, BranchReport] = field(default_factory=dict)
    diagnose: DiagnoseReport | None = None
    merge: MergeReport | None = None
    invalid_spec: str | None = None  # what only the executor can judge (e.g. a missing dataset)
    invalid_input: str | None = None  # a long-running piece (the hub) refused its input: retrying cannot help
    blocked: tuple[str, str] | None = None  # (reason, message): something outside the run it waits on
    unknown_fields: tuple[str, ...] = ()  # spec fields the executor dropped (a newer CRD): reported, not fatal


@dataclass(frozen=True)
class RunBranchStage:
    branch: str
    cycle: int
    stage: Stage
    attempt: int = 0  # > 0: a replacement of a failed attempt (its own Job)


@dataclass(frozen=True)
class RunDiagnose:
    cycle: int
    attempt: int = 0  # > 0: a replacement of a failed diagnose Job


@dataclass(frozen=True)
class RunMerge:
    ready: bool
    attempt: int = 0  # > 0: a replacement of a failed merge Job


@dataclass(frozen=True)
class StopWork:
    reason: str


@dataclass(frozen=True)
class Event:
    type: str  # "Normal" | "Warning"
    reason: str
    message: str
    # set on a stage/phase transition: the label that ended and how long it ran
    ended: str | None = None
    duration_s: float | None = None
    started: str | None = None


Action = RunBranchStage | RunDiagnose | RunMerge | StopWork | Event


# ---------------------------------------------------------------------------
# Pure helpers


def stages_of(spec: CoPDRunSpec, status: RunStatus | None = None) -> list[Stage]:
    """The stages of the current cycle: RL and OPD when some branch has steps in them, then Diagnose.
    Mode adaptive reads the cycle's plan from `status.consolidation`."""
    phases = status.consolidation if status is not None else initial_phases(spec)
    s = []
    for st in (Stage.RL, Stage.OPD):
        if any(stage_work(spec, phases, b.name, st.value).steps > 0 for b in spec.branches):
            s.append(st)
    s.append(Stage.DIAGNOSE)
    return s


def steps_of(spec: CoPDRunSpec, stage: Stage, status: RunStatus | None = None, branch: str | None = None) -> int:
    """Steps of `branch` in `stage` this cycle (`consolidation.stage_work`); without a branch or a
    status, the schedule's per-cycle count."""
    if stage not in (Stage.RL, Stage.OPD):
        return 0
    if status is None or branch is None:
        return {Stage.RL: spec.schedule.rl_steps_per_cycle, Stage.OPD: spec.schedule.opd_steps_per_cycle}[stage]
    return stage_work(spec, status.consolidation, branch, stage.value).steps


def phase_label(status: RunStatus) -> str:
    """A single label for metrics/timeline: the stage while running, else the phase."""
    return status.stage.value if status.phase == Phase.RUNNING and status.stage else status.phase.value


def _parse(ts: str, now: datetime) -> datetime:
    return datetime.strptime(ts, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=now.tzinfo)


def _seconds_since(ts: str | None, now: datetime) -> float | None:
    if not ts:
        return None
    return max(0.0, (now - _parse(ts, now)).total_seconds())


def next_wakeup_s(status: RunStatus, now: datetime) -> float | None:
    """Seconds until the earliest pending retry (a branch attempt in backoff), so an executor can come back
    then; None when nothing waits on the clock."""
    waits = [(_parse(b.retry_time, now) - now).total_seconds() for b in status.branches.values()
             if b.retry_time and not b.done]
    return max(0.0, min(waits)) if waits and status.phase == Phase.RUNNING else None


# ---------------------------------------------------------------------------
# The decision


class _Decision:
    """Accumulates one reconcile's status edits and actions."""

    def __init__(self, spec: CoPDRunSpec, status: RunStatus, now: datetime, gen: int):
        self.spec, self.now, self.gen = spec, now, gen
        self.s = status.model_copy(deep=True)
        self.actions: list[Action] = []

    def cond(self, type_: str, status: bool, reason: str, message: str = "") -> None:
        self.s.conditions = set_condition(
            self.s.conditions, type_, "True" if status else "False", reason, message, self.now, self.gen
        )

    def move_to(self, phase: Phase, stage: Stage | None, reason: str, message: str, warning: bool = False):
        ended = phase_label(self.s)
        duration = _seconds_since(self.s.stage_start_time, self.now)
        self.s.phase, self.s.stage = phase, stage
        self.s.stage_start_time = iso(self.now)
        self.actions.append(Event("Warning" if warning else "Normal", reason, message,
                                  ended=ended, duration_s=duration, started=phase_label(self.s)))

    def start_stage(self, cycle: int, stage: Stage) -> None:
        self.s.cycle = cycle
        self.s.diagnose_attempt = None  # each cycle's diagnose starts at its first attempt
        self.move_to(Phase.RUNNING, stage, R_STAGE_STARTED, f"cycle {cycle}: {stage.value}")
        if stage != Stage.DIAGNOSE:
            for name in self.s.branches:
                idle = stage_work(self.spec, self.s.consolidation, name, stage.value).steps == 0
                # a branch with no steps in this stage (mode adaptive) is done at once: the barrier waits for the others
                self.s.branches[name] = BranchStatus(cycle=cycle, stage=stage.value, done=idle,
                                                     message="no steps this cycle" if idle else "")
        self.ask_for_stage_work()

    def ask_for_stage_work(self) -> None:
        if self.s.stage == Stage.DIAGNOSE:
            self.actions.append(RunDiagnose(self.s.cycle, self.s.diagnose_attempt or 0))
            return
        for name, b in self.s.branches.items():
            if b.done or (b.retry_time and _parse(b.retry_time, self.now) > self.now):
                continue  # done, or a replacement attempt still in its backoff
            self.actions.append(RunBranchStage(name, self.s.cycle, self.s.stage, b.attempt))

    def restart_branch(self, name: str, report: BranchReport) -> bool:
        """Replace a failed stage attempt while the run's restart budget lasts; False when it is spent
        (or retrying cannot help: the trainer named a reason, e.g. InvalidInput)."""
        fp = self.spec.failure_policy
        if report.reason is not None or self.s.restarts >= fp.max_restarts:
            return False
        self.s.restarts += 1
        wait = fp.backoff_s(self.s.restarts)
        b = self.s.branches[name]
        self.s.branches[name] = b.model_copy(update={
            "attempt": b.attempt + 1, "retry_time": iso(self.now + timedelta(seconds=wait)),
            "message": f"attempt {b.attempt + 1} after: {report.message}"[:1000]})
        self.actions.append(Event(
            "Warning", R_BRANCH_RESTARTED,
            f"branch {name}, cycle {self.s.cycle} {self.s.stage.value} failed ({report.message[:300]}); "
            f"restart {self.s.restarts}/{fp.max_restarts} in {wait:.0f}s from its newest checkpoint"))
        return True

    def restart_job(self, piece: str, reason: str | None, message: str) -> bool:
        """Replace a failed diagnose or merge Job (`piece`) from the same run-level budget as branch stages;
        False when it is spent or the Job named a reason (e.g. InvalidInput, StorageFull). No extra backoff:
        the Job's own pod retries (backoffLimit, with Kubernetes' backoff) came first; both are idempotent
        (they read the checkpoints and rewrite their output)."""
        fp = self.spec.failure_policy
        if reason is not None or self.s.restarts >= fp.max_restarts:
            return False
        self.s.restarts += 1
        field = f"{piece}_attempt"
        attempt = (getattr(self.s, field) or 0) + 1
        setattr(self.s, field, attempt)
        what = f"cycle {self.s.cycle} diagnose" if piece == "diagnose" else "merge"
        self.actions.append(Event(
            "Warning", R_DIAGNOSE_RESTARTED if piece == "diagnose" else R_MERGE_RESTARTED,
            f"{what} failed ({message[:300]}); attempt {attempt}, restart {self.s.restarts}/{fp.max_restarts}"))
        return True

    def cond_changed(self, type_: str, status: bool, reason: str, message: str) -> bool:
        """Set a condition; True when its status, reason or message changed (worth an event)."""
        old = condition(self.s.conditions, type_)
        want = "True" if status else "False"
        self.cond(type_, status, reason, message)
        return old is None or (old.status, old.reason, old.message) != (want, reason, message)

    def fail(self, reason: str, message: str) -> None:
        self.move_to(Phase.FAILED, None, reason, message, warning=True)
        self.s.completion_time = iso(self.now)
        self.cond(COND_FAILED, True, reason, message)
        self.cond(COND_PROGRESSING, False, reason, message)
        self.actions.append(StopWork(reason))

    def next_stage(self) -> Stage:
        """The stage after the current one. The schedule may have been edited during the stage (e.g.
        its step count set to 0, so it is no longer in `stages_of`): the next stage is then the first
        remaining one after it in RL -> OPD -> Diagnose order, never an error."""
        canonical = list(Stage)
        here = canonical.index(self.s.stage)
        return next(st for st in stages_of(self.spec, self.s) if canonical.index(st) > here)


def fail_run(
    status: RunStatus, reason: str, message: str, now: datetime, generation: int = 0
) -> tuple[RunStatus, list[Action]]:
    """The one failure decision, for executors that cannot call `decide` (e.g. a spec the apiserver
    admitted but the model refuses): the same status edits, event and StopWork as a failure inside it."""
    d = _Decision(None, status, now, generation)  # type: ignore[arg-type]  # failing needs no spec
    d.s.observed_generation = generation
    if d.s.phase in TERMINAL:
        return d.s, []
    d.fail(reason, message)
    return d.s, d.actions


def decide(
    spec: CoPDRunSpec, status: RunStatus, observed: Observed, now: datetime, generation: int = 0
) -> tuple[RunStatus, list[Action]]:
    d = _Decision(spec, status, now, generation)
    s = d.s
    s.observed_generation = generation
    for name in [b.name for b in spec.branches]:
        s.branches.setdefault(name, BranchStatus())

    if s.phase in TERMINAL:
        return s, d.actions

    if observed.invalid_spec:
        d.fail(R_INVALID_SPEC, observed.invalid_spec)
        return s, d.actions
    if observed.invalid_input:
        d.fail(R_INVALID_INPUT, observed.invalid_input)
        return s, d.actions

    # -- spec fields this executor does not know: reported, not fatal ------------
    if observed.unknown_fields:
        msg = "ignored fields this operator does not know: " + ", ".join(observed.unknown_fields)
        if d.cond_changed(COND_SPEC_WARNING, True, R_UNKNOWN_FIELDS, msg):
            d.actions.append(Event("Warning", R_UNKNOWN_FIELDS, msg))
    elif (c := condition(s.conditions, COND_SPEC_WARNING)) is not None and c.status == "True":
        d.cond(COND_SPEC_WARNING, False, R_NO_UNKNOWN_FIELDS, "every spec field is known")

    # -- suspend / resume -----------------------------------------------------
    if spec.suspend:
        if s.phase != Phase.SUSPENDED:
            d.move_to(Phase.SUSPENDED, s.stage, R_SUSPENDED, "spec.suspend is true: stopping after a checkpoint")
            d.cond(COND_PROGRESSING, False, R_SUSPENDED, "suspended")
        d.actions.append(StopWork(R_SUSPENDED))
        return s, d.actions

    # -- waiting on something outside the run (transient): no new work, no failure --
    if observed.blocked:
        reason, msg = observed.blocked
        if d.cond_changed(COND_BLOCKED, True, reason, msg):
            d.actions.append(Event("Warning", reason, f"waiting: {msg}"))
        return s, d.actions
    if (c := condition(s.conditions, COND_BLOCKED)) is not None and c.status == "True":
        d.cond(COND_BLOCKED, False, R_UNBLOCKED, f"no longer waiting ({c.reason})")
        d.actions.append(Event("Normal", R_UNBLOCKED, f"no longer waiting: {c.message}"))

    if s.phase == Phase.SUSPENDED:
        resumed_to = Phase.MERGING if s.stage is None and s.cycle > 0 else (
            Phase.RUNNING if s.cycle > 0 else Phase.PENDING)
        d.move_to(resumed_to, s.stage, R_RESUMED, "resuming from the last complete checkpoint")
        if resumed_to != Phase.PENDING:
            d.cond(COND_PROGRESSING, True, R_RESUMED, "training")

    # -- Pending -> first stage -------------------------------------------------
    if s.phase == Phase.PENDING:
        s.start_time = s.start_time or iso(now)
        d.cond(COND_READY, True, R_STARTED, "run accepted")
        d.cond(COND_PROGRESSING, True, R_STARTED, "training")
        d.cond(COND_MERGE_READY, False, "NotMeasured", "no diagnostics yet")
        s.consolidation = initial_phases(spec)
        d.start_stage(1, stages_of(spec, s)[0])
        return s, d.actions

    # -- Running ----------------------------------------------------------------
    if s.phase == Phase.RUNNING:
        if s.stage == Stage.DIAGNOSE:
            _decide_diagnose(d, observed)
        else:
            _decide_branch_stage(d, observed)
        return s, d.actions

    # -- Merging ----------------------------------------------------------------
    if s.phase == Phase.MERGING:
        m = observed.merge
        if m is not None and m.failed and d.restart_job("merge", m.reason, m.message):
            d.actions.append(RunMerge(ready=s.merge_ready, attempt=s.merge_attempt or 0))
        elif m is not None and m.failed:
            budget = (f" (restart budget {spec.failure_policy.max_restarts} spent)"
                      if m.reason is None and spec.failure_policy.max_restarts else "")
            d.cond(COND_SUCCEEDED, False, m.reason or R_MERGE_FAILED, m.message)
            d.fail(m.reason or R_MERGE_FAILED, (m.message or "merge failed") + budget)
        elif m is not None and m.done:
            s.merged_model = m.path
            s.completion_time = iso(now)
            d.move_to(Phase.SUCCEEDED, None, R_MERGED, f"merged model at {m.path}")
            d.cond(COND_SUCCEEDED, True, R_MERGED, f"merged model at {m.path}")
            d.cond(COND_PROGRESSING, False, R_MERGED, "done")
            d.actions.append(StopWork(R_MERGED))
        else:
            d.actions.append(RunMerge(ready=s.merge_ready, attempt=s.merge_attempt or 0))
    return s, d.actions


def _decide_branch_stage(d: _Decision, observed: Observed) -> None:
    s = d.s
    for name, report in observed.branches.items():
        if name not in s.branches or report.cycle != s.cycle or report.stage != s.stage:
            continue  # a report about another stage: stale, ignore
        if report.storage_warning:
            msg = f"branch {name}: {report.storage_warning}"
            if d.cond_changed(COND_STORAGE_WARNING, True, R_CHECKPOINTS_MAY_NOT_FIT, msg):
                d.actions.append(Event("Warning", R_CHECKPOINTS_MAY_NOT_FIT, msg))
        if report.failed:
            if s.branches[name].done or d.restart_branch(name, report):
                continue
            budget = (f" (restart budget {d.spec.failure_policy.max_restarts} spent)"
                      if report.reason is None and d.spec.failure_policy.max_restarts else "")
            d.fail(report.reason or R_BRANCH_FAILED,
                   f"branch {name}, cycle {s.cycle} {s.stage.value}: {report.message}{budget}")
            return
        b = s.branches[name]
        if b.done and b.cycle == s.cycle and b.stage == s.stage.value:
            continue  # its report is already in status: a later read (pod gone, empty message) must not overwrite it
        s.branches[name] = BranchStatus(
            cycle=s.cycle, stage=s.stage.value, step=max(b.step, report.step),
            reward=report.reward if report.reward is not None else b.reward,
            done=b.done or report.done, message=report.message,
            attempt=b.attempt, retry_time=None if report.done else b.retry_time,
        )
    if all(b.done for b in s.branches.values()):
        d.start_stage(s.cycle, d.next_stage())
    else:
        d.ask_for_stage_work()


def _decide_diagnose(d: _Decision, observed: Observed) -> None:
    s, spec = d.s, d.spec
    rep = observed.diagnose
    if rep is None or rep.cycle != s.cycle:
        d.ask_for_stage_work()
        return
    if rep.failed:
        if d.restart_job("diagnose", rep.reason, rep.message):
            d.ask_for_stage_work()
            return
        budget = (f" (restart budget {spec.failure_policy.max_restarts} spent)"
                  if rep.reason is None and spec.failure_policy.max_restarts else "")
        d.fail(rep.reason or R_DIAGNOSE_FAILED, rep.message + budget)
        return
    s.diagnostics = [DiagnosticStatus(**x.as_dict()) for x in rep.diagnostics]
    if rep.diagnostics:
        s.min_topk_overlap = min(x.topk_overlap for x in rep.diagnostics)
        s.max_symmetric_kl = max(x.symmetric_kl for x in rep.diagnostics)
    r = spec.merge_readiness
    ready, reason, message = merge_readiness(
        list(rep.diagnostics), s.cycle, spec.readiness_from_cycle(), r.min_topk_overlap, r.max_symmetric_kl
    )
    s.merge_ready = ready
    d.cond(COND_MERGE_READY, ready, reason, message)
    if ready:
        d.move_to(Phase.MERGING, None, R_MERGING, f"branches aligned after cycle {s.cycle}: {message}")
        d.actions.append(RunMerge(ready=True))
    elif s.cycle < spec.schedule.cycles:
        if adaptive(spec):
            _plan_next_cycle(d, rep)
        d.start_stage(s.cycle + 1, stages_of(spec, s)[0])
    elif spec.merge.when_not_ready == NotReadyPolicy.MERGE:
        d.move_to(Phase.MERGING, None, R_MERGE_WITHOUT_READINESS,
                  f"last cycle ended without readiness ({message}); merging as merge.whenNotReady=merge",
                  warning=True)
        d.actions.append(RunMerge(ready=False))
    else:
        d.fail(R_NOT_ALIGNED, f"last cycle ended without readiness ({message}); merge.whenNotReady=fail")


def _plan_next_cycle(d: _Decision, rep: DiagnoseReport) -> None:
    """Mode adaptive: each direction's state for the next cycle from this cycle's alignments
    (`consolidation.next_phases`), reported as one event."""
    s = d.s
    before = s.consolidation or initial_phases(d.spec)
    s.consolidation = next_phases(d.spec.schedule.adaptive, before, alignment_of(rep.diagnostics))
    on = [f"{p.student}<-{p.teacher}" for p in s.consolidation if p.distilling]
    off = [f"{p.student}<-{p.teacher} ({p.reason})" for p in s.consolidation if not p.distilling]
    d.actions.append(Event("Normal", R_CONSOLIDATION,
                           f"cycle {s.cycle + 1}: distilling {', '.join(on) or 'none'}; resting {', '.join(off) or 'none'}"))
