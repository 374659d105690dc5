"""The engine's event loop (`sim.engine.loop`) with its typed events and hooks.

- the clock's tie rule `(time_s, priority, seq)`: completions, then arrivals, then dispatches;
- a feature that is off registers no hook; request-level hooks register on their first request,
  in rank order; capabilities are Protocols the schedulers satisfy;
- lanes are built from explicit arguments (a 1/pp share of the pool, the engine untouched);
- `n > 1` under a tight KV pool (the samples used to wait in the queue holding shared prompt
  blocks, so their preempted leader or sibling could never be re-admitted and every request
  ended "stalled"): every request ends, sample i equals the `n=1` run with seed `seed + i`,
  greedy samples equal greedy decoding, and all KV is freed; in timing mode too, where
  coasting stays bit-identical to step-by-step dispatch;
- beam search under a tight pool: the same beams as the cacheless reference, all KV freed.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from batching.continuous import ContinuousScheduler
from batching.static import StaticScheduler
from cache.parallel_sampling import sample_params
from parallel.plan import ParallelPlan
from sim.core.errors import ConfigError
from sim.core.events import Arrival, CoastDone, Dispatch, EventQueue, StepDone
from sim.core.protocols import CoastableScheduler, JoinableScheduler
from sim.core.request import Request, SamplingParams, Status
from sim.core.step import TIMING_RESULT, ScheduledSeq, StepPlan, StepShape
from sim.engine.args import EngineArgs
from sim.engine.coasting import Coaster
from sim.engine.engine import Engine
from sim.engine.hooks import Admission, BeamRounds, SampleForking, SpeculationObserver
from sim.engine.lanes import OneLane, ReplicaRouter, StagePricer, StepPricer, build_lanes
from sim.engine.loop import EngineLoop
from sim.model.beam_search import BeamSearchParams
from sim.model.reference import beam_search as reference_beam_search
from sim.workload.specs import RequestSpec

RNG = np.random.default_rng(11)
TIGHT = {"num_gpu_blocks_override": 4, "block_size": 4, "max_model_len": 16}
LENGTHS = (3, 5, 9, 7)  # each sequence may grow to 16 tokens: the whole 4-block pool
PROMPTS = [RNG.integers(1, 200, n).tolist() for n in LENGTHS]
SAMPLED = SamplingParams(temperature=0.9, top_p=0.95, seed=11, max_tokens=12, ignore_eos=True)
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def _run(engine: Engine, params: SamplingParams | list[SamplingParams],
         prompts: list[list[int]] = PROMPTS) -> tuple[list[Request], EngineLoop]:
    """Run `prompts` (all arriving at 0) through a fresh loop; the requests and the loop."""
    per = params if isinstance(params, list) else [params] * len(prompts)
    functional = engine.args.mode == "functional"
    reqs = [engine.make_request(str(i), i, len(p), sp, 0.0, p if functional else None)
            for i, (p, sp) in enumerate(zip(prompts, per, strict=True))]
    loop = EngineLoop(engine, record_steps=True)
    return loop.run(reqs).requests, loop


def _assert_all_kv_freed(loop: EngineLoop) -> None:
    for lane in loop.lanes:
        assert lane.kv.num_reserved_tokens() == 0
        assert lane.kv.usage().num_requests == 0
        lane.kv.check()  # reference counts equal the (empty) block tables


def _by_id(reqs: list[Request]) -> dict[str, Request]:
    return {r.request_id: r for r in reqs}


# ---------------------------------------------------------------------- the clock
def test_events_order_completions_then_arrivals_then_dispatches_fifo_on_ties():
    queue = EventQueue()
    req = Request("r", 0, 4, SamplingParams(), 0.0)
    plan = StepPlan((ScheduledSeq(req, 0, 4),), StepShape((4,), (0,)))
    later, dispatch_a, dispatch_b = Dispatch(9), Dispatch(0), Dispatch(1)
    arrival, done, coasted = Arrival(req), StepDone(0, plan, TIMING_RESULT), CoastDone(1)
    for event in (later, dispatch_a, arrival, dispatch_b, done, coasted):
        queue.schedule(2.0 if event is later else 1.0, event)
    popped = [queue.pop() for _ in range(len(queue))]
    assert [e for _, e in popped] == [done, coasted, arrival, dispatch_a, dispatch_b, later]
    assert [t for t, _ in popped] == [1.0] * 5 + [2.0] and queue.now_s == 2.0
    assert queue.peek_time_s() == float("inf") and not queue
    with pytest.raises(ValueError, match="in the past"):
        queue.schedule(1.5, Dispatch(0))
    with pytest.raises(dataclasses.FrozenInstanceError):
        done.lane = 1  # type: ignore[misc]


# ---------------------------------------------------------------------- hooks
def test_a_plain_run_registers_no_hooks_and_features_register_theirs():
    timing = EngineLoop(Engine(EngineArgs(mode="timing")))
    hooks = timing.hooks
    assert isinstance(hooks.router, OneLane) and isinstance(hooks.pricer, StepPricer)
    assert hooks.step_done == hooks.idle == hooks.abort == hooks.end == hooks.dispatch == []
    assert [type(h) for h in hooks.arrival] == [SampleForking]  # (activates on n > 1 only)
    assert [type(h) for h in hooks.coast] == [Coaster]
    timing.run([RequestSpec(f"r{i}", 0.01 * i, 32, 8) for i in range(8)])
    assert hooks.step_done == hooks.end == []  # no request had samples: nothing per step
    functional = EngineLoop(Engine(EngineArgs(dtype="float64", admission_max_waiting=8)),
                            record_steps=True).hooks
    assert [type(h) for h in functional.arrival] == [SampleForking, BeamRounds, Admission]
    assert functional.coast == [] and len(functional.dispatch) == 1
    parallel = EngineLoop(Engine(EngineArgs(mode="timing", data_parallel_size=2,
                                            pipeline_parallel_size=2))).hooks
    assert isinstance(parallel.router, ReplicaRouter)
    assert isinstance(parallel.pricer, StagePricer) and parallel.coast == []
    spec = EngineLoop(Engine(EngineArgs(mode="timing", speculative_config={
        "method": "ngram", "num_speculative_tokens": 2, "acceptance_rate": 0.5}))).hooks
    assert [type(h) for h in spec.step_done] == [SpeculationObserver] and spec.coast == []


def test_request_level_hooks_register_on_their_first_request_in_rank_order():
    engine = Engine(EngineArgs(dtype="float64", max_model_len=32))
    beam = BeamSearchParams(beam_width=2, max_tokens=4).sampling_params()
    sampled = dataclasses.replace(SAMPLED, n=2, max_tokens=4)
    # the sampled request arrives first, yet beam rounds (rank 1) run before forks (rank 2)
    reqs, loop = _run(engine, [sampled, beam, GREEDY], PROMPTS[:3])
    assert [type(h) for h in loop.hooks.step_done] == [BeamRounds, SampleForking]
    assert [type(h) for h in loop.hooks.idle] == [BeamRounds] == [type(h) for h in
                                                                  loop.hooks.abort]
    assert all(r.status is Status.FINISHED for r in reqs) and len(reqs) == 4
    _assert_all_kv_freed(loop)


def test_schedulers_have_the_capabilities_the_hooks_check():
    engine = Engine(EngineArgs(mode="timing"))
    continuous = EngineLoop(engine).lanes[0].scheduler
    assert isinstance(continuous, ContinuousScheduler)
    assert isinstance(continuous, JoinableScheduler) and isinstance(continuous,
                                                                    CoastableScheduler)
    static = EngineLoop(Engine(EngineArgs(mode="timing", scheduler="static"))).lanes[0].scheduler
    assert isinstance(static, StaticScheduler)
    assert not isinstance(static, JoinableScheduler)
    assert not isinstance(static, CoastableScheduler)
    assert static.num_waiting == 0 and static.num_preemptions == 0


def test_speculation_on_several_lanes_is_refused_naming_both_settings():
    engine = Engine(EngineArgs(mode="timing", speculative_config={
        "method": "ngram", "num_speculative_tokens": 2, "acceptance_rate": 0.5}))
    # (the speculation component refuses parallel plans first; the loop guards the joint too)
    engine.plan = ParallelPlan.from_args(data_parallel_size=2)
    with pytest.raises(ConfigError, match="speculative_config.*data_parallel_size=2"):
        EngineLoop(engine)


# ---------------------------------------------------------------------- lanes
def test_pipeline_lanes_get_a_share_of_the_pool_without_copying_the_engine():
    engine = Engine(EngineArgs(mode="timing", model="meta-llama/Llama-2-13b-hf",
                               tensor_parallel_size=2, pipeline_parallel_size=2,
                               data_parallel_size=2, num_gpu_blocks_override=101,
                               max_model_len=1024))
    lanes = build_lanes(engine)
    assert [(lane.index, lane.replica) for lane in lanes] == [(0, 0), (1, 0), (2, 1), (3, 1)]
    assert {lane.kv.pool.num_blocks for lane in lanes} == {50}  # type: ignore[attr-defined]
    assert len({id(lane.scheduler) for lane in lanes}) == 4
    assert engine.num_kv_blocks == 101 and engine.num_kv_tokens == 101 * 16  # untouched


# ---------------------------------------------------------------------- n > 1, tight pool
@pytest.mark.parametrize("n", [2, 4])
def test_samples_under_a_tight_pool_end_equal_their_seeded_runs_and_free_all_kv(n):
    reqs, loop = _run(Engine(EngineArgs(dtype="float64", **TIGHT)),
                      dataclasses.replace(SAMPLED, n=n))
    assert len(reqs) == n * len(PROMPTS)
    assert all(r.status is Status.FINISHED for r in reqs), {r.reject_reason for r in reqs}
    assert loop.stats.num_preemptions > 0  # the pool really is tight
    _assert_all_kv_freed(loop)
    by_id = _by_id(reqs)
    for i, prompt in enumerate(PROMPTS):
        for s in range(n):  # sample s equals the n=1 run with seed + s
            (alone,), _ = _run(Engine(EngineArgs(dtype="float64", **TIGHT)),
                               sample_params(dataclasses.replace(SAMPLED, n=n), s), [prompt])
            sample = by_id[str(i) if s == 0 else f"{s}_{i}"]
            assert sample.output_token_ids == alone.output_token_ids
            assert len(sample.output_token_ids) == min(12, 16 - len(prompt))
    assert len({tuple(by_id[f"{s}_0"].output_token_ids) for s in range(1, n)}) == n - 1


@pytest.mark.parametrize("n", [2, 4])
def test_greedy_samples_under_a_tight_pool_equal_greedy_decoding(n):
    reqs, loop = _run(Engine(EngineArgs(dtype="float64", **TIGHT)),
                      dataclasses.replace(GREEDY, n=n))
    greedy, _ = _run(Engine(EngineArgs(dtype="float64", **TIGHT)), GREEDY)
    by_id = _by_id(reqs)
    for i, one in enumerate(greedy):
        assert one.status is Status.FINISHED
        for s in range(n):
            sample = by_id[str(i) if s == 0 else f"{s}_{i}"]
            assert sample.status is Status.FINISHED
            assert sample.output_token_ids == one.output_token_ids
    _assert_all_kv_freed(loop)


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("blocks", [4, 6, 64])
def test_timing_samples_under_a_tight_pool_end_and_coasting_stays_exact(n, blocks):
    def run(coast: bool):
        engine = Engine(EngineArgs(mode="timing", **{**TIGHT, "num_gpu_blocks_override": blocks}))
        engine.coast_enabled = coast
        reqs, loop = _run(engine, dataclasses.replace(GREEDY, n=n))
        _assert_all_kv_freed(loop)
        return reqs, loop

    reqs, loop = run(True)
    assert len(reqs) == n * len(PROMPTS)
    for req in reqs:
        assert req.status is Status.FINISHED, req.reject_reason
        assert req.num_output_tokens == min(12, 16 - req.num_prompt_tokens)
    # forked samples share the prompt: it is computed once plus its last token per extra sample
    # (more only when a preempted sample recomputes)
    assert loop.stats.num_tokens_computed >= sum(LENGTHS) + (n - 1) * len(LENGTHS)
    if blocks == 64:
        assert loop.stats.num_preemptions == 0
        assert loop.stats.num_tokens_computed == (sum(LENGTHS) + (n - 1) * len(LENGTHS)
                                                  + sum(r.num_output_tokens - 1 for r in reqs))
    stepwise, stepwise_loop = run(False)
    assert ([(r.request_id, r.token_times_s) for r in reqs]
            == [(r.request_id, r.token_times_s) for r in stepwise])
    assert loop.stats == stepwise_loop.stats
    assert loop.steps is not None and stepwise_loop.steps is not None
    assert loop.steps.rows == stepwise_loop.steps.rows


def test_samples_reserve_their_seats_and_more_samples_than_seats_are_refused():
    # the sampled prompt runs beside one plain request only: its 3 samples need 3 of the 4
    # seats once they fork, so the other plain requests wait instead of overfilling the batch
    engine = Engine(EngineArgs(dtype="float64", max_model_len=32, max_num_seqs=4))
    reqs, loop = _run(engine, [dataclasses.replace(GREEDY, n=3), GREEDY, GREEDY, GREEDY])
    assert loop.steps is not None
    cols = loop.steps.columns()
    assert cols["num_seqs"].max() == 4 and cols["num_seqs"][0] == 2
    assert all(r.status is Status.FINISHED for r in reqs) and len(reqs) == 6
    (refused, *samples), _ = _run(engine, dataclasses.replace(GREEDY, n=5), PROMPTS[:1])
    assert refused.reject_reason is not None
    assert "n=5 > max_num_seqs=4" in refused.reject_reason
    assert [s.reject_reason for s in samples] == [refused.reject_reason] * 4
    # static batching forms batches of queued requests: the samples compute their own prompts
    static = Engine(EngineArgs(dtype="float64", max_model_len=32, max_num_seqs=2,
                               scheduler="static"))
    reqs, loop = _run(static, dataclasses.replace(GREEDY, n=3), PROMPTS[:1])
    assert all(r.status is Status.FINISHED for r in reqs) and len(reqs) == 3
    assert loop.stats.num_tokens_computed == 3 * LENGTHS[0] + 3 * 11


# ---------------------------------------------------------------------- beams, tight pool
@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_beam_search_under_a_tight_pool_gives_the_reference_beams_and_frees_all_kv(mode):
    # a 2-beam search of up to 12 tokens needs 6 of the 8 blocks: searches take turns, and a
    # beam preempted by the plain request restarts its search
    engine = Engine(EngineArgs(dtype="float64", num_gpu_blocks_override=8, block_size=4,
                               max_model_len=16, preemption_mode=mode, swap_space=1))
    beam = BeamSearchParams(beam_width=2, max_tokens=7).sampling_params()
    reqs, loop = _run(engine, [beam, GREEDY, beam, beam], PROMPTS)
    assert loop.stats.num_preemptions > 0
    _assert_all_kv_freed(loop)
    by_id = _by_id(reqs)
    model = engine.functional_model
    for i, prompt in enumerate(PROMPTS):
        req = by_id[str(i)]
        assert req.status is Status.FINISHED, req.reject_reason
        if i == 1:
            continue
        ref = reference_beam_search(model, prompt, 2, 7, max_model_len=16)
        assert req.beam.result is not None
        assert [b.tokens for b in req.beam.result] == [b.tokens for b in ref]
        np.testing.assert_allclose([b.cum_logprob for b in req.beam.result],
                                   [b.cum_logprob for b in ref], atol=1e-9)
