"""The engine's event loop: requests in, a discrete-event simulation over lanes, results out.

One loop drives every parallel layout (DESIGN.md "one-way data flow"). A *lane* is a scheduler
with its KV manager (`sim.engine.lanes.Lane`): dp = pp = 1 is one lane, data parallelism gives a
lane per replica, pipeline parallelism pp lanes (virtual engines) per replica. At each dispatch a
lane's scheduler plans a step from committed state, the replica's executor computes it (real
tokens, or none in timing mode), the cost model prices its shape (with pp > 1 through the
replica's stage FIFO, `sim.engine.lanes.StageClock`), and a `StepDone` event at the step's end
commits the results. Arrivals stream in lazily from any iterable (a million-request workload
never sits in memory); with several lanes the router picks the replica.

Every lane gets every feature: admission control at arrival (one `AdmissionControl` for the
engine: its token bucket is the front end's; the queue limit and the TTFT prediction look at the
queue and step in flight of the lane the request was routed to), `n > 1` forks (the samples join
their leader's lane and fork its KV), beam search (a `BeamSearch` hook per lane: beams stay in
their lane), per-step series (rows labelled by lane) and, with pp = 1, timing-only coasting.
Coasting stops before the next event of *any* lane, which keeps it exactly equivalent to
step-by-step dispatch; with pp > 1 it is off (a coasted stretch would have to reserve the
replica's stages step by step, which is what the step path does). Speculative decoding is
single-lane only (`speculative.decoding` refuses parallel plans).

A request that can never run is rejected with a reason when it arrives; if a lane stalls with
nothing running anywhere and nothing left to arrive, its remaining requests are rejected with a
reason rather than retried forever.

References: vLLM `vllm/v1/engine/core.py` (step loop), vLLM v0 `vllm/engine/llm_engine.py`
(virtual engines) and `vllm/v1/engine/core_client.py` (data-parallel engines); Vidur (Agrawal et
al., MLSys'24) for the simulated-clock serving loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from cache.beam_search import BeamSearch
from cache.parallel_sampling import start_forks
from parallel.data import ROUTERS, PrefixAffinityRouter
from sim.core.errors import ConfigError
from sim.core.events import ARRIVAL, DISPATCH, STEP_DONE, EventLoop
from sim.core.request import Request, reject
from sim.core.step import StepPlan
from sim.engine.build import build_executor
from sim.engine.coasting import coast_decodes
from sim.engine.lanes import Lane, ParallelStats, StageClock, make_lanes
from sim.engine.records import SimulationResult, StepStats, record_step, request_times
from sim.metrics.collector import MetricsCollector
from sim.metrics.step_series import StepSeries
from sim.workload.specs import RequestSpec

if TYPE_CHECKING:
    from sim.engine.engine import Engine

STALLED = ("stalled: nothing was running and the request still could not be scheduled within "
           "the engine's limits")


def run_engine(engine: Engine, requests: Iterable[Request | RequestSpec],
               keep_requests: bool = True, on_finish: Callable[[Request], None] | None = None,
               record_steps: bool = False) -> SimulationResult:
    """Simulate `requests` (sorted by arrival) to completion on `engine`'s lanes (`Engine.run`)."""
    wall_start = time.perf_counter()
    args, cost = engine.args, engine.cost_model
    dp, pp = engine.plan.dp, engine.plan.pp
    functional = args.mode == "functional"
    lanes = make_lanes(engine)
    executors = [build_executor(engine, lanes[r * pp].kv) for r in range(dp)]
    speculation = engine.speculation
    if functional and speculation is None:
        for lane in lanes:  # beam-search rounds per lane: beams fork within their lane
            lane.beams = BeamSearch(lane.scheduler, lane.kv, executors[lane.replica].release,
                                    not engine.sharded)
    multi = len(lanes) > 1
    router = ROUTERS[args.data_parallel_router](dp) if multi else None
    info = ParallelStats(dp, pp, [0] * dp, [[0.0] * pp for _ in range(dp)],
                         router=args.data_parallel_router)
    stages = StageClock(cost, info) if pp > 1 else None
    # timing-only: run certain plain-decode stretches without a plan per step
    coast = (engine.coast_enabled and not functional and stages is None
             and hasattr(lanes[0].scheduler, "coast_horizon") and speculation is None)
    admission = engine.admission_control()
    share_forks = not (engine.sharded and functional)  # per-GPU stores cannot share
    metrics, stats, loop = MetricsCollector(), StepStats(), EventLoop()
    steps = StepSeries() if record_steps else None
    kept: list[Request] = []
    source = iter(requests)
    index = 0
    last_arrival_s = 0.0

    def next_arrival() -> None:
        nonlocal index, last_arrival_s
        item = next(source, None)
        if item is None:
            return
        req = item if isinstance(item, Request) else engine.request_from_spec(item, index)
        index += 1
        if not req.arrival_s >= last_arrival_s:
            raise ConfigError(
                f"request {req.request_id} arrives at {req.arrival_s} s, before the previous "
                f"one ({last_arrival_s} s); sort the workload by arrival time"
            )
        last_arrival_s = req.arrival_s
        loop.schedule(req.arrival_s, ARRIVAL, req)

    def ended(lane: Lane, req: Request) -> None:
        lane.outstanding -= 1
        metrics.record(request_times(req))
        executors[lane.replica].release(req)
        if keep_requests:
            kept.append(req)
        if on_finish is not None:
            on_finish(req)
        for child in req.forks:  # samples of a request that never ran share its fate
            reject(child, req.reject_reason or "its first sample never ran")
            ended(lane, child)
        req.forks = []

    def dispatch_soon(lane: Lane, now_s: float) -> None:
        if not lane.pending:
            lane.pending = True
            loop.schedule(now_s, DISPATCH, lane.index)

    def route(req: Request) -> Lane:
        """The lane a new request joins (the router's replica, its least-loaded lane)."""
        if router is None:
            return lanes[0]
        per_replica = [sum(lanes[r * pp + v].outstanding for v in range(pp)) for r in range(dp)]
        r = router.route(req, per_replica)
        info.requests_per_replica[r] += 1
        return min(lanes[r * pp:(r + 1) * pp], key=lambda x: x.outstanding)

    def price(lane: Lane, plan: StepPlan, now_s: float) -> float:
        """End time of `lane`'s step dispatched at `now_s` (with pp > 1: stages reserved)."""
        if stages is None:
            step_s = engine._price(plan, stats)
            info.stage_busy_s[lane.replica][0] += step_s
            return now_s + (step_s + engine._swap_s(plan, stats))
        shape = plan.shape
        stats.num_steps += 1
        stats.num_tokens_computed += plan.num_new_tokens
        stats.num_tokens_priced += shape.total_new_tokens
        end_s = stages.run(lane.replica, plan, now_s)
        stats.busy_s += end_s - now_s
        return end_s + engine._swap_s(plan, stats)

    def step_done(lane: Lane, plan: StepPlan, result: Any, now_s: float) -> None:
        if speculation is not None:
            speculation.observe(plan, result)
        if lane.beams is not None:  # beam search rounds: fork, drop, choose tokens
            plan, result, searched = lane.beams.step_done(plan, result, now_s)
            for req in searched:
                ended(lane, req)
        # n > 1: the other samples fork the prompt KV and join the leader's lane
        for req, reason in start_forks(plan, lane.scheduler, lane.kv, share=share_forks):
            reject(req, reason)
            ended(lane, req)
        for req in lane.scheduler.update(plan, result, now_s):
            ended(lane, req)

    def dispatch(lane: Lane, now_s: float) -> None:
        scheduler = lane.scheduler
        plan = scheduler.schedule(now_s)
        if plan is None and lane.beams is not None and lane.beams.restart_preempted():
            dispatch_soon(lane, now_s)  # a search restarted: its prompt can run now
            return
        if plan is None:
            wake_s = engine._wakeup_s(scheduler, now_s)
            if wake_s is not None:
                loop.schedule(wake_s, DISPATCH, lane.index)
            elif scheduler.has_work() and not loop and not any(x.busy for x in lanes):
                aborted = scheduler.abort_all("stalled")
                for req in aborted:
                    reject(req, STALLED)
                for req in aborted if lane.beams is None else lane.beams.surface(aborted):
                    ended(lane, req)
            return
        lane.busy = True
        info.first_dispatch_s = min(info.first_dispatch_s, now_s)
        end_s = price(lane, plan, now_s)
        if steps is not None:
            record_step(steps, plan, now_s, end_s, scheduler, lane.kv, lane.index)
        result = executors[lane.replica].run(plan)
        lane.busy_until_s = end_s
        loop.schedule(end_s, STEP_DONE, (lane.index, plan, result))

    next_arrival()
    while loop:
        event = loop.pop()
        now_s = event.time_s
        if event.priority == STEP_DONE:
            i, plan, result = event.payload
            lane = lanes[i]
            if plan is not None:  # None: the last coasted step completes
                step_done(lane, plan, result, now_s)
            info.last_done_s = max(info.last_done_s, now_s)
            if coast:
                end_s = coast_decodes(cost, lane.scheduler, now_s, loop.peek_time_s(), stats,
                                      steps, lane.index, info.stage_busy_s[lane.replica])
                if end_s > now_s:  # busy until the last coasted step completes
                    lane.busy_until_s = end_s
                    loop.schedule(end_s, STEP_DONE, (i, None, None))
                    continue
            lane.busy = False
            dispatch_soon(lane, now_s)
        elif event.priority == ARRIVAL:
            req = event.payload
            lane = route(req)
            lane.outstanding += 1 + len(req.forks)
            reason = None
            if req.beam is not None and lane.beams is not None:
                reason = lane.beams.check(req)
            if reason is None and admission.active:
                reason = admission.check(req, now_s, getattr(lane.scheduler, "waiting", ()),
                                         lane.busy_until_s)
            if reason is None:
                reason = lane.scheduler.add(req)
            if reason is not None:
                reject(req, reason)
                ended(lane, req)
            next_arrival()
            if not lane.busy:
                dispatch_soon(lane, now_s)
        else:
            lane = lanes[event.payload]
            lane.pending = False
            if not lane.busy:
                dispatch(lane, now_s)
    stats.num_preemptions = sum(getattr(x.scheduler, "num_preemptions", 0) for x in lanes)
    if multi:
        if isinstance(router, PrefixAffinityRouter):
            info.router_info = {"num_affine": router.num_affine,
                                "num_spilled": router.num_spilled}
        engine.parallel_stats = info
    return SimulationResult(metrics.summary(), metrics, kept, stats,
                            time.perf_counter() - wall_start, engine.description, steps,
                            None if speculation is None else speculation.summary())
