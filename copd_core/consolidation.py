"""Adaptive consolidation: which directions distil in the next cycle. Pure, no torch, no I/O.

`schedule.mode: adaptive` (copd_core.spec.AdaptiveSpec). A *direction* is an OPD pair
(student ← teacher) of the topology (`CoPDRunSpec.directions`). Its *alignment* is the mass
overlap Σ_v min(p_v, q_v) of the student's and the teacher's next-token distributions over the
union of both top-k sets, averaged over the states the student visits on the teacher's probe
prompts: the Diagnose stage measures it for every direction at the end of every cycle (the OPD
step logs the same quantity, on its own samples, as `mass_overlap/<teacher>`).

At each cycle boundary `decide` (copd_core.cycle) calls `next_phases` with the cycle's
alignments; both executors then read what each branch does in a stage from `stage_work`. The
rule, per direction, with hysteresis:

    distilling, phase < minPhaseCycles                 -> keep distilling      (MinPhase)
    distilling, phase >= maxPhaseCycles                -> rest                 (MaxPhase)
    distilling, alignment > upperAlignment             -> rest                 (Aligned)
    resting,    alignment < lowerAlignment             -> distil, a new phase  (Diverged)
    otherwise (between the thresholds, or no measure)  -> keep the state       (Hold)

Cycle 1 has no measurement yet: every direction distils (as the fixed schedule does).

The update budget is the fixed schedule's, per branch and per cycle: a branch with at least one
distilling direction runs rlStepsPerCycle RL steps then opdStepsPerCycle OPD steps (its OPD prompts
split across its distilling teachers only); a branch with none runs rlStepsPerCycle +
opdStepsPerCycle RL steps and no OPD. Either way it spends rlStepsPerCycle + opdStepsPerCycle
optimizer steps per cycle, so a run spends K · cycles · (S_RL + S_OPD), exactly as mode fixed.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from copd_core.spec import AdaptiveSpec, CoPDRunSpec, ScheduleMode

R_START = "FirstCycle"
R_MIN_PHASE = "MinPhase"
R_MAX_PHASE = "MaxPhase"
R_ALIGNED = "Aligned"
R_DIVERGED = "Diverged"
R_HOLD = "Hold"


class DirectionPhase(BaseModel):
    """Where one direction stands in the adaptive schedule (status.consolidation)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    student: str
    teacher: str
    distilling: bool = Field(description="Whether the student distils from this teacher in the current cycle.")
    phase_cycles: int = Field(0, description="Cycles completed in the current state (distilling or resting).")
    alignment: float | None = Field(None, description="Mass overlap on the top-k union at the last Diagnose.")
    reason: str = Field(R_START, description="Why the direction is in this state: FirstCycle, MinPhase, MaxPhase, "
                                             "Aligned, Diverged or Hold.")


def adaptive(spec: CoPDRunSpec) -> bool:
    return spec.schedule.mode == ScheduleMode.ADAPTIVE


def initial_phases(spec: CoPDRunSpec) -> list[DirectionPhase]:
    """Cycle 1: every direction of the topology distils (nothing is measured yet). Mode fixed: none."""
    if not adaptive(spec):
        return []
    return [DirectionPhase(student=s, teacher=t, distilling=True) for s, t in spec.directions()]


def next_phase(a: AdaptiveSpec, p: DirectionPhase, alignment: float | None) -> DirectionPhase:
    """The state of one direction for the next cycle, given the alignment measured after this one."""
    done = p.phase_cycles + 1  # this cycle counts for the current state
    measured = alignment if alignment is not None and alignment == alignment else None  # NaN: nothing measured
    keep = dict(student=p.student, teacher=p.teacher, alignment=measured if measured is not None else p.alignment)
    if p.distilling:
        if done < a.min_phase_cycles:
            return DirectionPhase(**keep, distilling=True, phase_cycles=done, reason=R_MIN_PHASE)
        if a.max_phase_cycles is not None and done >= a.max_phase_cycles:
            return DirectionPhase(**keep, distilling=False, phase_cycles=0, reason=R_MAX_PHASE)
        if measured is not None and measured > a.upper_alignment:
            return DirectionPhase(**keep, distilling=False, phase_cycles=0, reason=R_ALIGNED)
        return DirectionPhase(**keep, distilling=True, phase_cycles=done, reason=R_HOLD)
    if measured is not None and measured < a.lower_alignment:
        return DirectionPhase(**keep, distilling=True, phase_cycles=0, reason=R_DIVERGED)
    return DirectionPhase(**keep, distilling=False, phase_cycles=done, reason=R_HOLD)


def next_phases(a: AdaptiveSpec, phases: list[DirectionPhase],
                alignment: dict[tuple[str, str], float]) -> list[DirectionPhase]:
    """Every direction's state for the next cycle; `alignment[(student, teacher)]` as measured after
    this cycle (a direction missing from it keeps its state, counting the cycle)."""
    return [next_phase(a, p, alignment.get((p.student, p.teacher))) for p in phases]


@dataclass(frozen=True)
class StageWork:
    """What one branch does in one stage of the current cycle."""

    steps: int
    teachers: tuple[str, ...] = ()  # OPD only: whom it distils from (empty for RL)


def stage_work(spec: CoPDRunSpec, phases: list[DirectionPhase], branch: str, stage: str) -> StageWork:
    """Steps (and, for OPD, teachers) of `branch` in `stage` ("RL" or "OPD") this cycle. Mode fixed:
    the schedule's steps and every teacher of the topology. Mode adaptive: the distilling teachers in
    `phases`; a branch with none spends the OPD steps on RL (same updates per cycle)."""
    sch = spec.schedule
    if not adaptive(spec):
        if stage == "RL":
            return StageWork(sch.rl_steps_per_cycle)
        return StageWork(sch.opd_steps_per_cycle, tuple(spec.teachers_of(branch)))
    on = {(p.student, p.teacher) for p in phases if p.distilling}
    teachers = tuple(t for t in spec.teachers_of(branch) if (branch, t) in on)
    if stage == "RL":
        return StageWork(sch.rl_steps_per_cycle + (0 if teachers else sch.opd_steps_per_cycle))
    return StageWork(sch.opd_steps_per_cycle if teachers else 0, teachers)


def alignment_of(diagnostics) -> dict[tuple[str, str], float]:
    """(student, teacher) -> mass overlap on the top-k union, from a cycle's diagnostics (rows that
    carry one)."""
    return {(d.student, d.teacher): d.mass_overlap for d in diagnostics
            if getattr(d, "mass_overlap", None) is not None}
