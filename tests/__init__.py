"""The test suite: unit/ (pure, fast), model/ (tiny real models), chart/, cluster/ (real control plane), experiments/."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository root
