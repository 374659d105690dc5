"""The engine's event loop (`sim.engine.loop`) with its typed events and hooks.

- the clock's tie rule `(time_s, priority, seq)`: completions, then arrivals, then dispatches;
- a feature that is off registers no hook; request-level hooks register on their first request,
  in rank order; capabilities are Protocols the schedulers satisfy;
- lanes are built from explicit arguments (a 1/pp share of the pool, the engine untouched).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from batching.continuous import ContinuousScheduler
from batching.static import StaticScheduler
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
