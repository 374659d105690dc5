"""`--trace-json`: a run as a Chrome / Perfetto trace (sim.metrics.trace_export)."""

from __future__ import annotations

import json
import math

import pytest

from sim.cli.main import main
from sim.engine.args import EngineArgs
from sim.engine.engine import Engine
from sim.engine.records import request_times
from sim.metrics.trace_export import ENGINE_PID, REQUESTS_PID, chrome_trace
from sim.workload.specs import RequestSpec, make_workload


def traced_run(**kwargs):
    """A timing run whose trace is built from its steps and its requests' times."""
    args = {"mode": "timing", "max_model_len": 512, **kwargs}
    engine = Engine(EngineArgs(**args))
    times = []
    result = engine.run(make_workload(24, 40.0, 120, 30, seed=3), keep_requests=False,
                        on_finish=lambda r: times.append(request_times(r)), record_steps=True)
    trace = json.loads(json.dumps(chrome_trace(result.steps, times, engine.plan.pp)))
    return result, times, trace["traceEvents"]


def names(events, pid):
    return {e["tid"]: e["args"]["name"] for e in events
            if e["ph"] == "M" and e["pid"] == pid and e["name"] == "thread_name"}


def test_step_events_sum_to_busy_time_and_carry_preemptions_and_swaps():
    # a pool of 40 blocks for 24 requests of up to 150 tokens: preemption by swapping
    result, _, events = traced_run(num_gpu_blocks_override=40, preemption_mode="swap")
    steps = [e for e in events if e["ph"] == "X" and e["pid"] == ENGINE_PID]
    assert len(steps) == result.stats.num_steps
    # the format's microseconds: the spans of the one lane add up to its busy time
    assert math.isclose(sum(e["dur"] for e in steps) / 1e6, result.stats.busy_s, rel_tol=1e-9)
    assert sum(e["args"]["num_preemptions"] for e in steps) == result.stats.num_preemptions > 0
    assert sum(e["args"]["num_swapped_out_blocks"] for e in steps) > 0
    assert sum(e["args"]["num_swapped_in_blocks"] for e in steps) > 0
    tokens = sum(e["args"]["num_prefill_tokens"] + e["args"]["num_decode_tokens"] for e in steps)
    assert tokens == result.stats.num_tokens_computed
    assert {e["name"] for e in steps} <= {"prefill", "decode", "mixed"}
    assert "prefill" in {e["name"] for e in steps} and "decode" in {e["name"] for e in steps}
    assert names(events, ENGINE_PID) == {0: "replica 0"}
    first = min(steps, key=lambda e: e["ts"])
    assert first["ts"] == result.steps.rows[0][0] * 1e6


def test_every_request_has_its_spans_in_microseconds():
    _, times, events = traced_run()
    tracks = names(events, REQUESTS_PID)
    assert sorted(tracks.values()) == sorted(f"request {t.request_id}" for t in times)
    by_tid: dict[int, list] = {}
    for e in events:
        if e["ph"] == "X" and e["pid"] == REQUESTS_PID:
            by_tid.setdefault(e["tid"], []).append(e)
    assert len(by_tid) == len(times)
    for tid, t in enumerate(times, start=1):
        queued, prefill, decode = sorted(by_tid[tid], key=lambda e: e["ts"])
        assert [queued["name"], prefill["name"], decode["name"]] == ["queued", "prefill", "decode"]
        assert queued["ts"] == pytest.approx(t.arrival_s * 1e6)
        assert queued["ts"] + queued["dur"] == pytest.approx(prefill["ts"])
        assert prefill["ts"] == pytest.approx(t.first_scheduled_s * 1e6)
        assert prefill["ts"] + prefill["dur"] == pytest.approx(t.first_token_s * 1e6)
        assert decode["ts"] + decode["dur"] == pytest.approx(t.token_times_s[-1] * 1e6)
        assert decode["args"]["num_output_tokens"] == 30


def test_a_track_per_replica_and_per_virtual_engine():
    _, _, events = traced_run(data_parallel_size=2)
    assert names(events, ENGINE_PID) == {0: "replica 0", 1: "replica 1"}
    _, _, events = traced_run(pipeline_parallel_size=2, model="meta-llama/Llama-2-13b-hf")
    assert names(events, ENGINE_PID) == {0: "replica 0 / virtual engine 0",
                                         1: "replica 0 / virtual engine 1"}


def test_a_rejected_request_is_an_instant_with_its_reason():
    engine = Engine(EngineArgs(mode="timing", max_model_len=256))
    times = []
    engine.run([RequestSpec("ok", 0.0, 16, 4), RequestSpec("long", 0.0, 4000, 4)],
               on_finish=lambda r: times.append(request_times(r)), record_steps=True)
    events = chrome_trace(None, times)["traceEvents"]
    instants = [e for e in events if e["ph"] == "i"]
    assert len(instants) == 1 and instants[0]["name"] == "rejected"
    assert instants[0]["args"]["request_id"] == "long" and instants[0]["args"]["reason"]


def test_simulate_writes_the_trace(tmp_path, capsys):
    path = tmp_path / "out" / "trace.json"
    code = main(["simulate", "--mode", "timing", "--num-prompts", "6", "--input-len", "64",
                 "--output-len", "8", "--request-rate", "20", "--no-progress",
                 "--trace-json", str(path)])
    assert code == 0
    trace = json.loads(path.read_text())
    events = trace["traceEvents"]
    assert {e["ph"] for e in events} == {"M", "X"}
    assert len(names(events, REQUESTS_PID)) == 6
    assert "ui.perfetto.dev" in capsys.readouterr().out
    # a path that cannot be written is refused before the run, naming the flag
    assert main(["simulate", "--mode", "timing", "--num-prompts", "2", "--no-progress",
                 "--trace-json", str(tmp_path)]) == 2
    assert "--trace-json" in capsys.readouterr().err
