"""Pure chart tests: the pinned helm and promtool binaries, no cluster (see helmtools.py)."""

from __future__ import annotations

import pytest

from tests.chart.helmtools import tool


@pytest.fixture(scope="session")
def helm_bin() -> str:
    return tool("helm")


@pytest.fixture(scope="session")
def promtool_bin() -> str:
    return tool("promtool")
