"""`max_concurrency` (vllm bench serve's client-side cap): never more than N requests in
flight, none lost, held requests timed from when they are sent, and no cap = no change."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sim.core.errors import ConfigError
from sim.engine.args import EngineArgs
from sim.engine.engine import Engine
from sim.workload.specs import make_workload


def _run(cap: int | None, rate: float = float("inf"), dp: int = 1):
    engine = Engine(EngineArgs(mode="timing", max_num_seqs=64, data_parallel_size=dp))
    return engine.run(make_workload(40, rate, 64, 16, seed=5), max_concurrency=cap).requests


@pytest.mark.parametrize("cap, dp", [(1, 1), (4, 1), (7, 2)])
def test_never_more_than_cap_in_flight_and_none_lost(cap, dp):
    reqs = _run(cap, dp=dp)
    assert len(reqs) == 40 and all(r.finished_s == r.finished_s for r in reqs)
    # in flight over time: +1 at (re-timed) arrival, -1 at finish; ends before starts at a tie
    events = sorted([(r.arrival_s, 1) for r in reqs] + [(r.finished_s, -1) for r in reqs],
                    key=lambda e: (e[0], e[1]))
    level, peak = 0, 0
    for _, delta in events:
        level += delta
        peak = max(peak, level)
    assert peak == cap
    # a held request is sent when another one ends
    ends = {r.finished_s for r in reqs}
    assert all(r.arrival_s == 0.0 or r.arrival_s in ends for r in reqs)


def test_a_cap_above_the_load_changes_nothing():
    def times(reqs):
        return [(r.request_id, r.arrival_s, tuple(r.token_times_s)) for r in reqs]
    assert times(_run(None, rate=5.0)) == times(_run(1000, rate=5.0))


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_bad_caps_are_refused(bad):
    with pytest.raises(ConfigError, match="max_concurrency"):
        _run(bad)


def test_cli_flag_reaches_the_result_json(tmp_path):
    out = tmp_path / "r.json"
    done = subprocess.run([sys.executable, "-m", "sim.cli.main", "simulate", "--mode", "timing",
                           "--num-prompts", "12", "--max-concurrency", "3", "--no-progress",
                           "--result-json", str(out)], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result["max_concurrency"] == 3 and result["completed"] == 12
