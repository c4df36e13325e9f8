"""The per-cycle Diagnose stage: how aligned are the branches now?

For every ordered pair of branches the merge averages (`readiness_directions`: in
hub-and-spoke this includes spoke↔spoke pairs, not only the OPD topology's), the student samples on
a fixed probe set (the first `diagnostics.probePrompts` eval prompts of the
teacher's domain, same seed every cycle) and both models' full next-token
distributions are compared on those visited states: exact top-k overlap and
exact symmetric KL, averaged over response tokens. The hub runs this (it holds
every branch's weights); `copd run` runs it in-process.

Memory stays bounded: both models' hidden states are taken at the response
positions only and the full-vocabulary comparison runs a few positions at a time
(`maths.diagnostics.alignment_M`); at most two policies are loaded at once.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from copd_core.readiness import DirectionDiagnostic
from copd_core.seeding import step_seed
from copd_core.spec import CoPDRunSpec
from copd_runtime.data.examples import Dataset
from copd_runtime.maths.diagnostics import alignment_M
from copd_runtime.models.device import Placement, placement
from copd_runtime.models.policy import Policy, load_policy
from copd_runtime.rollout import lm_head_of, response_hidden_M_H, sample

MAX_LOADED = 2  # policies held in memory at once by `diagnose` (a direction needs two)


@torch.no_grad()
def measure_alignment(student: Policy, teacher: Policy, probe, k: int, max_new_tokens: int, temperature: float,
                      seed: int) -> tuple[float, float, float]:
    """(top-k overlap, symmetric KL, mass overlap on the top-k union), means over the visited states."""
    torch.manual_seed(seed)
    rollout = sample(student, probe, max_new_tokens, temperature, logprobs=False)
    teacher.model.eval()
    overlap, skl, mass = alignment_M(
        lm_head_of(student), response_hidden_M_H(student, rollout), lm_head_of(teacher),
        response_hidden_M_H(teacher, rollout.to(teacher.device)).to(student.device), temperature, k,
        with_mass_overlap=True)
    if overlap.numel() == 0:
        return float("nan"), float("nan"), float("nan")
    return float(overlap.mean()), float(skl.mean()), float(mass.mean())


def measure_direction(student: Policy, teacher: Policy, probe, k: int, max_new_tokens: int, temperature: float,
                      seed: int) -> tuple[float, float]:
    """(top-k overlap, symmetric KL): `measure_alignment` without the mass overlap."""
    return measure_alignment(student, teacher, probe, k, max_new_tokens, temperature, seed)[:2]


def diagnose(spec: CoPDRunSpec, model_dirs: dict[str, Path], datasets: dict[str, Dataset], cycle: int,
             place: Placement | None = None) -> list[DirectionDiagnostic]:
    place = place or placement(spec.trainer.precision)
    loaded: dict[str, Policy] = {}  # least recently used first

    def policy(name: str) -> Policy:
        if name in loaded:
            loaded[name] = loaded.pop(name)
        else:
            while len(loaded) >= MAX_LOADED:
                loaded.pop(next(iter(loaded)))
            loaded[name] = load_policy(model_dirs[name], spec.base_model.kind, place)
        return loaded[name]

    directions = list(spec.readiness_directions())
    got: dict[tuple[str, str], DirectionDiagnostic] = {}
    for student, teacher in visiting_order(directions):
        probe = datasets[teacher].eval[: spec.diagnostics.probe_prompts]
        s = policy(student)
        ov, kl, mass = measure_alignment(
            s, policy(teacher), probe, spec.diagnostics.top_k, spec.rl.max_new_tokens,
            spec.rl.temperature, step_seed(spec.seed, "probe", student, teacher),
        )
        got[(student, teacher)] = DirectionDiagnostic(cycle, student, teacher, ov, kl, mass)
    return [got[d] for d in directions]


def visiting_order(directions: list[tuple[str, str]], capacity: int = MAX_LOADED) -> list[tuple[str, str]]:
    """The directions reordered so that `diagnose`'s cache of `capacity` policies (least recently
    used out; a direction uses its student, then its teacher) loads few of them: greedily the next
    direction needing the fewest loads, ties in the spec's order. Each direction has its own probe
    seed, so the order changes no result. Three branches (six directions) in the spec's order load
    a policy 8 times; in this order 4 (one per pair after the first two: the fewest possible)."""
    left = list(directions)
    cache: list[str] = []  # least recently used first
    out = []

    def use(c: list[str], name: str) -> int:
        if name in c:
            c.remove(name)
            c.append(name)
            return 0
        if len(c) >= capacity:
            c.pop(0)
        c.append(name)
        return 1

    while left:
        def cost(d):
            c = list(cache)
            return use(c, d[0]) + use(c, d[1])
        d = min(left, key=cost)
        left.remove(d)
        use(cache, d[0])
        use(cache, d[1])
        out.append(d)
    return out


def loads(directions: list[tuple[str, str]], capacity: int = MAX_LOADED) -> int:
    """How many policy loads `diagnose` makes visiting `directions` in this order."""
    cache: list[str] = []
    n = 0
    for d in directions:
        for name in d:
            if name in cache:
                cache.remove(name)
            else:
                n += 1
                if len(cache) >= capacity:
                    cache.pop(0)
            cache.append(name)
    return n


TERMINATION_MESSAGE_BUDGET = 3500  # bytes; Kubernetes keeps at most 4096 of a termination message


def compact_report(cycle: int, rows: list[DirectionDiagnostic], budget: int = TERMINATION_MESSAGE_BUDGET) -> dict:
    """The diagnose result as the operator reads it from a termination message.

    Rows are `[student, teacher, overlap, symmetric_kl, mass_overlap]` (the last when measured).
    When every direction does not fit (large meshes: K·(K−1) directions), only each student's
    lowest-overlap and highest-KL directions are kept: the readiness test needs just the global
    extremes, which are among them (an adaptive schedule then keeps the state of the directions
    left out for that cycle). The full list is always in the run's storage.
    """
    def row(d: DirectionDiagnostic) -> list:
        r = [d.student, d.teacher, round(d.topk_overlap, 4), round(d.symmetric_kl, 4)]
        return r + [round(d.mass_overlap, 4)] if d.mass_overlap is not None and d.mass_overlap == d.mass_overlap else r

    report = {"cycle": cycle, "directions": [row(d) for d in rows], "total": len(rows)}
    if len(json.dumps(report)) <= budget:
        return report
    keep: list[DirectionDiagnostic] = []
    for student in dict.fromkeys(d.student for d in rows):
        mine = [d for d in rows if d.student == student]
        for d in (min(mine, key=lambda x: x.topk_overlap), max(mine, key=lambda x: x.symmetric_kl)):
            if d not in keep:
                keep.append(d)
    return {"cycle": cycle, "directions": [row(d) for d in keep], "total": len(rows), "partial": True}
