"""The science harness: CoPD against its baselines (docs/science.md). Not shipped, not a product command.

    python -m experiments.compare examples/compare.yaml --output runs/compare [--jobs 2]
"""
