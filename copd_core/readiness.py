"""Merge readiness: are the branches aligned enough to average? Pure, no torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DirectionDiagnostic:
    cycle: int
    student: str
    teacher: str
    topk_overlap: float
    symmetric_kl: float
    mass_overlap: float | None = None  # Σ min(p, q) on the union of both top-k sets (adaptive schedule)

    def as_dict(self) -> dict:
        out = {
            "cycle": self.cycle,
            "student": self.student,
            "teacher": self.teacher,
            "topk_overlap": self.topk_overlap,
            "symmetric_kl": self.symmetric_kl,
        }
        if self.mass_overlap is not None:
            out["mass_overlap"] = self.mass_overlap
        return out


REASON_READY = "AlignedForMerge"
REASON_TOO_EARLY = "BeforeMinCycles"
REASON_LOW_OVERLAP = "TopKOverlapLow"
REASON_HIGH_KL = "SymmetricKLHigh"
REASON_NO_DIAGNOSTICS = "NoDiagnostics"


def merge_readiness(
    diagnostics: list[DirectionDiagnostic],
    cycle: int,
    min_cycles: int,
    min_topk_overlap: float,
    max_symmetric_kl: float,
) -> tuple[bool, str, str]:
    """(ready, reason, message) for the diagnostics of `cycle`: every direction must pass."""
    if cycle < min_cycles:
        return False, REASON_TOO_EARLY, f"cycle {cycle} < minCycles {min_cycles}"
    now = [d for d in diagnostics if d.cycle == cycle]
    if not now:
        return False, REASON_NO_DIAGNOSTICS, f"no diagnostics for cycle {cycle}"
    low = [d for d in now if not d.topk_overlap >= min_topk_overlap]
    if low:
        worst = min(low, key=lambda d: d.topk_overlap)
        return (False, REASON_LOW_OVERLAP,
                f"top-k overlap {worst.student}<-{worst.teacher} = {worst.topk_overlap:.3f} < {min_topk_overlap}")
    high = [d for d in now if not d.symmetric_kl <= max_symmetric_kl]
    if high:
        worst = max(high, key=lambda d: d.symmetric_kl)
        return (False, REASON_HIGH_KL,
                f"symmetric KL {worst.student}<-{worst.teacher} = {worst.symmetric_kl:.3f} > {max_symmetric_kl}")
    lo = min(d.topk_overlap for d in now)
    hi = max(d.symmetric_kl for d in now)
    return True, REASON_READY, f"min top-k overlap {lo:.3f}, max symmetric KL {hi:.3f} at cycle {cycle}"
