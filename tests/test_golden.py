"""Golden results: the fixed runs of `tests/golden/runs.py` stay identical (floats to 1e-12).

A refactor must not change any result; a bug fix may, and then the golden is regenerated
(`python -m tests.golden.runs --write`) in the same commit, which says which cases changed and why.
"""

from __future__ import annotations

import json

import pytest

from tests.golden import runs

GOLDEN = runs.load()


@pytest.mark.parametrize("name", list(runs.CASES))
def test_golden_run_is_bit_identical(name):
    if name.startswith("timing") and not runs.TRACE.exists():
        pytest.skip(f"the Azure conv trace is not at {runs.TRACE}")
    assert name in GOLDEN, f"no golden for {name}: run python -m tests.golden.runs --write {name}"
    fresh = json.loads(json.dumps(runs.run_case(name)))
    diff = runs.same(GOLDEN[name], fresh)
    assert diff is None, f"{name} changed at {diff}"
