"""experiments.compare.verify: what a rerun must match of a committed comparison.json."""

import copy

from experiments.compare.verify import compare

REF = {"base_model": {"sha256": "abc"}, "base_eval": {"a": 0.5},
       "methods": {"copd": {"avg": 0.6, "seeds": [{"seed": 0, "eval": {"a": 0.6}}, {"seed": 1, "eval": {"a": 0.6}}]},
                   "mixed_rlvr": {"avg": 0.5, "seeds": [{"seed": 0, "eval": {"a": 0.5}}]}}}


def test_an_identical_rerun_is_ok_and_every_seed_exact():
    res = compare(copy.deepcopy(REF), REF, 0.005)
    assert res["ok"] and res["all_seeds_exact"] and res["max_abs_diff"] == 0.0


def test_a_seed_may_differ_while_the_average_stays_within_tolerance():
    got = copy.deepcopy(REF)
    got["methods"]["copd"]["seeds"][1]["eval"]["a"] = 0.61
    got["methods"]["copd"]["avg"] = 0.604
    res = compare(got, REF, 0.005)
    assert res["ok"] and not res["all_seeds_exact"] and res["methods"]["copd"]["seeds_exact"] == 1


def test_an_average_off_a_missing_method_or_another_base_fail():
    got = copy.deepcopy(REF)
    got["methods"]["copd"]["avg"] = 0.61
    del got["methods"]["mixed_rlvr"]
    got["base_model"]["sha256"] = "def"
    res = compare(got, REF, 0.005)
    assert not res["ok"]
    assert any("copd: average" in p for p in res["problems"])
    assert any("mixed_rlvr: missing" in p for p in res["problems"])
    assert any("base model differs" in p for p in res["problems"])


def test_a_rerun_without_the_pinned_kernels_says_so_first():
    ref = copy.deepcopy(REF)
    ref["kernels"] = {"mkl_cbwr": "COMPATIBLE", "aten_cpu_capability": "AVX2", "pinned": True}
    got = copy.deepcopy(REF)
    got["kernels"] = {"mkl_cbwr": "AUTO", "aten_cpu_capability": "AVX512", "cpu": "x", "pinned": False}
    res = compare(got, ref, 0.005)
    assert not res["ok"] and "did not run the pinned kernels" in res["problems"][0]
    assert "AVX512" in res["problems"][0]
    got["kernels"] = dict(ref["kernels"], cpu="another CPU")
    assert compare(got, ref, 0.005)["ok"]
