"""Bad manifests are refused with a message naming the field."""

import copy

import pytest
import yaml

from copd_core.spec import SpecError, load_manifest, parse_manifest
from tests import ROOT

EXAMPLE = ROOT / "examples" / "copdrun.yaml"


def example() -> dict:
    return yaml.safe_load(EXAMPLE.read_text())


def test_example_is_valid_and_defaults_fill_in():
    m = load_manifest(EXAMPLE)
    assert [b.name for b in m.spec.branches] == ["arith", "reverse", "maxbox"]
    assert m.spec.opd.topology == "mesh"
    assert m.spec.schedule.rl_steps_per_cycle / m.spec.schedule.opd_steps_per_cycle == 1.5
    assert m.spec.teachers_of("arith") == ["reverse", "maxbox"]


def test_vision_example_is_valid():
    m = load_manifest(EXAMPLE.parent / "copdrun-vl.yaml")
    assert m.spec.base_model.uri == "builtin://tiny-qwen3-vl"
    assert [b.dataset.builtin for b in m.spec.branches] == ["color", "motion"]


def _with(path: str, value):
    doc = example()
    node = doc
    keys = path.split(".")
    for k in keys[:-1]:
        node = node[int(k)] if isinstance(node, list) else node.setdefault(k, {})
    last = keys[-1]
    if isinstance(node, list):
        node[int(last)] = value
    elif value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return doc


_DELETE = object()


@pytest.mark.parametrize(
    "doc, must_mention",
    [
        (_with("spec.rl.groupSize", 1), "spec.rl.groupSize"),
        (_with("spec.rl.groupSize", "eight"), "spec.rl.groupSize"),
        (_with("spec.rl.clipEpsLow", 1.5), "spec.rl.clipEpsLow"),
        (_with("spec.schedule.cycles", 0), "spec.schedule.cycles"),
        (_with("spec.rl.bogus", 1), "spec.rl.bogus: unknown field"),
        (_with("spec.opd.topology", "ring"), "spec.opd.topology"),
        (_with("spec.branches.1.name", "arith"), "duplicate branch names ['arith']"),
        (_with("spec.branches", [{"name": "solo", "dataset": {"builtin": "arith"}}]), "spec.branches"),
        (_with("spec.opd", {"topology": "hub-and-spoke", "hub": "nobody"}), "opd.hub: 'nobody' is not a branch"),
        (_with("spec.opd", {"topology": "hub-and-spoke"}), "opd.hub: required"),
        (_with("spec.branches.0.dataset", {"builtin": "arith", "path": "x.jsonl"}), "spec.branches.0.dataset"),
        (_with("spec.branches.0.name", "Not_A_Label"), "spec.branches.0.name"),
        (_with("spec.merge", {"weights": {"ghost": 1.0}}), "merge.weights: ['ghost'] are not branches"),
        (_with("spec.mergeReadiness", {"minCycles": 9}), "mergeReadiness.minCycles"),
        (_with("spec.baseModel", {"uri": "s3://bucket/model"}), "spec.baseModel.uri"),
        (_with("apiVersion", "copd.io/v2"), "apiVersion"),
        (_with("spec.trainer.resources", {"memory": "lots"}), "spec.trainer.resources.memory"),
    ],
)
def test_bad_specs_name_the_field(doc, must_mention):
    with pytest.raises(SpecError) as err:
        parse_manifest(copy.deepcopy(doc))
    assert must_mention in str(err.value)


def test_hub_and_spoke_topology():
    doc = _with("spec.opd", {"topology": "hub-and-spoke", "hub": "arith"})
    spec = parse_manifest(doc).spec
    assert spec.teachers_of("arith") == ["reverse", "maxbox"]
    assert spec.teachers_of("reverse") == ["arith"]
    assert spec.directions() == [("arith", "reverse"), ("arith", "maxbox"), ("reverse", "arith"), ("maxbox", "arith")]
    # the hub relays: a spoke samples on every other branch's prompts (the hub's and the other spokes')
    assert spec.opd_prompt_branches("reverse", "arith") == ["arith", "maxbox"]
    assert spec.opd_prompt_branches("maxbox", "arith") == ["arith", "reverse"]
    assert spec.opd_prompt_branches("arith", "reverse") == ["reverse"]  # the hub learns each spoke on its own
    # readiness covers every pair the merge averages, spoke<->spoke included
    assert set(spec.readiness_directions()) == {(s, t) for s in ("arith", "reverse", "maxbox")
                                                for t in ("arith", "reverse", "maxbox") if s != t}


def test_readiness_pairs_are_the_merged_branches():
    spec = parse_manifest(_with("spec.merge", {"weights": {"arith": 1.0, "reverse": 1.0, "maxbox": 0.0}})).spec
    assert spec.readiness_directions() == [("arith", "reverse"), ("reverse", "arith")]
    mesh = parse_manifest(copy.deepcopy(_with("spec.merge", {}))).spec
    assert mesh.readiness_directions() == mesh.directions()
    assert mesh.opd_prompt_branches("reverse", "maxbox") == ["maxbox"]


def test_min_cycles_defaults_to_the_schedule():
    doc = copy.deepcopy(_with("spec.merge", {}))
    doc["spec"]["schedule"]["cycles"] = 5
    doc["spec"].get("mergeReadiness", {}).pop("minCycles", None)
    assert parse_manifest(copy.deepcopy(doc)).spec.readiness_from_cycle() == 5
    doc["spec"].setdefault("mergeReadiness", {})["minCycles"] = 2  # explicitly asking for an early stop
    assert parse_manifest(doc).spec.readiness_from_cycle() == 2
