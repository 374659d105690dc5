"""Observability: the per-step series and the plots built on it."""

from __future__ import annotations

import itertools

from sim.engine.args import EngineArgs
from sim.engine.engine import Engine
from sim.metrics.plots import assign_slots, plot_gantt, plot_latency_throughput, plot_step_series
from sim.workload.specs import RequestSpec, make_workload


def test_step_series_adds_up():
    engine = Engine(EngineArgs(mode="timing", max_num_seqs=4))
    result = engine.run(make_workload(20, 10.0, 40, 10, seed=1), record_steps=True)
    cols = result.steps.columns()
    assert len(result.steps) == result.stats.num_steps
    total = cols["num_prefill_tokens"].sum() + cols["num_decode_tokens"].sum()
    assert total == result.stats.num_tokens_computed == 20 * (40 + 10 - 1)
    assert cols["num_seqs"].max() <= 4
    assert (cols["end_s"] > cols["start_s"]).all()
    assert (cols["start_s"][1:] >= cols["end_s"][:-1]).all()  # one step at a time


def test_slots_never_overlap():
    engine = Engine(EngineArgs(mode="timing", max_num_seqs=3))
    requests = engine.run(make_workload(15, 30.0, 30, 12, seed=2)).requests
    slots = assign_slots(requests)
    assert max(slots.values()) < 3
    by_slot: dict[int, list] = {}
    for req in requests:
        by_slot.setdefault(slots[req.request_id], []).append(req)
    for reqs in by_slot.values():
        reqs.sort(key=lambda r: r.first_scheduled_s)
        for a, b in itertools.pairwise(reqs):
            assert a.finished_s <= b.first_scheduled_s


def test_plots_draw():
    engine = Engine(EngineArgs(mode="timing", scheduler="static", max_num_seqs=2))
    result = engine.run([RequestSpec(f"r{i}", 0.0, 20, 5 + 5 * i) for i in range(4)],
                        record_steps=True)
    assert plot_gantt(result.requests).patches
    assert all(ax.lines for ax in plot_step_series(result.steps))
    assert plot_latency_throughput({"a": [(1.0, 0.1), (2.0, 0.3)]}).lines
