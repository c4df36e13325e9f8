"""Pilot study of the comparison: OPD gain as a function of teacher–student top-k overlap.

From the common start (the base model) a teacher is trained with GRPO on one
domain; its checkpoints after n ∈ `pilot.teacherSteps` RL steps are teachers at
increasing distance. For each, a fresh copy of the base (the student) measures
the top-k overlap / symmetric KL to the teacher on the teacher's probe prompts
(states the student visits), then spends the same fixed OPD budget distilling
from it. Reported: the student's gain on the teacher's domain, and the fraction
of the teacher's lead that it absorbed. Caveat: older teachers are both farther
AND better, so the raw gain mixes "more to learn" with "harder to learn";
the absorbed fraction is the quantity to read against overlap.
"""

from __future__ import annotations

import copy

from copd_core.seeding import step_seed
from copd_runtime.recipes.diagnose import measure_direction
from copd_runtime.recipes.evaluate import accuracy
from copd_runtime.recipes.opd import opd_step
from experiments.compare.context import Ctx, MemoryHub, do_rl, seeded


def pilot_jobs(pilot) -> list[tuple[str, int]]:
    return [(d, s) for s in pilot.seeds for d in pilot.domains]


def run_pilot_one(ctx: Ctx, domain: str, seed: int) -> dict:
    s, p = ctx.spec, ctx.spec.pilot
    ds = ctx.data[domain]
    mnt = s.rl.max_new_tokens
    teacher = ctx.branch(domain)
    snaps = {}
    for n in sorted(set(p.teacher_steps)):
        do_rl(ctx, teacher, n - teacher.rl_steps, seed)
        snaps[n] = copy.deepcopy(teacher.policy)
    before = ctx.base_eval[domain]
    probe = ds.eval[: s.diagnostics.probe_prompts]
    rows = []
    for n, t in snaps.items():
        ov, kl = measure_direction(ctx.base, t, probe, s.diagnostics.top_k, mnt, s.rl.temperature,
                                   step_seed(seed, "pilot-probe", domain))
        t_acc = accuracy(t, ds, mnt)
        student = ctx.branch("student")
        hub = MemoryHub({domain: t}, s.rl.temperature)
        opd_ov = []
        for i in range(p.opd_steps):
            rng = seeded(seed, "pilot-OPD", domain, i)  # same draws for every teacher
            m = opd_step(student.policy, student.optimizer, {domain: ds}, hub, s.opd.beta, s.rl, s.opd,
                         s.diagnostics, rng)
            opd_ov.append(m[f"topk_overlap/{domain}"])
        after = accuracy(student.policy, ds, mnt)
        lead = t_acc - before
        rows.append({
            "domain": domain, "seed": seed, "teacher_steps": n,
            "topk_overlap": ov, "symmetric_kl": kl, "opd_overlap_mean": sum(opd_ov) / len(opd_ov),
            "teacher_acc": round(t_acc, 4), "student_before": before, "student_after": round(after, 4),
            "gain": round(after - before, 4),
            "absorbed": round((after - before) / lead, 4) if lead >= 0.05 else None,
        })
    return {"domain": domain, "seed": seed, "rows": rows}
