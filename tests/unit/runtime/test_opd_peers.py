"""Which prompts a student samples on in OPD, per teacher (`stage.opd_peers`)."""

import copy

from copd_core.spec import RewardSpec, Verifier, parse_manifest
from copd_runtime.data.datasets import text_examples
from copd_runtime.data.examples import Dataset
from copd_runtime.recipes.stage import opd_peers
from tests.unit.core.test_spec import _with


def _datasets():
    rewards = {"arith": RewardSpec(verifier=Verifier.NUMERIC), "reverse": RewardSpec(), "maxbox": RewardSpec()}
    return {d: Dataset(d, text_examples(d, 5, 0), [], rewards[d]) for d in ("arith", "reverse", "maxbox")}


def test_hub_and_spoke_spoke_gets_every_other_branchs_prompts_scored_by_the_hub():
    spec = parse_manifest(_with("spec.opd", {"topology": "hub-and-spoke", "hub": "arith"})).spec
    ds = _datasets()
    spoke = opd_peers(spec, "reverse", ds)
    assert list(spoke) == ["arith"]  # one teacher: the hub
    assert spoke["arith"].train == ds["arith"].train + ds["maxbox"].train  # the hub relays maxbox's skill
    assert {ex.domain for ex in spoke["arith"].train} == {"arith", "maxbox"}
    hub = opd_peers(spec, "arith", ds)
    assert {t: d.train for t, d in hub.items()} == {"reverse": ds["reverse"].train, "maxbox": ds["maxbox"].train}


def test_mesh_student_gets_each_teachers_own_prompts():
    spec = parse_manifest(copy.deepcopy(_with("spec.merge", {}))).spec
    ds = _datasets()
    assert opd_peers(spec, "reverse", ds) == {"arith": ds["arith"], "maxbox": ds["maxbox"]}
