"""Adaptive consolidation (schedule.mode: adaptive): the pure per-direction rule, the budget it keeps,
and how `decide` drives it from the Diagnose stage's alignments. No I/O, no clock."""

import itertools
import random

import pytest

from copd_core.consolidation import (
    R_ALIGNED,
    R_DIVERGED,
    R_HOLD,
    R_MAX_PHASE,
    R_MIN_PHASE,
    DirectionPhase,
    StageWork,
    initial_phases,
    next_phase,
    next_phases,
    stage_work,
)
from copd_core.cycle import (
    DiagnoseReport,
    Event,
    Observed,
    Phase,
    RunBranchStage,
    RunDiagnose,
    RunStatus,
    Stage,
    stages_of,
    steps_of,
)
from copd_core.readiness import DirectionDiagnostic
from copd_core.spec import AdaptiveSpec
from tests.unit.core.test_cycle import SpecBuilder, done, step, work

A = AdaptiveSpec(lower_alignment=0.90, upper_alignment=0.95, min_phase_cycles=2, max_phase_cycles=3)


def on(cycles=0):
    return DirectionPhase(student="a", teacher="b", distilling=True, phase_cycles=cycles)


def off(cycles=0):
    return DirectionPhase(student="a", teacher="b", distilling=False, phase_cycles=cycles)


@pytest.mark.parametrize("phase, alignment, distilling, reason, cycles", [
    # distilling: at least minPhaseCycles (2) even when aligned
    (on(0), 0.99, True, R_MIN_PHASE, 1),
    # ... then stops above the upper threshold
    (on(1), 0.99, False, R_ALIGNED, 0),
    # between the thresholds: keeps distilling (hysteresis)
    (on(1), 0.93, True, R_HOLD, 2),
    # below the lower one: keeps distilling
    (on(1), 0.50, True, R_HOLD, 2),
    # at most maxPhaseCycles (3), aligned or not
    (on(2), 0.50, False, R_MAX_PHASE, 0),
    # exactly at the upper threshold is not above it
    (on(1), 0.95, True, R_HOLD, 2),
    # resting: starts again only below the lower threshold
    (off(0), 0.93, False, R_HOLD, 1),
    (off(4), 0.96, False, R_HOLD, 5),
    (off(0), 0.89, True, R_DIVERGED, 0),
    (off(0), 0.90, False, R_HOLD, 1),  # at the lower threshold is not below it
    # nothing measured (None or NaN): the state holds, the cycle counts
    (on(1), None, True, R_HOLD, 2),
    (off(1), float("nan"), False, R_HOLD, 2),
])
def test_next_phase_rule(phase, alignment, distilling, reason, cycles):
    got = next_phase(A, phase, alignment)
    assert (got.distilling, got.reason, got.phase_cycles) == (distilling, reason, cycles)
    assert got.alignment == (alignment if alignment is not None and alignment == alignment else phase.alignment)


def test_hysteresis_does_not_flap_between_the_thresholds():
    """An alignment that wanders inside [lower, upper] never changes a direction's state."""
    a = AdaptiveSpec(lower_alignment=0.9, upper_alignment=0.95, min_phase_cycles=1)
    rng = random.Random(0)
    for start in (on(), off()):
        p = start
        for _ in range(50):
            p = next_phase(a, p, rng.uniform(0.9, 0.95))
            assert p.distilling == start.distilling and p.reason == R_HOLD


def test_max_phase_forces_a_rest_then_a_diverged_direction_restarts():
    a = AdaptiveSpec(lower_alignment=0.9, upper_alignment=0.95, min_phase_cycles=1, max_phase_cycles=2)
    states = []
    p = on()
    for _ in range(6):
        p = next_phase(a, p, 0.5)  # never aligned
        states.append(p.distilling)
    assert states == [True, False, True, True, False, True]


def _spec(**adaptive):
    return SpecBuilder().set("schedule", mode="adaptive", adaptive=adaptive or {}).obj()


def test_budget_is_the_fixed_schedules_for_every_plan():
    """Whatever directions distil, every branch spends S_RL + S_OPD updates per cycle, and OPD only
    with a distilling teacher."""
    doc = SpecBuilder().set("schedule", mode="adaptive", cycles=3, rlStepsPerCycle=5, opdStepsPerCycle=3)
    doc.doc["spec"]["branches"].append({"name": "c", "dataset": {"builtin": "maxbox"}})
    spec = doc.obj()
    dirs = spec.directions()
    assert len(dirs) == 6
    for mask in itertools.product([False, True], repeat=len(dirs)):
        phases = [DirectionPhase(student=s, teacher=t, distilling=m) for (s, t), m in zip(dirs, mask)]
        for b in ("a", "b", "c"):
            rl, opd = stage_work(spec, phases, b, "RL"), stage_work(spec, phases, b, "OPD")
            assert rl.steps + opd.steps == 8
            want = tuple(t for (s, t), m in zip(dirs, mask) if s == b and m)
            assert opd.teachers == want and (opd.steps == 3) == bool(want)


def test_fixed_mode_plans_every_teacher_and_keeps_no_phases():
    spec = SpecBuilder().obj()
    assert initial_phases(spec) == []
    assert stage_work(spec, [], "a", "RL").steps == 3
    assert stage_work(spec, [], "a", "OPD") == StageWork(2, ("b",))
    s, _ = step(spec, RunStatus())
    assert s.consolidation == []


def _diag(cycle, ab, ba):
    return Observed(diagnose=DiagnoseReport(cycle, (
        DirectionDiagnostic(cycle, "a", "b", 0.8, 0.3, ab), DirectionDiagnostic(cycle, "b", "a", 0.8, 0.3, ba))))


def _cycle(spec, s, cycle, minutes):
    """Complete the stages of `cycle` the status asks for (RL, OPD when any branch distils) up to Diagnose."""
    for st in (Stage.RL, Stage.OPD):
        if s.stage == st:
            busy = [a.branch for a in work(step(spec, s, minutes=minutes)[1]) if isinstance(a, RunBranchStage)]
            s, _ = step(spec, s, done(cycle, st, *busy), minutes=minutes)
    assert s.stage == Stage.DIAGNOSE
    return s


def test_decide_plans_each_cycle_from_the_diagnose_alignments():
    spec = _spec(lowerAlignment=0.9, upperAlignment=0.95, minPhaseCycles=1)
    spec.merge_readiness.min_cycles = 99  # never merge early (not validated again here)
    s, acts = step(spec, RunStatus())
    # cycle 1: nothing measured, every direction distils; the fixed schedule's steps
    assert [p.distilling for p in s.consolidation] == [True, True]
    assert work(acts) == [RunBranchStage("a", 1, Stage.RL), RunBranchStage("b", 1, Stage.RL)]
    assert steps_of(spec, Stage.RL, s, "a") == 3 and steps_of(spec, Stage.OPD, s, "a") == 2
    s = _cycle(spec, s, 1, 2)

    # a<-b aligned (0.97 > upper): it rests; b<-a diverged (0.5): it keeps distilling
    s, acts = step(spec, s, _diag(1, 0.97, 0.5), minutes=3)
    assert (s.cycle, s.stage) == (2, Stage.RL)
    got = {(p.student, p.teacher): (p.distilling, p.reason, p.alignment) for p in s.consolidation}
    assert got == {("a", "b"): (False, R_ALIGNED, 0.97), ("b", "a"): (True, R_HOLD, 0.5)}
    ev = [a for a in acts if isinstance(a, Event) and a.reason == "ConsolidationPlanned"]
    assert len(ev) == 1 and "distilling b<-a" in ev[0].message and "a<-b (Aligned)" in ev[0].message
    # a spends its OPD steps on RL: 3 + 2; b keeps 3 RL + 2 OPD
    assert steps_of(spec, Stage.RL, s, "a") == 5 and steps_of(spec, Stage.OPD, s, "a") == 0
    assert steps_of(spec, Stage.RL, s, "b") == 3 and steps_of(spec, Stage.OPD, s, "b") == 2
    s, _ = step(spec, s, done(2, Stage.RL, "a", "b"), minutes=4)
    # OPD: only b works; a is done at once (the barrier waits for b)
    assert s.stage == Stage.OPD and s.branches["a"].done and not s.branches["b"].done
    s, acts = step(spec, s, minutes=5)
    assert work(acts) == [RunBranchStage("b", 2, Stage.OPD)]
    s, acts = step(spec, s, done(2, Stage.OPD, "b"), minutes=6)
    assert s.stage == Stage.DIAGNOSE and work(acts) == [RunDiagnose(2)]

    # both aligned: nobody distils in cycle 3, so it has no OPD stage
    spec.schedule.cycles = 3
    s, _ = step(spec, s, _diag(2, 0.99, 0.99), minutes=7)
    assert [p.distilling for p in s.consolidation] == [False, False]
    assert stages_of(spec, s) == [Stage.RL, Stage.DIAGNOSE]
    s, acts = step(spec, s, done(3, Stage.RL, "a", "b"), minutes=8)
    assert (s.cycle, s.stage) == (3, Stage.DIAGNOSE) and work(acts) == [RunDiagnose(3)]


def test_missing_alignment_keeps_the_state_and_a_fixed_run_ignores_mass_overlap():
    spec = _spec(lowerAlignment=0.9, upperAlignment=0.95)
    spec.merge_readiness.min_cycles = 99
    s, _ = step(spec, RunStatus())
    s = _cycle(spec, s, 1, 2)
    old_rows = Observed(diagnose=DiagnoseReport(1, (DirectionDiagnostic(1, "a", "b", 0.8, 0.3),
                                                    DirectionDiagnostic(1, "b", "a", 0.8, 0.3))))
    s, _ = step(spec, s, old_rows, minutes=3)
    assert [(p.distilling, p.reason) for p in s.consolidation] == [(True, R_HOLD), (True, R_HOLD)]

    fixed = SpecBuilder().obj()
    fixed.merge_readiness.min_cycles = 99
    f, _ = step(fixed, RunStatus())
    f = _cycle(fixed, f, 1, 2)
    f, acts = step(fixed, f, _diag(1, 0.99, 0.99), minutes=3)
    assert f.consolidation == [] and f.phase == Phase.RUNNING and f.stage == Stage.RL
    assert work(acts) == [RunBranchStage("a", 2, Stage.RL), RunBranchStage("b", 2, Stage.RL)]
    assert f.diagnostics[0].mass_overlap == 0.99  # reported next to top-k overlap either way


def test_next_phases_keeps_order_and_uses_only_its_own_direction():
    phases = initial_phases(_spec())
    got = next_phases(A, phases, {("b", "a"): 0.99})
    assert [(p.student, p.teacher) for p in got] == [("a", "b"), ("b", "a")]
    assert got[0].alignment is None and got[1].alignment == 0.99
