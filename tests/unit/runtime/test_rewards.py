import pytest

from copd_core.spec import RewardSpec
from copd_runtime.data.rewards import boxed_match, exact_match, last_boxed, numeric_match, score


@pytest.mark.parametrize("text, want", [
    ("so \\boxed{9}", "9"), ("\\boxed{1} then \\boxed{2}", "2"), ("\\boxed{a{b}c}", "a{b}c"),
    ("no box", None), ("\\boxed{unclosed", None),
])
def test_last_boxed(text, want):
    assert last_boxed(text) == want


def test_verifiers():
    assert exact_match("  Red ", "red") == 1.0 and exact_match("reds", "red") == 0.0
    assert numeric_match("the answer is 15", "15") == 1.0
    assert numeric_match("14.9", "15", tolerance=0.2) == 1.0 and numeric_match("14", "15", 0.5) == 0.0
    assert numeric_match("none", "15") == 0.0
    assert boxed_match("\\boxed{9}", "\\boxed{9}") == 1.0 and boxed_match("9", "\\boxed{9}") == 0.0
    assert score("\\boxed{7}", "7", RewardSpec(verifier="boxed")) == 1.0
