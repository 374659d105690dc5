"""Continuous batching: chunked prefill (Sarathi-Serve), scheduling policies, no starvation."""

from __future__ import annotations

import math

import pytest

from sim import LLM, SamplingParams
from sim.core.errors import ConfigError
from sim.core.request import Status
from sim.engine.args import EngineArgs
from sim.engine.engine import Engine
from sim.model.reference import generate
from sim.workload.specs import RequestSpec, make_workload


def timing(specs, record_steps=False, **kwargs):
    engine = Engine(EngineArgs(mode="timing", **kwargs))
    return engine.run(specs, record_steps=record_steps)


def test_chunked_prefill_greedy_equals_reference():
    engine = Engine(EngineArgs(dtype="float64", enable_chunked_prefill=True,
                               max_num_batched_tokens=16, long_prefill_token_threshold=7,
                               max_num_partial_prefills=2, max_num_seqs=4))
    specs = list(make_workload(6, 40.0, 40, 8, seed=4, vocab_size=256))
    result = engine.run(specs, record_steps=True)
    for spec, req in zip(specs, sorted(result.requests, key=lambda r: r.index), strict=True):
        assert req.output_token_ids == generate(engine.functional_model, spec.prompt_token_ids, 8)
    cols = result.steps.columns()
    assert (cols["num_prefill_tokens"] + cols["num_decode_tokens"]).max() <= 16


def test_prompt_longer_than_budget_needs_chunking():
    spec = [RequestSpec("long", 0.0, 300, 4)]
    plain = timing(spec, max_num_batched_tokens=256, max_model_len=512)
    assert plain.requests[0].status is Status.REJECTED
    chunked = timing(spec, max_num_batched_tokens=256, max_model_len=512,
                     enable_chunked_prefill=True)
    assert chunked.requests[0].status is Status.FINISHED


def test_chunk_caps_and_partial_prefill_limit():
    specs = [RequestSpec(f"r{i}", 0.0, 100, 3) for i in range(3)]
    result = timing(specs, record_steps=True, enable_chunked_prefill=True,
                    max_num_batched_tokens=256, long_prefill_token_threshold=30,
                    max_num_partial_prefills=2)
    cols = result.steps.columns()
    # two prompts in progress at most, each at most 30 tokens a step
    assert cols["num_prefill_tokens"].max() <= 60
    assert all(r.status is Status.FINISHED for r in result.requests)


def test_chunked_prefill_protects_decodes_from_long_prompts():
    """Decode-first chunking keeps inter-token latency low when long prompts arrive mid-decode
    (the Sarathi-Serve claim): p99 ITL drops, tokens are the same."""
    specs = [RequestSpec(f"d{i}", 0.0, 32, 200) for i in range(8)]
    specs += [RequestSpec(f"p{i}", 0.5 + 0.2 * i, 3000, 2) for i in range(6)]
    plain = timing(specs)
    chunked = timing(specs, enable_chunked_prefill=True, max_num_batched_tokens=512)
    assert chunked.summary.itl.p99_s < 0.5 * plain.summary.itl.p99_s


def test_prompt_that_cannot_fit_beside_decodes_is_not_starved():
    # 8 requests keep decoding; a prompt of budget - 4 tokens arrives and cannot fit beside 8
    # decodes: it gets a step of its own instead of waiting for the decodes to finish
    specs = [RequestSpec(f"d{i}", 0.0, 16, 400) for i in range(8)]
    specs.append(RequestSpec("big", 0.2, 2044, 2))
    result = timing(specs, max_num_batched_tokens=2048, max_model_len=4096)
    big = next(r for r in result.requests if r.request_id == "big")
    decodes_end_s = max(r.finished_s for r in result.requests if r.request_id != "big")
    assert big.first_token_s < 0.5 * decodes_end_s


def test_priority_overtakes_and_preempts():
    llm = LLM(model="meta-llama/Llama-2-7b-hf", mode="timing", scheduling_policy="priority",
              max_num_seqs=1)
    outs = llm.generate(["a" * 50, "b" * 50, "c" * 50],
                        SamplingParams(max_tokens=20, ignore_eos=True), priority=[5, 5, 0])
    low1, low2, high = (o.metrics for o in outs)
    # all arrive at once: the priority-0 request runs first, then FCFS among equals
    assert high.first_token_time < low1.first_token_time < low2.first_token_time


def test_priority_preempts_a_running_request_of_worse_priority():
    engine = Engine(EngineArgs(mode="timing", scheduling_policy="priority", max_num_seqs=1))
    low = engine.make_request("low", 0, 64, SamplingParams(max_tokens=200, ignore_eos=True), 0.0)
    high = engine.make_request("high", 1, 64, SamplingParams(max_tokens=5, ignore_eos=True), 0.5)
    high.priority = -1
    result = engine.run([low, high])
    by_id = {r.request_id: r for r in result.requests}
    assert by_id["low"].num_preemptions == 1
    assert by_id["high"].finished_s < by_id["low"].finished_s


def test_shortest_prompt_first():
    specs = [RequestSpec("long", 0.0, 2000, 4), RequestSpec("short", 0.0, 10, 4)]
    result = timing(specs, scheduling_policy="shortest_prompt_first", max_num_seqs=1)
    by_id = {r.request_id: r for r in result.requests}
    assert by_id["short"].first_token_s < by_id["long"].first_token_s


def test_priority_greedy_tokens_unchanged():
    engine = Engine(EngineArgs(dtype="float64", scheduling_policy="priority", max_num_seqs=2))
    specs = list(make_workload(5, math.inf, 12, 6, seed=8, vocab_size=256))
    reqs = [engine.request_from_spec(s, i) for i, s in enumerate(specs)]
    for i, req in enumerate(reqs):
        req.priority = -i
    result = engine.run(reqs)
    for spec, req in zip(specs, sorted(result.requests, key=lambda r: r.index), strict=True):
        assert req.output_token_ids == generate(engine.functional_model, spec.prompt_token_ids, 6)


@pytest.mark.parametrize("rate", [5.0, math.inf])
def test_coasting_identical_with_chunked_prefill(rate):
    def run(coast):
        engine = Engine(EngineArgs(mode="timing", enable_chunked_prefill=True,
                                   max_num_batched_tokens=128, max_num_seqs=6))
        engine.coast_enabled = coast
        result = engine.run(make_workload(40, rate, 300, 30, seed=1), record_steps=True)
        return [(r.request_id, tuple(r.token_times_s)) for r in result.requests], result.steps.rows

    assert run(True) == run(False)


def test_bad_policy_arguments():
    with pytest.raises(ConfigError, match="scheduling_policy"):
        EngineArgs(scheduling_policy="lifo")
    with pytest.raises(ConfigError, match="chunked"):
        EngineArgs(scheduler="static", enable_chunked_prefill=True)
    with pytest.raises(ConfigError):
        EngineArgs(max_num_partial_prefills=0)


@pytest.mark.parametrize("options", [{}, {"enable_chunked_prefill": True},
                                     {"scheduling_policy": "priority"}])
def test_no_stall_under_kv_pressure(conv_trace, options):
    """200 conversation requests at once on the default paged KV: memory runs out, long prompts
    cannot fit beside the decodes, preemptions happen; every request still ends."""
    from sim.workload.specs import workload_from_trace

    engine = Engine(EngineArgs(mode="timing", **options))
    result = engine.run(workload_from_trace(conv_trace, num_requests=200, request_rate=math.inf))
    assert result.summary.rejected_by_reason == {"prompt longer than max_model_len": 1}
    assert result.summary.num_completed == 199


def test_watermark_keeps_room_to_grow(conv_trace):
    """vLLM v0's watermark: admitting only while 1% (here 10%) of the KV pool stays free leaves
    the running requests room to grow, so fewer of them are preempted."""
    from sim.workload.specs import workload_from_trace

    def preemptions(watermark):
        engine = Engine(EngineArgs(mode="timing", kv_watermark=watermark,
                                   num_gpu_blocks_override=2000))
        result = engine.run(workload_from_trace(conv_trace, num_requests=150,
                                                request_rate=math.inf, max_prompt_len=2048))
        assert result.summary.num_completed == 150
        return result.stats.num_preemptions

    assert preemptions(0.10) < preemptions(0.0)


def test_coasting_a_prompt_whose_last_chunk_is_one_token(conv_trace):
    """A chunked prompt can end with a 1-token chunk that looks like a decode to the timing
    fast path; its first token time must still be stamped (found on the Azure trace)."""
    from sim.workload.specs import workload_from_trace

    def run(coast):
        engine = Engine(EngineArgs(mode="timing", enable_chunked_prefill=True))
        engine.coast_enabled = coast
        specs = workload_from_trace(conv_trace, num_requests=20, request_rate=0.5, seed=0,
                                    max_prompt_len=2048, max_output_len=2048)
        return [(r.request_id, r.first_token_s, tuple(r.token_times_s))
                for r in engine.run(specs).requests]

    assert run(True) == run(False)
