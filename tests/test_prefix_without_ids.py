"""Prefix caching on a workload without token ids (issue 14): a warning once, and the run is
the same as without prefix caching (nothing can be shared), on the fast allocation path."""

from __future__ import annotations

import warnings

from sim.engine.args import EngineArgs
from sim.engine.engine import Engine
from sim.workload.shared_prefix import shared_prefix_workload
from sim.workload.specs import make_workload


def _run(prefix: bool) -> tuple[list[tuple[str, tuple[float, ...]]], int]:
    engine = Engine(EngineArgs(mode="timing", enable_prefix_caching=prefix, max_num_seqs=16,
                               num_gpu_blocks_override=400))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = engine.run(make_workload(120, 20.0, 200, 40, seed=3))
    times = [(r.request_id, tuple(r.token_times_s)) for r in result.requests]
    return times, sum("without token ids" in str(w.message) for w in caught)


def test_prefix_caching_without_ids_warns_once_and_changes_nothing():
    with_prefix, num_warnings = _run(True)
    without, none = _run(False)
    assert num_warnings == 1 and none == 0
    assert with_prefix == without


def test_prefix_caching_with_ids_does_not_warn():
    engine = Engine(EngineArgs(mode="timing", enable_prefix_caching=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = engine.run(shared_prefix_workload(20, 10.0, 64, 16, 8, seed=0))
    assert result.summary.num_completed == 20
