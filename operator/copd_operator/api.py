"""The Branch custom resource's types (the CoPDRun types live in copd_core.spec / cycle).

A Branch is owned by one CoPDRun and mirrors one branch of it: its spec says which
(cycle, stage) the run wants from it, its status says what the trainer reported.
The run's reconcile writes both; `kubectl get branches` shows the training.

`status.progress` is the one part the operator does not write: the stage's trainer
patches it while it runs (`copd stage --branch-object`, copd_runtime/progress_report.py,
through the status subresource), and the operator folds a progress of the current
(cycle, stage) into `step`/`reward` (logic/observe.py `fold_progress`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class BranchCRSpec(_Model):
    run: str = Field(description="The CoPDRun this branch belongs to.")
    branch: str = Field(description="The branch name inside the run's spec.branches.")
    cycle: int = Field(0, ge=0, description="The cycle the run wants this branch to work on (0: not started).")
    stage: Literal["RL", "OPD"] | None = Field(None, description="The stage the run wants (RL or OPD).")
    hub_url: str | None = Field(None, description="Where the OPD stage's hub answers.")
    suspend: bool = Field(False, description="Mirrors the run's spec.suspend.")


class BranchProgress(_Model):
    """What the running trainer last reported (rate-limited: at most one patch every few seconds)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")
    cycle: int = Field(0, ge=0, description="The cycle the trainer works on.")
    stage: str | None = Field(None, description="The stage the trainer works on (RL or OPD).")
    step: int = Field(0, ge=0, description="Steps done in this stage.")
    steps: int = Field(0, ge=0, description="Steps of the whole stage.")
    reward: float | None = Field(None, description="Mean verifiable reward of the latest step.")
    topk_overlap: dict[str, float] | None = Field(
        None, description="OPD: top-k overlap with each teacher on the latest step's states, by teacher.")
    update_time: str | None = Field(None, description="When the trainer sent this (RFC 3339).")


BranchPhase = Literal["Pending", "Running", "Succeeded", "Failed", "Suspended", "Waiting"]


class BranchCRStatus(_Model):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")
    phase: BranchPhase = Field("Pending", description="Of the current stage's trainer Job; Waiting: "
                               "this stage is done, the run waits for its peers (barrier).")
    cycle: int = 0
    stage: str | None = None
    step: int = 0
    steps: int = 0
    reward: float | None = None
    done: bool = False
    message: str = ""
    job: str | None = Field(None, description="Name of the trainer Job of the current stage.")
    observed_generation: int = 0
    progress: BranchProgress | None = Field(None, description="Written by the stage's trainer while it runs; the "
                                            "operator keeps it and folds it into step and reward.")

    def to_k8s(self) -> dict:
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")
