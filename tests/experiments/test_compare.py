"""The science harness (`python -m experiments.compare`) on a tiny budget: the command, the output
contract, the budget accounting, and that its CoPD arms ran through the runtime's own executor."""

import json
import random
import subprocess
import sys

import pytest
import torch
import yaml

from copd_core.cycle import Phase
from copd_core.spec import CoPDRunManifest, RewardSpec, RLSpec, TruncationRule, Verifier
from copd_runtime.builtin.build import weights_sha256
from copd_runtime.builtin.tiny_text import build_tiny_qwen3
from copd_runtime.data.datasets import text_examples
from copd_runtime.data.examples import Dataset
from copd_runtime.local.runner import read_metrics
from copd_runtime.recipes.grpo import grpo_step
from experiments.compare.report import bootstrap_ci, paired
from experiments.compare.spec import BASE_METHODS, CompareSpec, cycle_schedule, load_compare_spec, ratio_name


def test_cycle_schedule_keeps_the_per_cycle_total():
    assert [cycle_schedule(20, r) for r in (0.5, 1, 1.5, 3)] == [(7, 13), (10, 10), (12, 8), (15, 5)]
    assert cycle_schedule(4, 1) == (2, 2) and cycle_schedule(4, 3) == (3, 1)
    assert all(sum(cycle_schedule(t, r)) == t for t in (2, 5, 15, 20) for r in (0.1, 0.5, 1, 1.5, 3, 50))


def test_example_spec_parses():
    spec = load_compare_spec("examples/compare.yaml")
    assert spec.domains == ["arith", "reverse", "maxbox"] and len(spec.seeds) >= 5
    assert set(BASE_METHODS) <= set(spec.method_names())
    assert {ratio_name(r) for r in (0.5, 1, 1.5, 3)} <= set(spec.method_names())
    with pytest.raises(ValueError):
        CompareSpec(methods=["copd", "nope"])


def test_bootstrap_interval_and_paired_differences():
    xs = [0.50, 0.55, 0.60, 0.52, 0.58]
    lo, hi = bootstrap_ci(xs)
    assert min(xs) <= lo < sum(xs) / 5 < hi <= max(xs)
    assert bootstrap_ci(xs) == [lo, hi]  # fixed resampling seed: the same scores give the same interval
    assert bootstrap_ci([0.4, 0.4, 0.4]) == [0.4, 0.4]
    a = {"seeds": [{"seed": s, "avg": v} for s, v in zip(range(5), xs)]}
    b = {"seeds": [{"seed": s, "avg": v - d} for s, v, d in zip(range(5), xs, [0.1, 0.0, 0.05, -0.02, 0.1])]}
    b["seeds"].append({"seed": 9, "avg": 0.0})  # only in b: not paired
    p = paired(a, b)
    assert p["seeds"] == [0, 1, 2, 3, 4] and p["diffs"] == [0.1, 0.0, 0.05, -0.02, 0.1]
    assert p["mean"] == pytest.approx(0.046) and (p["wins"], p["losses"]) == (3, 1)
    assert p["ci95"][0] <= p["mean"] <= p["ci95"][1] and p["std"] > 0


def test_grpo_step_reward_fn_scores_each_example():
    """Mixed RLVR's batches mix domains: `reward_fn` is what scores them, not the dataset's verifier."""
    policy = build_tiny_qwen3(seed=0, warm_steps=0)
    opt = torch.optim.AdamW(policy.model.parameters(), lr=1e-4)
    pool = Dataset("mixed", text_examples("arith", 8, 0) + text_examples("reverse", 8, 0), [],
                   RewardSpec(verifier=Verifier.EXACT))
    rl = RLSpec(group_size=2, batch_size=6, max_new_tokens=4, truncation=TruncationRule.MASK)
    m = grpo_step(policy, opt, pool, rl, random.Random(3), lambda text, ex: float(ex.domain == "arith"))
    chosen = random.Random(3).sample(pool.train, 6)
    assert m["reward_mean"] == pytest.approx(sum(ex.domain == "arith" for ex in chosen) / 6)


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
    res = subprocess.run([sys.executable, "-m", "experiments.compare", str(spec_file), "--output", str(out)],
                         capture_output=True, text=True, timeout=560)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "| copd |" in res.stdout  # prints comparison.md

    doc = json.loads((out / "comparison.json").read_text())
    assert doc["base_model"] == {"uri": "builtin://tiny-qwen3", "sha256": weights_sha256("tiny-qwen3")}
    assert {d: o["eval_in_train"] for d, o in doc["eval_overlap"].items()} == {"arith": 0, "reverse": 0, "maxbox": 0}
    assert all(o["eval_examples"] == 16 for o in doc["eval_overlap"].values())
    assert {"copd - mixed_rlvr", "copd - static_opd", "copd - experts_merged"} <= set(doc["paired"])
    expected = set(BASE_METHODS) | {"copd@3"}
    assert set(doc["methods"]) == expected
    budget = 3 * 2 * 4
    for name, m in doc["methods"].items():
        assert set(m) >= {"seeds", "eval", "spread", "avg", "avg_ci95"}
        assert [s["seed"] for s in m["seeds"]] == [0]
        assert set(m["eval"]) == {"arith", "reverse", "maxbox"} == set(m["spread"])
        assert all(0.0 <= v <= 1.0 for v in [*m["eval"].values(), *m["spread"].values(), m["avg"]])
        assert m["updates"] == budget, name  # the same optimizer-step budget for every method
        assert m["rl_updates"] + m["opd_updates"] == budget
    assert doc["methods"]["experts"]["opd_updates"] == doc["methods"]["mixed_rlvr"]["opd_updates"] == 0
    assert doc["methods"]["copd"]["opd_updates"] == doc["methods"]["static_opd"]["opd_updates"] == 12
    assert doc["methods"]["copd@3"]["rl_updates"] == 18 and doc["methods"]["copd_oneway"]["opd_updates"] == 4
    assert {n: m["executor"] for n, m in doc["methods"].items()} == {
        "experts": "LocalRun", "experts_merged": "LocalRun", "copd": "LocalRun", "copd@3": "LocalRun",
        "copd_oneshot": "LocalRun", "copd_oneway": "run_branch_stage", "static_opd": "run_branch_stage",
        "mixed_rlvr": "grpo_step", "copd_adaptive": "LocalRun"}
    # the adaptive arm: schedule.mode adaptive at copd's schedule, its per-cycle plan read back from its steps
    ad = doc["methods"]["copd_adaptive"]
    (plan,) = ad["adaptive_plan"]
    assert [c["cycle"] for c in plan] == [1, 2] and plan[0]["directions_distilling"] == 6  # cycle 1: all
    for c in plan:
        for b, w in c["branches"].items():
            assert w["rl"] + w["opd"] == 4 and (w["opd"] == 2) == bool(w["teachers"]), (c, b)
    assert {"copd_adaptive - copd", "copd_adaptive - mixed_rlvr"} <= set(doc["paired"])
    run = CoPDRunManifest.model_validate_json((out / "storage" / "copd_adaptive" / "seed-0" / "copdrun.json").read_text())
    assert run.spec.schedule.mode == "adaptive" and run.spec.schedule.adaptive.lower_alignment == 0.93
    assert "Adaptive schedule of `copd_adaptive`" in (out / "comparison.md").read_text()

    # The CoPD arms went through LocalRun: a CoPDRun manifest, the run status that `decide` wrote,
    # branch checkpoints, one Diagnose per cycle, the merge, and exactly the steps the table counts.
    for method, (cycles, rl, opd) in {"copd": (2, 2, 2), "copd@3": (2, 3, 1), "copd_oneshot": (1, 4, 4),
                                      "experts": (2, 4, 0)}.items():
        st = out / "storage" / method / "seed-0"
        run = CoPDRunManifest.model_validate_json((st / "copdrun.json").read_text())
        sched = run.spec.schedule
        assert (sched.cycles, sched.rl_steps_per_cycle, sched.opd_steps_per_cycle) == (cycles, rl, opd), method
        assert [b.name for b in run.spec.branches] == ["arith", "reverse", "maxbox"] and run.spec.seed == 0
        status = json.loads((st / "status.json").read_text())
        assert status["phase"] == Phase.SUCCEEDED and status["cycle"] == cycles, method
        assert status["mergedModel"] == str(st / "merged") and (st / "merged" / "config.json").exists()
        assert len(list((st / "diagnostics").glob("cycle-*.json"))) == cycles
        for b in ("arith", "reverse", "maxbox"):
            last = f"c{cycles:03d}-{'OPD' if opd else 'RL'}-s{opd or rl:05d}"
            assert (st / "branches" / b / "checkpoints" / last / "state.json").exists(), (method, b)
        recs = read_metrics(st / "metrics.jsonl")
        m = doc["methods"][method]
        assert (sum(r["phase"] == "RL" for r in recs), sum(r["phase"] == "OPD" for r in recs)) == \
            (m["rl_updates"], m["opd_updates"]) == (3 * cycles * rl, 3 * cycles * opd)
    # Common random numbers through the runtime's step seeds: one-way OPD's non-distilling branches
    # (run_branch_stage, paused and resumed) take exactly the experts' (LocalRun) steps.
    steps = {m: {(r["branch"], r["phase"], r["cycle"], r["step"]): (r["reward_mean"], r["loss"])
                 for r in read_metrics(out / "storage" / m / "seed-0" / "metrics.jsonl")}
             for m in ("experts", "copd_oneway")}
    shared = [k for k in steps["copd_oneway"] if k[0] != "arith"]
    assert len(shared) == 2 * 2 * 4 and all(steps["copd_oneway"][k] == steps["experts"][k] for k in shared)

    pilot = json.loads((out / "pilot.json").read_text())
    assert {r["teacher_steps"] for r in pilot["summary"]} == {0, 2}
    assert all(0.0 <= r["topk_overlap"] <= 1.0 for r in pilot["rows"])
    for png in ("scores.png", "alignment.png", "pilot.png"):
        assert (out / png).stat().st_size > 1000
    md = (out / "comparison.md").read_text()
    assert all(name in md for name in expected) and "Pilot" in md


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_compare_runs_the_conflicting_benchmark(tmp_path):
    """`plain` and `boxed` on the same prompts, from the committed conflict base: datasets disjoint by
    the hash split, each domain scored by its own verifier, the base identified by its SHA-256."""
    doc = yaml.safe_load(open("examples/compare-conflicting.yaml"))
    doc["spec"].update(seeds=[0], budget={"cycles": 2, "stepsPerCycle": 4, "rlToOpd": 1}, ratios=[], evalSize=16,
                       methods=["mixed_rlvr", "copd", "copd_adaptive"], diagnostics={"topK": 8, "probePrompts": 4})
    spec_file = tmp_path / "conflicting.yaml"
    spec_file.write_text(yaml.safe_dump(doc))
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-m", "experiments.compare", str(spec_file), "--output", str(out)],
                         capture_output=True, text=True, timeout=560)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    got = json.loads((out / "comparison.json").read_text())
    sums = json.loads(open("experiments/compare/bases/tiny-qwen3-conflict/SHA256SUMS.json").read())
    assert got["base_model"]["sha256"] == sums["model.safetensors"]
    assert {d: o["eval_in_train"] for d, o in got["eval_overlap"].items()} == {"plain": 0, "boxed": 0}
    assert set(got["methods"]) == {"mixed_rlvr", "copd", "copd_adaptive"}
    for m in got["methods"].values():
        assert m["updates"] == 2 * 2 * 4 and set(m["eval"]) == {"plain", "boxed"}
    data = out / "storage" / "data"
    plain = [json.loads(x) for x in (data / "plain.train.jsonl").read_text().splitlines()]
    boxed = [json.loads(x) for x in (data / "boxed.train.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in plain] == [r["prompt"] for r in boxed]  # the same prompts
    assert all(b["answer"] == "\\boxed{" + p["answer"] + "}" for p, b in zip(plain, boxed))
