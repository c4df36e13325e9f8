"""Does a rerun of the comparison give the committed numbers? Compares two comparison.json files.

    python -m experiments.compare.verify runs/compare/comparison.json docs/science/comparison.json [--tolerance 0.005]

For every method of the reference: its average (the issue's criterion: within --tolerance) and every
seed's per-domain scores (exact). The base model's sha256 and the base scores must match too: a
different base makes every other comparison meaningless. Where the reference was computed with the
pinned kernels (`kernels.pinned`, experiments/compare/kernels.py) and the rerun was not, that is said
first: it explains any difference that follows. Prints one JSON object; exits 1 when a method's
average differs by more than the tolerance, a method or seed is missing, the bases differ, or the
rerun did not run the reference's pinned kernels.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def compare(got: dict, want: dict, tolerance: float) -> dict:
    """Pure: what differs between a rerun (`got`) and the reference (`want`)."""
    methods, problems = {}, []
    kernels_ref, kernels_run = want.get("kernels") or {}, got.get("kernels") or {}
    if kernels_ref.get("pinned") and not kernels_run.get("pinned"):
        problems.append("the rerun did not run the pinned kernels (experiments/compare/kernels.py): "
                        f"MKL_CBWR {kernels_run.get('mkl_cbwr')}, ATen {kernels_run.get('aten_cpu_capability')} "
                        f"on {kernels_run.get('cpu')}; the reference ran MKL_CBWR {kernels_ref.get('mkl_cbwr')}, "
                        f"ATen {kernels_ref.get('aten_cpu_capability')}")
    if got.get("base_model") != want.get("base_model"):
        problems.append(f"base model differs: {got.get('base_model')} vs {want.get('base_model')}")
    if got.get("base_eval") != want.get("base_eval"):
        problems.append(f"base eval differs: {got.get('base_eval')} vs {want.get('base_eval')}")
    for name, ref in want["methods"].items():
        run = got["methods"].get(name)
        if run is None:
            problems.append(f"{name}: missing from the rerun")
            continue
        seeds_ref = {s["seed"]: s for s in ref["seeds"]}
        seeds_run = {s["seed"]: s for s in run["seeds"]}
        missing = sorted(set(seeds_ref) - set(seeds_run))
        exact = [s for s in seeds_ref if s in seeds_run and seeds_run[s]["eval"] == seeds_ref[s]["eval"]]
        diff = round(run["avg"] - ref["avg"], 6)
        methods[name] = {"avg": run["avg"], "avg_committed": ref["avg"], "diff": diff,
                         "seeds_exact": len(exact), "seeds": len(seeds_ref)}
        if missing:
            problems.append(f"{name}: seeds {missing} missing from the rerun")
        if abs(diff) > tolerance:
            problems.append(f"{name}: average {run['avg']} vs {ref['avg']} (diff {diff:+.4f} > {tolerance})")
    return {"methods": methods, "kernels": {"rerun": kernels_run, "reference": kernels_ref},
            "max_abs_diff": max((abs(m["diff"]) for m in methods.values()), default=None),
            "all_seeds_exact": all(m["seeds_exact"] == m["seeds"] for m in methods.values()),
            "tolerance": tolerance, "problems": problems, "ok": not problems}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="experiments.compare.verify", description=__doc__.splitlines()[0])
    p.add_argument("rerun", type=Path, help="comparison.json of the rerun")
    p.add_argument("reference", type=Path, help="comparison.json committed (docs/science/...)")
    p.add_argument("--tolerance", type=float, default=0.005, help="Largest allowed difference of a method's average.")
    a = p.parse_args(argv)
    res = compare(json.loads(a.rerun.read_text()), json.loads(a.reference.read_text()), a.tolerance)
    print(json.dumps(res, indent=1))
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
