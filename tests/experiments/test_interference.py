"""experiments/compare/interference.py: the conflicting pair really conflicts in its data, and the
measures run on the shipped base."""

import pytest

from copd_runtime.model_uri import resolve_model_dir
from copd_runtime.models.policy import load_policy
from experiments.compare.interference import examples, measure, transfer


def test_the_conflicting_domains_share_prompts_with_incompatible_answers():
    plain, boxed = examples("plain", 50, 0), examples("boxed", 50, 0)
    assert [e.prompt for e in plain] == [e.prompt for e in boxed]  # no routing prefix: the same prompts
    assert all(b.answer == "\\boxed{" + p.answer + "}" for p, b in zip(plain, boxed))
    assert not any(e.prompt.split()[0].isalpha() for e in plain)


@pytest.mark.timeout(300)
def test_measures_on_the_shipped_base(tmp_path):
    policy = load_policy(resolve_model_dir("builtin://tiny-qwen3", tmp_path))
    m = measure(policy, ["plain", "boxed"], batches=2, batch=8)
    assert set(m["cross_domain"]) == {"plain~boxed"} and m["cross_domain"]["plain~boxed"]["n"] == 4
    assert all(-1.0 <= s["mean"] <= 1.0 for s in [*m["same_domain"].values(), *m["cross_domain"].values()])
    t = transfer(policy, ["plain", "boxed"], steps=3, batch=8)
    own = t["delta_loss_after_training_on"]["plain"]["plain"]
    assert own < 0  # training on a domain lowers its own held-out loss
