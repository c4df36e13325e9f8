"""Every malformed manifest of tests/malformed.py is refused by the spec model, naming the field.
(tests/cluster/test_operator_admission.py sends the same cases to the real apiserver.)"""

from __future__ import annotations

import re

import pytest

from copd_core.spec import SpecError, parse_manifest
from tests.malformed import MALFORMED, example, malformed


def test_the_example_is_accepted():
    parse_manifest(example())


def test_there_are_at_least_forty_cases():
    assert len(MALFORMED) >= 40


@pytest.mark.parametrize("case", list(MALFORMED))
def test_refused_naming_the_field(case):
    with pytest.raises(SpecError) as err:
        parse_manifest(malformed(case))
    field = MALFORMED[case][1]
    # pydantic writes list indexes as `.0.`, the apiserver as `[0]`
    said = re.sub(r"\.(\d+)(?=\.|:|$)", r"[\1]", str(err.value))
    assert field in said, said
