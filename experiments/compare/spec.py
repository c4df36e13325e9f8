"""The comparison's spec (`examples/compare.yaml`) and its budget arithmetic. Pure: no torch."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, model_validator

from copd_core.spec import AdaptiveSpec, DiagnosticsSpec, OPDSpec, RLSpec, _Model

BASE_METHODS = ("experts", "experts_merged", "mixed_rlvr", "static_opd", "copd", "copd_oneway", "copd_oneshot",
                "copd_adaptive")
REPO = Path(__file__).resolve().parents[2]
# The conflicting benchmark's domains (generators and verifiers in experiments/compare/interference.py):
# the same prompts "7 8=", answered "15" (plain, exact match) or "\boxed{15}" (boxed).
CONFLICTING_DOMAINS = ("plain", "boxed")


class BudgetSpec(_Model):
    cycles: int = Field(4, ge=1, le=100, description="C: RL→OPD cycles of CoPD.")
    steps_per_cycle: int = Field(15, ge=2, le=10_000, description="T = S_RL + S_OPD per branch per cycle.")
    rl_to_opd: float = Field(1.5, gt=0.0, le=100.0, description="S_RL : S_OPD of `copd` (paper default 1.5).")


class PilotSpec(_Model):
    domains: list[str] = Field(default_factory=lambda: ["arith", "reverse", "maxbox"])
    teacher_steps: list[int] = Field(default_factory=lambda: [0, 10, 20, 40, 80, 120],
                                     description="RL steps of the teacher checkpoints from the common start.")
    opd_steps: int = Field(15, ge=1, description="Fixed OPD budget the student spends on each teacher.")
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])


class CompareSpec(_Model):
    base_model: str = Field("builtin://tiny-qwen3", description="A builtin:// model, or a model directory (a "
                            "relative path is relative to the repository, e.g. experiments/compare/bases/...).")
    benchmark: Literal["separable", "conflicting"] = Field(
        "separable", description="separable: the builtin domains (each with its own prompt prefix); "
        "conflicting: `plain` and `boxed` (experiments/compare/interference.py): the same prompts, no prefix, "
        "incompatible answer conventions.")
    domains: list[str] = Field(default_factory=lambda: ["arith", "reverse", "maxbox"], min_length=2)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    budget: BudgetSpec = Field(default_factory=BudgetSpec)
    methods: list[str] = Field(default_factory=lambda: list(BASE_METHODS))
    ratios: list[float] = Field(default_factory=lambda: [0.5, 1.0, 1.5, 3.0],
                                description="S_RL:S_OPD ablation; one `copd@r` method per ratio.")
    rl: RLSpec = Field(default_factory=lambda: RLSpec(learning_rate=5e-4, max_new_tokens=12))
    opd: OPDSpec = Field(default_factory=OPDSpec)
    adaptive: AdaptiveSpec = Field(default_factory=AdaptiveSpec,
                                   description="Thresholds of `copd_adaptive` (schedule.mode adaptive, at copd's "
                                               "S_RL:S_OPD and budget).")
    diagnostics: DiagnosticsSpec = Field(default_factory=DiagnosticsSpec)
    eval_size: int = Field(200, ge=8, description="Held-out examples per domain.")
    data_seed: int = Field(0, ge=0, description="Seed of the datasets (the same for every method and seed).")
    static_opd_student: Literal["base", "mixed"] = Field(
        "base", description="Student of static OPD (only `base`, the common start, is implemented).")
    pilot: PilotSpec | None = Field(default_factory=PilotSpec)

    @model_validator(mode="after")
    def _check(self) -> CompareSpec:
        unknown = [m for m in self.methods if m not in BASE_METHODS]
        if unknown:
            raise ValueError(f"methods: unknown {unknown}; known {list(BASE_METHODS)} (ratios via `ratios`)")
        if self.static_opd_student != "base":
            raise ValueError("staticOpdStudent: only `base` is implemented")
        if self.opd.topology != "mesh":
            raise ValueError("opd.topology: the comparison's CoPD arms use the mesh")
        wrong = [d for d in self.domains if (d in CONFLICTING_DOMAINS) != (self.benchmark == "conflicting")]
        if wrong:
            raise ValueError(f"domains: {wrong} do not belong to benchmark {self.benchmark!r} (conflicting: "
                             f"{list(CONFLICTING_DOMAINS)}; separable: the builtin text domains)")
        return self

    def base_uri(self) -> str:
        """`baseModel` as a URI the runtime resolves: a relative directory becomes absolute (the repository's)."""
        b = self.base_model
        if "://" in b or Path(b).is_absolute():
            return b
        return str(REPO / b)

    def method_names(self) -> list[str]:
        return list(self.methods) + [ratio_name(r) for r in self.ratios]


def ratio_name(r: float) -> str:
    return f"copd@{r:g}"


def load_compare_spec(path: str | Path) -> CompareSpec:
    doc = yaml.safe_load(Path(path).read_text())
    if isinstance(doc, dict) and "spec" in doc:
        doc = doc["spec"]
    return CompareSpec.model_validate(doc)


def cycle_schedule(steps_per_cycle: int, ratio: float) -> tuple[int, int]:
    """(S_RL, S_OPD) per cycle for T = `steps_per_cycle` and S_RL:S_OPD ≈ `ratio`.

    A CoPDRun has the same S_RL and S_OPD in every cycle, so a ratio that T cannot
    split exactly is rounded (half up) to the nearest whole S_RL: with T = 20,
    1.5 → 12:8, 1 → 10:10, 3 → 15:5, but 0.5 → 7:13 (0.54). The per-branch total
    stays C·T either way; the table reports the RL and OPD updates actually spent.
    """
    rl = int(steps_per_cycle * ratio / (1 + ratio) + 0.5)
    return rl, steps_per_cycle - rl
