"""python -m experiments.compare SPEC --output DIR [--jobs N] [--pilot/--no-pilot] [--only M1,M2,...]

Trains CoPD, its baselines and its ablations (docs/science.md), writes
DIR/comparison.json, comparison.md, pilot.json and the plots, and prints
comparison.md. Jobs already on disk under DIR/runs/ are not run again.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from experiments.compare.kernels import pin

pin()  # before torch loads: MKL's and ATen's kernels fixed, not chosen per CPU (kernels.py)

from experiments.compare.harness import main as run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.compare", description=__doc__.split("\n\n")[1])
    ap.add_argument("spec", type=Path, help="comparison spec (e.g. examples/compare.yaml)")
    ap.add_argument("--output", "-o", type=Path, required=True, help="output directory (resumable)")
    ap.add_argument("--jobs", "-j", type=int, default=1, help="worker processes (one torch thread each)")
    ap.add_argument("--pilot", action=argparse.BooleanOptionalAction, default=True,
                    help="also run the pilot study (OPD gain vs teacher–student overlap)")
    ap.add_argument("--only", type=lambda s: [x for x in s.split(",") if x], default=None,
                    help="run only these methods (names as in the table, e.g. copd,copd_adaptive,copd@3); "
                         "the output then holds only them")
    args = ap.parse_args(argv)
    run(args.spec, args.output, jobs=args.jobs, pilot=args.pilot, only=args.only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
