"""Pure chart tests: the pinned helm and promtool binaries, no cluster (see helmtools.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operator"))  # builders_test_helpers

from helmtools import tool  # noqa: E402


@pytest.fixture(scope="session")
def helm_bin() -> str:
    return tool("helm")


@pytest.fixture(scope="session")
def promtool_bin() -> str:
    return tool("promtool")
