"""Paged KV, prefix caching and preemption through the whole engine.

Oracles (float64, greedy unless stated): paged == contiguous for any block size; prefix-cached ==
uncached; preempted (recompute and swap) == never preempted; sampled outputs survive preemption
(per-request random streams). Timing: coasting is unchanged by paged growth and preemption; the
victim is the most recently admitted request; prefix hits cut TTFT; contiguous baselines hold
fewer requests at once than paged.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from sim import LLM, SamplingParams
from sim.core.request import Request, Status
from sim.engine.args import EngineArgs
from sim.engine.engine import Engine
from sim.executor.timing import TimingExecutor
from sim.workload.shared_prefix import shared_prefix_workload
from sim.workload.specs import make_workload
from tests.utils import create_scheduler

RNG = np.random.default_rng(0)
SYSTEM = RNG.integers(1, 200, 37).tolist()
PROMPTS = [{"prompt_token_ids": SYSTEM + RNG.integers(1, 200, 3 + 2 * i).tolist()}
           for i in range(7)]
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def outputs(params: SamplingParams = GREEDY, **kwargs) -> tuple[list[list[int]], LLM]:
    llm = LLM(dtype="float64", max_num_seqs=8, max_model_len=128, **kwargs)
    outs = llm.generate(PROMPTS, params)
    return [o.outputs[0].token_ids for o in outs], llm


@pytest.fixture(scope="module")
def contiguous_tokens() -> list[list[int]]:
    return outputs(kv_cache="contiguous")[0]


@pytest.mark.parametrize("block_size", [1, 4, 16, 128])
def test_paged_equals_contiguous_for_any_block_size(contiguous_tokens, block_size):
    assert outputs(kv_cache="paged", block_size=block_size)[0] == contiguous_tokens


def test_prefix_cached_equals_uncached_and_reports_hits(contiguous_tokens):
    tokens, llm = outputs(kv_cache="paged", enable_prefix_caching=True, block_size=8)
    assert tokens == contiguous_tokens
    cached = [r.num_cached_tokens for r in sorted(llm.last_result.requests, key=lambda r: r.index)]
    assert cached[0] == 0 and all(c == 32 for c in cached[1:])  # 37 shared -> 4 blocks of 8
    assert llm.last_result.summary.total_cached_prompt_tokens == 6 * 32


@pytest.mark.parametrize("mode", ["recompute", "swap"])
@pytest.mark.parametrize("prefix", [False, True])
def test_preempted_equals_never_preempted(contiguous_tokens, mode, prefix):
    tokens, llm = outputs(kv_cache="paged", block_size=8, num_gpu_blocks_override=16,
                          preemption_mode=mode, enable_prefix_caching=prefix)
    stats = llm.last_result.stats
    assert stats.num_preemptions > 0
    assert (stats.swap_s > 0) == (mode == "swap")
    assert tokens == contiguous_tokens


def test_sampled_outputs_survive_preemption():
    params = SamplingParams(temperature=0.9, top_p=0.95, max_tokens=24, ignore_eos=True)
    base = outputs(params, kv_cache="paged")[0]
    tokens, llm = outputs(params, kv_cache="paged", block_size=8, num_gpu_blocks_override=16)
    assert llm.last_result.stats.num_preemptions > 0
    assert tokens == base


def timing_requests(engine: Engine, n: int, prompt: int, out: int) -> list[Request]:
    return [engine.request_from_spec(s, i)
            for i, s in enumerate(make_workload(n, math.inf, prompt, out, seed=1))]


def test_victim_is_the_most_recently_admitted_and_requeued_first():
    # a pool of 6 blocks (24 tokens) is smaller than max_model_len: built apart from the engine
    engine, kv, scheduler = create_scheduler(num_blocks=6, kv_cache="paged", block_size=4,
                                             max_model_len=64)
    reqs = timing_requests(engine, 3, 8, 8)  # 2 blocks each: the pool is full after admission
    for r in reqs:
        assert scheduler.add(r) is None
    plan = scheduler.schedule(0.0)
    assert [s.request.request_id for s in plan.seqs] == [r.request_id for r in reqs]
    scheduler.update(plan, TimingExecutor().run(plan), 1.0)
    plan = scheduler.schedule(1.0)  # each needs a 3rd block now: r2 is preempted for r0
    assert [s.request for s in plan.seqs] == [reqs[0], reqs[1]]
    assert list(scheduler.waiting) == [reqs[2]] and reqs[2].num_computed == 0
    assert reqs[2].status is Status.WAITING and scheduler.num_preemptions == 1
    kv.check()


def run_timing(**kwargs):
    engine = Engine(EngineArgs(mode="timing", **kwargs))
    return engine


@pytest.mark.parametrize("limits", [
    {"kv_cache": "paged", "max_num_seqs": 6},
    {"kv_cache": "paged", "block_size": 8, "num_gpu_blocks_override": 40, "max_model_len": 160},
    {"kv_cache": "paged", "block_size": 8, "num_gpu_blocks_override": 40, "max_model_len": 160,
     "preemption_mode": "swap", "swap_space": 0.1},
    {"kv_cache": "paged", "enable_prefix_caching": True, "num_gpu_blocks_override": 60,
     "max_model_len": 160},
    {"kv_cache": "contiguous", "contiguous_reservation": "pow2"},
])
@pytest.mark.parametrize("rate", [5.0, math.inf])
def test_coasting_is_identical_with_paged_growth_and_preemption(limits, rate):
    def run(coast: bool):
        engine = run_timing(**limits)
        engine.coast_enabled = coast
        specs = shared_prefix_workload(40, rate, 24, 30, 50, vocab_size=100, seed=4)
        result = engine.run(specs)
        times = [(r.request_id, r.first_token_s, r.finished_s, tuple(r.token_times_s),
                  r.num_cached_tokens, r.num_preemptions) for r in result.requests]
        return times, result.stats

    fast, fast_stats = run(True)
    slow, slow_stats = run(False)
    assert fast == slow
    assert fast_stats == slow_stats
    assert all(t[3] and len(t[3]) == 50 for t in fast)


def test_all_blocks_free_at_the_end_with_preemption_and_prefix_caching():
    engine, kv, scheduler = create_scheduler(kv_cache="paged", block_size=8,
                                             num_gpu_blocks_override=30, max_model_len=160,
                                             enable_prefix_caching=True)
    specs = list(shared_prefix_workload(30, math.inf, 24, 30, 50, vocab_size=100, seed=2))
    for i, spec in enumerate(specs):
        assert scheduler.add(engine.request_from_spec(spec, i)) is None
    now_s = 0.0
    while scheduler.has_work():
        plan = scheduler.schedule(now_s)
        assert plan is not None
        kv.check()
        now_s += 0.01
        scheduler.update(plan, TimingExecutor().run(plan), now_s)
    kv.check()
    assert scheduler.num_preemptions > 0
    assert kv.num_reserved_tokens() == 0 and kv.num_used_tokens() == 0


def test_prefix_caching_cuts_ttft_in_timing_mode():
    def mean_ttft(prefix: bool):
        engine = run_timing(kv_cache="paged", enable_prefix_caching=prefix)
        result = engine.run(shared_prefix_workload(30, 2.0, 1024, 64, 32, seed=0))
        return result.summary.ttft.mean_s, result.summary.total_cached_prompt_tokens

    (off_s, off_hits), (on_s, on_hits) = mean_ttft(False), mean_ttft(True)
    assert off_hits == 0 and on_hits == 29 * 1024
    assert on_s < 0.7 * off_s


def test_contiguous_baselines_hold_fewer_requests_than_paged():
    peaks = {}
    for name, kw in [("max_len", {"kv_cache": "contiguous"}),
                     ("pow2", {"kv_cache": "contiguous", "contiguous_reservation": "pow2"}),
                     ("oracle", {"kv_cache": "contiguous", "contiguous_reservation": "oracle"}),
                     ("paged", {"kv_cache": "paged"})]:
        engine = run_timing(hardware="a100-sxm4-40gb", model="facebook/opt-13b", **kw)
        result = engine.run(make_workload(300, math.inf, 200, 300, seed=0), record_steps=True)
        peaks[name] = result.steps.summary()["max_batch_size"]
    # with a buddy allocator (the Orca baselines, vLLM paper sec. 6.1) Oracle's exact 500-token
    # reservation still needs a free 512-token chunk, and the 12-token tails it gives back are
    # external fragmentation: Oracle holds no more requests than Pow2 here
    assert peaks["max_len"] < peaks["pow2"] <= peaks["oracle"] < peaks["paged"]


def test_kv_eviction_runs_on_a_pool_smaller_than_max_model_len():
    # a 48-token pool, max_model_len 256: a sliding window of 16 keeps each request bounded
    llm = LLM(dtype="float64", max_model_len=256, block_size=4, num_gpu_blocks_override=12,
              kv_eviction="sliding_window", kv_eviction_window=16)
    short, long = llm.generate([{"prompt_token_ids": list(range(1, 11))},
                                {"prompt_token_ids": list(range(1, 61))}],
                               SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True))
    assert len(short.outputs[0].token_ids) == 100 and short.reject_reason is None
    assert "larger than the KV cache" in long.reject_reason  # its prompt alone needs 15 blocks
