"""`copd compare` on a tiny budget: the real command, the output contract, the budget accounting."""

import json

import pytest
import yaml
from typer.testing import CliRunner

from copd_runtime.cli import app
from experiments.compare.harness import BASE_METHODS, CompareSpec, load_compare_spec, ratio_name, split_steps


def test_split_steps_exact_totals():
    for ratio, (rl, opd) in {0.5: (40, 80), 1: (60, 60), 1.5: (72, 48), 3: (90, 30)}.items():
        sched = split_steps(20, ratio, 6)
        assert len(sched) == 6
        assert all(r + o == 20 for r, o in sched)
        assert (sum(r for r, _ in sched), sum(o for _, o in sched)) == (rl, opd)


def test_example_spec_parses():
    spec = load_compare_spec("examples/compare.yaml")
    assert spec.domains == ["arith", "reverse", "maxbox"] and len(spec.seeds) >= 3
    assert set(BASE_METHODS) <= set(spec.method_names())
    assert {ratio_name(r) for r in (0.5, 1, 1.5, 3)} <= set(spec.method_names())
    with pytest.raises(ValueError):
        CompareSpec(methods=["copd", "nope"])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_compare_command_contract(tmp_path):
    cfg = {
        "spec": {
            "seeds": [0],
            "budget": {"cycles": 2, "stepsPerCycle": 4, "rlToOpd": 1},
            "ratios": [3],
            "evalSize": 16,
            "diagnostics": {"topK": 8, "probePrompts": 4},
            "pilot": {"domains": ["reverse"], "teacherSteps": [0, 2], "opdSteps": 2, "seeds": [0]},
        }
    }
    spec_file = tmp_path / "compare.yaml"
    spec_file.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["compare", str(spec_file), "--output", str(out)])
    assert res.exit_code == 0, res.output + repr(res.exception)

    doc = json.loads((out / "comparison.json").read_text())
    expected = set(BASE_METHODS) | {"copd@3"}
    assert set(doc["methods"]) == expected
    budget = 3 * 2 * 4
    for name, m in doc["methods"].items():
        assert set(m) >= {"seeds", "eval", "spread", "avg"}
        assert [s["seed"] for s in m["seeds"]] == [0]
        assert set(m["eval"]) == {"arith", "reverse", "maxbox"} == set(m["spread"])
        assert all(0.0 <= v <= 1.0 for v in [*m["eval"].values(), *m["spread"].values(), m["avg"]])
        assert m["updates"] == budget, name  # the same optimizer-step budget for every method
        assert m["rl_updates"] + m["opd_updates"] == budget
    assert doc["methods"]["experts"]["opd_updates"] == doc["methods"]["mixed_rlvr"]["opd_updates"] == 0
    assert doc["methods"]["copd"]["opd_updates"] == doc["methods"]["static_opd"]["opd_updates"] == 12
    pilot = json.loads((out / "pilot.json").read_text())
    assert {r["teacher_steps"] for r in pilot["summary"]} == {0, 2}
    assert all(0.0 <= r["topk_overlap"] <= 1.0 for r in pilot["rows"])
    for png in ("scores.png", "alignment.png", "pilot.png"):
        assert (out / png).stat().st_size > 1000
    md = (out / "comparison.md").read_text()
    assert all(name in md for name in expected) and "Pilot" in md
