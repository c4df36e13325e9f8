"""A trainer that finds the planned checkpoints will not fit the run's volume says so in its report;
the cycle decision turns it into a StorageWarning condition and one Warning event."""

from copd_core.conditions import COND_STORAGE_WARNING, R_CHECKPOINTS_MAY_NOT_FIT
from copd_core.cycle import BranchReport, Observed, RunStatus, Stage
from tests.unit.core.test_cycle import SpecBuilder, step

MSG = "checkpoints need about 60.0 GB (2 branches × 5 × 6.0 GB + merged) on a 10.0 GB volume"


def _report(name, warning=None, done=False):
    return {name: BranchReport(1, Stage.RL, step=1, reward=0.1, done=done, storage_warning=warning)}


def test_a_storage_warning_becomes_a_condition_and_one_event():
    spec = SpecBuilder().obj()
    s, _ = step(spec, RunStatus())
    s, acts = step(spec, s, Observed(branches=_report("a", MSG)))
    cond = next(c for c in s.conditions if c.type == COND_STORAGE_WARNING)
    assert (cond.status, cond.reason, cond.message) == ("True", R_CHECKPOINTS_MAY_NOT_FIT, f"branch a: {MSG}")
    warnings = [a for a in acts if getattr(a, "reason", None) == R_CHECKPOINTS_MAY_NOT_FIT]
    assert len(warnings) == 1 and warnings[0].type == "Warning" and MSG in warnings[0].message
    s, acts = step(spec, s, Observed(branches=_report("a", MSG)))  # the same warning again: no new event
    assert not [a for a in acts if getattr(a, "reason", None) == R_CHECKPOINTS_MAY_NOT_FIT]
    s, _ = step(spec, s, Observed(branches=_report("b")))  # a report without one leaves it set
    assert next(c for c in s.conditions if c.type == COND_STORAGE_WARNING).status == "True"


def test_no_warning_no_condition():
    spec = SpecBuilder().obj()
    s, _ = step(spec, RunStatus())
    s, _ = step(spec, s, Observed(branches=_report("a")))
    assert all(c.type != COND_STORAGE_WARNING for c in s.conditions)
