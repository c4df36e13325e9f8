"""`copd run` with schedule.mode adaptive on the shipped tiny model: the local runner carries out
the plan `decide` makes from the Diagnose stage's mass overlaps, at the fixed schedule's budget."""

import json
from collections import Counter

import yaml

from copd_core.spec import parse_manifest
from copd_runtime.local.runner import LocalRun, read_metrics
from tests import ROOT


def _manifest(adaptive: dict, cycles: int = 3) -> dict:
    doc = yaml.safe_load((ROOT / "examples" / "copdrun.yaml").read_text())
    s = doc["spec"]
    doc["metadata"]["name"] = "adaptive"
    s["branches"] = s["branches"][:2]
    s["schedule"] = {"cycles": cycles, "rlStepsPerCycle": 1, "opdStepsPerCycle": 1, "mode": "adaptive",
                     "adaptive": adaptive}
    s["rl"].update(groupSize=4, batchSize=2, maxNewTokens=8)
    s["opd"]["batchSize"] = 2
    s["diagnostics"] = {"topK": 8, "probePrompts": 4}
    s["mergeReadiness"].pop("minCycles", None)
    return doc


def test_adaptive_run_distils_rests_and_distils_again_at_the_fixed_budget(tmp_path):
    # thresholds at 1.0 with one-cycle phases: cycle 1 distils (nothing measured), its phase ends
    # (MaxPhase), cycle 2 rests, and cycle 3 distils again because no real pair of branches is
    # perfectly aligned (mass overlap < 1.0 = lowerAlignment): on / off / on, whatever was measured.
    m = parse_manifest(_manifest({"lowerAlignment": 1.0, "upperAlignment": 1.0, "minPhaseCycles": 1,
                                  "maxPhaseCycles": 1}))
    events: list[str] = []
    run = LocalRun(m, tmp_path / "out", on_event=events.append)
    status = run.run()
    assert status.phase.value == "Succeeded", events[-5:]

    recs = read_metrics(tmp_path / "out" / "metrics.jsonl")
    count = Counter((r["branch"], r["cycle"], r["phase"]) for r in recs)
    for b in ("arith", "reverse"):
        assert [(count[(b, c, "RL")], count[(b, c, "OPD")]) for c in (1, 2, 3)] == [(1, 1), (2, 0), (1, 1)]
        assert sum(n for (bb, _, _), n in count.items() if bb == b) == 3 * (1 + 1)  # the fixed budget
    # the OPD steps logged the same alignment measure, per teacher
    assert all(0.0 < r["mass_overlap/" + ("reverse" if r["branch"] == "arith" else "arith")] <= 1.0 + 1e-6
               for r in recs if r["phase"] == "OPD")

    # the Diagnose stage measured it for every direction, every cycle; the decision used it
    for c in (1, 2, 3):
        rows = json.loads((tmp_path / "out" / "diagnostics" / f"cycle-{c:03d}.json").read_text())
        assert {(r["student"], r["teacher"]) for r in rows} == {("arith", "reverse"), ("reverse", "arith")}
        assert all(0.0 < r["mass_overlap"] < 1.0 for r in rows), rows
    cycle2 = {(r["student"], r["teacher"]): r["mass_overlap"]
              for r in json.loads((tmp_path / "out" / "diagnostics" / "cycle-002.json").read_text())}
    saved = json.loads((tmp_path / "out" / "status.json").read_text())
    assert {(p["student"], p["teacher"]): (p["distilling"], p["reason"], p["alignment"])
            for p in saved["consolidation"]} == {k: (True, "Diverged", v) for k, v in cycle2.items()}
    assert all(d["massOverlap"] is not None for d in saved["diagnostics"])
    planned = [e for e in events if "ConsolidationPlanned" in e]
    assert len(planned) == 2 and "distilling none" in planned[0] and "resting none" in planned[1], planned
