"""How much the planned checkpoints need against the run's volume (pure arithmetic)."""

from copd_runtime.checkpoint import KEEP, checkpoint_fit_warning

GB = 10**9


def test_checkpoints_that_fit_give_no_warning():
    # 3 branches, (keep 3 + 2 stage-final) checkpoints of 1 GB each + a 0.2 GB merged model = 15.2 GB
    assert checkpoint_fit_warning(1 * GB, int(0.2 * GB), KEEP, 3, 20 * GB) is None


def test_checkpoints_that_do_not_fit_are_named_with_the_figures():
    msg = checkpoint_fit_warning(6 * GB, 2 * GB, KEEP, 2, 10 * GB)
    assert msg is not None
    assert "62.0 GB" in msg and "10.0 GB" in msg and "2 branches" in msg and f"{KEEP + 2}" in msg


def test_unknown_capacity_gives_no_warning():
    assert checkpoint_fit_warning(6 * GB, 2 * GB, KEEP, 2, 0) is None
