"""The engine in timing-only mode: lifecycle, conservation, determinism, rejections, no hangs."""

from __future__ import annotations

import math

import pytest

from sim.core.errors import ConfigError
from sim.core.request import Status
from sim.engine.args import EngineArgs
from sim.engine.engine import Engine
from sim.workload.specs import RequestSpec, make_workload
from tests.utils import create_scheduler


def timing_engine(**kwargs) -> Engine:
    return Engine(EngineArgs(mode="timing", **kwargs))


@pytest.mark.parametrize("scheduler", ["static", "continuous"])
@pytest.mark.parametrize("kv_cache", ["none", "contiguous"])
def test_every_request_ends_and_tokens_add_up(scheduler, kv_cache):
    engine = timing_engine(scheduler=scheduler, kv_cache=kv_cache, max_num_seqs=8)
    specs = list(make_workload(40, 20.0, 64, 16, seed=3))
    result = engine.run(specs)
    assert len(result.requests) == 40
    assert all(r.status is Status.FINISHED for r in result.requests)
    assert all(r.num_output_tokens == 16 and r.finish_reason == "length" for r in result.requests)
    # conservation: KV-cached engines compute each token once (the last output is never fed
    # back); without a cache every step recomputes the whole sequence: sum_{t=p}^{p+o-1} t
    if kv_cache == "contiguous":
        assert result.stats.num_tokens_computed == 40 * (64 + 16 - 1)
    else:
        assert result.stats.num_tokens_computed == 40 * sum(range(64, 64 + 16))
    # all timestamps ordered per request
    for r in result.requests:
        assert r.arrival_s <= r.first_scheduled_s < r.first_token_s <= r.finished_s
        assert r.token_times_s == sorted(r.token_times_s)


def test_kv_is_all_free_at_the_end():
    engine, kv, scheduler = create_scheduler(max_num_seqs=4)
    for spec in make_workload(10, math.inf, 32, 8, seed=0):
        assert scheduler.add(engine.request_from_spec(spec, 0)) is None
    from sim.executor.timing import TimingExecutor

    executor, now_s = TimingExecutor(), 0.0
    while scheduler.has_work():
        plan = scheduler.schedule(now_s)
        assert plan is not None
        assert len(plan.seqs) <= 4
        assert kv.num_reserved_tokens() <= kv.num_kv_tokens
        now_s += engine.cost_model.step_cost(plan.shape).total_s
        scheduler.update(plan, executor.run(plan), now_s)
    assert kv.num_reserved_tokens() == 0 and kv.num_used_tokens() == 0


def test_same_seed_bit_identical():
    def run():
        result = timing_engine().run(make_workload(60, 8.0, 200, 50, seed=11))
        return [(r.request_id, r.first_token_s, r.finished_s, tuple(r.token_times_s))
                for r in result.requests]

    assert run() == run()


def test_static_batch_waits_for_its_longest_member():
    engine = timing_engine(scheduler="static", max_num_seqs=2)
    specs = [RequestSpec("short", 0.0, 16, 2), RequestSpec("long", 0.0, 16, 40),
             RequestSpec("next", 0.0, 16, 2)]
    result = engine.run(specs)
    by_id = {r.request_id: r for r in result.requests}
    # the short member finishes at its own last token but is returned with the batch, and
    # the next request starts only after the batch
    assert by_id["short"].finished_s < by_id["long"].finished_s
    assert by_id["short"].returned_s == by_id["long"].returned_s == by_id["long"].finished_s
    assert by_id["next"].first_scheduled_s == by_id["long"].finished_s


def test_continuous_lets_short_requests_leave_early():
    engine = timing_engine(scheduler="continuous", max_num_seqs=2)
    specs = [RequestSpec("short", 0.0, 16, 2), RequestSpec("long", 0.0, 16, 40),
             RequestSpec("next", 0.0, 16, 2)]
    by_id = {r.request_id: r for r in engine.run(specs).requests}
    assert by_id["short"].finished_s < by_id["long"].finished_s
    assert by_id["next"].first_scheduled_s < by_id["long"].finished_s


def test_static_prices_padding():
    """A static batch of one long and one short prompt is priced as two long prompts."""
    static = timing_engine(scheduler="static").run(
        [RequestSpec("a", 0.0, 1000, 1), RequestSpec("b", 0.0, 10, 1)])
    continuous = timing_engine(scheduler="continuous").run(
        [RequestSpec("a", 0.0, 1000, 1), RequestSpec("b", 0.0, 10, 1)])
    assert static.stats.num_tokens_priced == 2000
    assert continuous.stats.num_tokens_priced == 1010


def test_too_long_prompt_is_rejected_with_a_reason_and_others_run():
    engine = timing_engine(max_model_len=128)
    specs = [RequestSpec("ok", 0.0, 100, 4), RequestSpec("too-long", 0.0, 500, 4),
             RequestSpec("ok2", 0.1, 50, 4)]
    result = engine.run(specs)
    by_id = {r.request_id: r for r in result.requests}
    assert by_id["too-long"].status is Status.REJECTED
    reason = by_id["too-long"].reject_reason
    assert reason == "prompt longer than max_model_len: 500 tokens > max_model_len=128"
    assert by_id["ok"].status is by_id["ok2"].status is Status.FINISHED
    assert result.summary.num_rejected == 1 and result.summary.num_completed == 2


def test_request_exceeding_token_budget_is_rejected_not_retried_forever():
    engine = timing_engine(max_model_len=512, max_num_batched_tokens=256)
    result = engine.run([RequestSpec("big", 0.0, 300, 4), RequestSpec("small", 0.0, 100, 4)])
    by_id = {r.request_id: r for r in result.requests}
    assert "max_num_batched_tokens=256" in by_id["big"].reject_reason
    assert by_id["small"].status is Status.FINISHED


def test_no_cache_request_that_outgrows_budget_is_rejected_upfront():
    # without a KV cache a step recomputes the whole sequence: 100 + 200 > 256
    engine = timing_engine(kv_cache="none", max_model_len=512, max_num_batched_tokens=256)
    result = engine.run([RequestSpec("grows", 0.0, 100, 200)])
    assert result.requests[0].status is Status.REJECTED


def test_generation_stops_at_max_model_len():
    engine = timing_engine(max_model_len=64)
    result = engine.run([RequestSpec("r", 0.0, 60, 100)])
    req = result.requests[0]
    assert req.num_tokens == 64 and req.finish_reason == "length"


def test_unsorted_arrivals_are_an_error():
    with pytest.raises(ConfigError, match="sort the workload"):
        timing_engine().run([RequestSpec("a", 1.0, 8, 2), RequestSpec("b", 0.5, 8, 2)])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_num_seqs": 0},
        {"gpu_memory_utilization": 1.5},
        {"kv_cache": "paged-ish"},
        {"scheduler": "magic"},
        {"mode": "fast"},
        {"tensor_parallel_size": 0},
        {"pipeline_parallel_size": 0},
        {"data_parallel_router": "random"},
        {"max_model_len": -4},
    ],
)
def test_bad_engine_arguments_are_clear_errors(kwargs):
    with pytest.raises(ConfigError):
        EngineArgs(**kwargs)


def test_unknown_engine_argument_suggests():
    with pytest.raises(ConfigError, match="max_num_seqs"):
        EngineArgs.from_kwargs(max_num_seq=8)


def test_max_model_len_beyond_kv_capacity_is_an_error():
    with pytest.raises(ConfigError, match="larger than the KV cache"):
        timing_engine(model="meta-llama/Llama-2-13b-hf", hardware="a100-sxm4-40gb",
                      gpu_memory_utilization=0.68)


def test_max_model_len_beyond_the_model_is_an_error():
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        timing_engine(max_model_len=8192)


@pytest.mark.parametrize("limits", [
    {"max_num_seqs": 6},  # the queue head is blocked by the sequence limit
    {"max_num_batched_tokens": 120, "max_model_len": 120},  # ... by the token budget
    {"kv_cache": "none"},
    {"hardware": "l4", "max_model_len": 4096, "gpu_memory_utilization": 0.7},  # ... by KV
])
@pytest.mark.parametrize("rate", [2.0, 50.0, math.inf])
def test_coasting_is_identical_to_step_by_step(limits, rate):
    """The timing-only fast path for plain-decode stretches changes nothing but speed."""
    def run(coast: bool):
        engine = timing_engine(**limits)
        engine.coast_enabled = coast
        specs = make_workload(50, rate, 48, 30, seed=4)
        result = engine.run(specs, record_steps=True)
        times = [(r.request_id, r.first_token_s, r.finished_s, tuple(r.token_times_s))
                 for r in result.requests]
        return times, (result.stats, result.steps.rows)

    fast, fast_stats = run(True)
    slow, slow_stats = run(False)
    assert fast == slow
    assert fast_stats == slow_stats
