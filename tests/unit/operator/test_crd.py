"""The CRDs in crds/ are generated from the pydantic model; these tests fail when they drift or break."""

import copy

import pytest
import yaml
from copd_operator import crd

from copd_core.spec import SpecError, parse_manifest
from tests import ROOT


def test_checked_in_crds_match_the_model():
    assert crd.main(["--out", str(ROOT / "crds"), "--check"]) == 0, \
        "crds/ drifted: run `python -m copd_operator.crd --out crds/`"


def _walk(node, path=""):
    yield path, node
    for k in ("properties",):
        for name, sub in (node.get(k) or {}).items():
            yield from _walk(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from _walk(node["items"], path + "[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], path + "{}")


@pytest.mark.parametrize("doc", [crd.copdrun_crd(), crd.branch_crd()], ids=["copdrun", "branch"])
def test_schema_is_structural(doc):
    schema = doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in _walk(schema):
        assert "$ref" not in node and "anyOf" not in node and "title" not in node, path
        assert node.get("additionalProperties") is not False, path
        assert "type" in node, f"{path} has no type"
        if "default" in node:
            assert node["default"] is not None, path
        if node.get("exclusiveMinimum") is not None:
            assert node["exclusiveMinimum"] is True and "minimum" in node, path


def test_defaults_enums_ranges_and_printer_columns():
    doc = crd.copdrun_crd()
    v = doc["spec"]["versions"][0]
    spec = v["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    assert spec["schedule"]["default"] == {"cycles": 4, "rlStepsPerCycle": 6, "opdStepsPerCycle": 4, "mode": "fixed",
                                           "adaptive": {"lowerAlignment": 0.93, "upperAlignment": 0.95,
                                                        "minPhaseCycles": 1}}
    assert spec["opd"]["properties"]["topology"]["enum"] == ["mesh", "hub-and-spoke"]
    assert spec["rl"]["properties"]["clipEpsLow"]["exclusiveMinimum"] is True
    assert spec["branches"]["minItems"] == 2
    assert spec["trainer"]["default"]["resources"] == {"gpu": 0, "cpu": "1", "memory": "4Gi"}
    cols = [c["name"] for c in v["additionalPrinterColumns"]]
    assert cols == ["Phase", "Cycle", "Stage", "Queue", "Admission", "Overlap", "SymKL", "Age"]
    # "copd" is the category (runs and branches); a short name equal to it would make
    # `kubectl get copd <name>` look the name up among Branches too and fail
    assert doc["spec"]["names"]["shortNames"] == ["crun"]
    assert doc["spec"]["names"]["categories"] == ["copd"]
    assert v["subresources"] == {"status": {}}
    bcols = [c["name"] for c in crd.branch_crd()["spec"]["versions"][0]["additionalPrinterColumns"]]
    assert {"Run", "Phase", "Stage", "Step", "Reward"} <= set(bcols)


def test_every_cel_rule_sits_on_an_existing_field():
    schema = crd.run_spec_schema()
    for path in crd.RUN_SPEC_RULES:
        assert crd._at(schema, path).get("x-kubernetes-validations"), path
    immutable = [p for p, rules in crd.RUN_SPEC_RULES.items() for r in rules if r["rule"] == "self == oldSelf"]
    assert set(immutable) == {("baseModel",), ("branches",), ("seed",)}
    # storage: every field but retainPolicy (what deleting the run does may change while it lives)
    (rule,) = crd.RUN_SPEC_RULES[("storage",)]
    fields = set(crd._at(schema, ("storage",))["properties"]) - {"retainPolicy"}
    assert all(f"self.{f} == oldSelf.{f}" in rule["rule"] for f in fields), fields
    assert "retainPolicy" not in rule["rule"]


# Each manifest that pydantic refuses for a cross-field reason must have a CEL rule whose message
# names the same field; tests/cluster/test_operator_admission.py sends them to the real apiserver.
BAD = {
    "duplicate branch": (lambda s: s["branches"].append(copy.deepcopy(s["branches"][0])), "branches"),
    "hub missing": (lambda s: s["opd"].update(topology="hub-and-spoke"), "opd.hub"),
    "hub not a branch": (lambda s: s["opd"].update(topology="hub-and-spoke", hub="nope"), "opd.hub"),
    "weights unknown": (lambda s: s["merge"].update(weights={"nope": 1.0}), "merge.weights"),
    "minCycles > cycles": (lambda s: s["mergeReadiness"].update(minCycles=9), "mergeReadiness.minCycles"),
    "two dataset sources": (lambda s: s["branches"][0]["dataset"].update(path="x.jsonl"), "dataset"),
    "no steps": (lambda s: s["schedule"].update(rlStepsPerCycle=0, opdStepsPerCycle=0), "schedule"),
    "bad scheme": (lambda s: s["baseModel"].update(uri="hf://Qwen/x"), "baseModel.uri"),
    "vllm at temperature 0.7": (lambda s: (s.setdefault("rollout", {}).update(engine="vllm"),
                                           s.setdefault("rl", {}).update(temperature=0.7)), "rollout.engine"),
    "vllm with ZeRO-3": (lambda s: (s.setdefault("rollout", {}).update(engine="vllm"),
                                    s.setdefault("trainer", {}).update(zeroStage=3)), "rollout.engine"),
    "vllm with a VLM": (lambda s: (s.setdefault("rollout", {}).update(engine="vllm"),
                                   s["baseModel"].update(kind="vlm")), "rollout.engine"),
    "adaptive lower > upper": (lambda s: s["schedule"].update(
        mode="adaptive", adaptive={"lowerAlignment": 0.97, "upperAlignment": 0.9}), "schedule.adaptive.lowerAlignment"),
    "adaptive max < min phase": (lambda s: s["schedule"].update(
        mode="adaptive", adaptive={"minPhaseCycles": 3, "maxPhaseCycles": 2}), "schedule.adaptive.maxPhaseCycles"),
    "adaptive without OPD steps": (lambda s: s["schedule"].update(mode="adaptive", opdStepsPerCycle=0),
                                   "schedule.mode"),
}


def example() -> dict:
    return yaml.safe_load((ROOT / "examples/copdrun.yaml").read_text())


@pytest.mark.parametrize("case", list(BAD))
def test_cross_field_cases_are_refused_by_pydantic_and_have_a_cel_rule(case):
    mutate, field = BAD[case]
    doc = example()
    mutate(doc["spec"])
    with pytest.raises(SpecError) as e:
        parse_manifest(doc)
    assert field.split(".")[0] in str(e.value) or field.split(".")[-1] in str(e.value)
    messages = [r["message"] for rules in crd.RUN_SPEC_RULES.values() for r in rules]
    assert any(m.startswith(field) for m in messages), f"no CEL rule names {field}"


def test_example_parses():
    parse_manifest(example())
