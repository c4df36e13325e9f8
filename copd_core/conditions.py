"""Kubernetes-style conditions and the reasons the cycle gives: named constants.

Reasons appear in conditions, events, metric labels and docs; one place defines them.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel

# Condition types
COND_READY = "Ready"
COND_PROGRESSING = "Progressing"
COND_MERGE_READY = "MergeReady"
COND_SUCCEEDED = "Succeeded"
COND_FAILED = "Failed"
COND_BLOCKED = "Blocked"  # the run waits on something outside it (a claim, a PriorityClass); continues once there
COND_SPEC_WARNING = "SpecWarning"  # the spec has fields this operator does not know (a newer CRD): ignored
COND_STORAGE_WARNING = "StorageWarning"  # a trainer found the planned checkpoints larger than the run's volume
COND_RECONCILE_ERROR = "ReconcileError"  # the last reconcile raised (quota, a rejected create, ...): retried

# Reasons
R_CREATED = "Created"
R_STARTED = "Started"
R_STAGE_STARTED = "StageStarted"
R_STAGE_COMPLETED = "StageCompleted"
R_BRANCH_FAILED = "BranchFailed"
R_DIAGNOSE_FAILED = "DiagnoseFailed"
R_SUSPENDED = "Suspended"
R_RESUMED = "Resumed"
R_MERGING = "Merging"
R_MERGE_WITHOUT_READINESS = "MergingWithoutReadiness"
R_NOT_ALIGNED = "NotAligned"
R_MERGE_FAILED = "MergeFailed"
R_MERGED = "Merged"
R_INVALID_SPEC = "InvalidSpec"
R_INVALID_INPUT = "InvalidInput"  # a file the spec names is missing or malformed (found by the trainer)
R_BRANCH_RESTARTED = "BranchRestarted"  # a failed stage attempt replaced by a new one (spec.failurePolicy)
R_DIAGNOSE_RESTARTED = "DiagnoseRestarted"  # a failed diagnose Job replaced by a new one (same budget)
R_MERGE_RESTARTED = "MergeRestarted"  # a failed merge Job replaced by a new one (same budget)
R_CLAIM_NOT_FOUND = "ClaimNotFound"
R_PRIORITY_CLASS_NOT_FOUND = "PriorityClassNotFound"
R_UNBLOCKED = "Unblocked"
R_CHECKPOINTS_MAY_NOT_FIT = "CheckpointsMayNotFit"
R_UNKNOWN_FIELDS = "UnknownFields"
R_NO_UNKNOWN_FIELDS = "NoUnknownFields"
R_QUOTA_EXCEEDED = "QuotaExceeded"  # a create refused with 403 by a ResourceQuota
R_CREATE_REJECTED = "CreateRejected"  # a create refused as invalid (422) or forbidden (403)
R_API_ERROR = "ApiError"  # any other API error
R_INTERNAL_ERROR = "InternalError"  # an exception inside the operator
R_RECONCILED = "Reconciled"  # the error cleared
R_CONSOLIDATION = "ConsolidationPlanned"  # schedule.mode adaptive: which directions distil next cycle


class _Status(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


class Condition(_Status):
    type: str
    status: str  # "True" | "False" | "Unknown"
    reason: str
    message: str = ""
    last_transition_time: str
    observed_generation: int = 0


def iso(now: datetime) -> str:
    return now.strftime("%Y-%m-%dT%H:%M:%SZ")


def set_condition(
    conds: list[Condition], type_: str, status: str, reason: str, message: str, now: datetime, gen: int
) -> list[Condition]:
    """New list with `type_` set; lastTransitionTime moves only when the status flips."""
    out, found = [], False
    for c in conds:
        if c.type != type_:
            out.append(c)
            continue
        found = True
        ltt = c.last_transition_time if c.status == status else iso(now)
        out.append(Condition(type=type_, status=status, reason=reason, message=message,
                             last_transition_time=ltt, observed_generation=gen))
    if not found:
        out.append(Condition(type=type_, status=status, reason=reason, message=message,
                             last_transition_time=iso(now), observed_generation=gen))
    return out


def condition(conds: list[Condition], type_: str) -> Condition | None:
    return next((c for c in conds if c.type == type_), None)
