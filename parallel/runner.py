"""The engine loop for data and pipeline parallelism: many schedulers, one simulated clock.

A run with `dp` replicas and `pp` pipeline stages has dp x pp *lanes*, each a scheduler with its
own KV manager (vLLM's pipeline engine gives each of its pp "virtual engines" 1/pp of the KV
blocks). At an arrival the router (`parallel.data.ROUTERS`) picks a replica from the requests
each one has outstanding at that instant, and within the replica the virtual engine with the
fewest unfinished requests takes it (vLLM's rule). Each lane has at most one micro-batch in
flight; a micro-batch occupies stage 0, then stage 1, ... of its replica (FIFO per stage), each
for `ParallelCostModel.stage_times_s`, with a send/recv between stages. So up to pp micro-batches
of one replica are in flight at once, on different stages, and when fewer are ready the stages
idle: the pipeline *bubble*, measured per stage as `1 - busy / makespan` (`ParallelStats`).

Steps are committed when their last stage finishes (DESIGN.md rule 3), the functional executor
computes each micro-batch's tokens as the single-engine loop does, and same seed gives the same
run. Not used by this loop: the timing-only coasting fast path, admission control and per-step
series (a single-replica engine has them).

References: vLLM v0 `vllm/engine/llm_engine.py` (virtual engines for pipeline parallelism) and
`vllm/v1/engine/core_client.py` (data-parallel engines); Huang et al. 2019 (GPipe bubble).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from parallel.data import ROUTERS, PrefixAffinityRouter
from sim.engine import Engine
from sim.errors import ConfigError
from sim.events import ARRIVAL, DISPATCH, STEP_DONE, EventLoop
from sim.metrics import MetricsCollector
from sim.request import Request
from sim.run_records import SimulationResult, StepStats, reject, request_times
from sim.workload import RequestSpec


@dataclass
class ParallelStats:
    """What the lanes did: requests per replica, stage busy time, the bubble."""

    num_replicas: int
    num_stages: int
    requests_per_replica: list[int]
    stage_busy_s: list[list[float]]  # [replica][stage]
    first_dispatch_s: float = float("inf")
    last_done_s: float = 0.0
    router: str = ""
    router_info: dict[str, int] = field(default_factory=dict)

    @property
    def makespan_s(self) -> float:
        return max(0.0, self.last_done_s - self.first_dispatch_s)

    def bubble_fraction(self) -> float:
        """Mean over all stages of the time they idled between the first dispatch and the
        last completion (0 = the pipeline never waited)."""
        span = self.makespan_s
        if span <= 0:
            return 0.0
        busy = [b for row in self.stage_busy_s for b in row]
        return 1.0 - sum(busy) / (len(busy) * span)


@dataclass
class _Lane:
    replica: int
    scheduler: Any
    kv: Any
    busy: bool = False
    pending: bool = False
    outstanding: int = 0


def run_parallel(engine: Engine, requests: Iterable[Request | RequestSpec],
                 keep_requests: bool = True,
                 on_finish: Callable[[Request], None] | None = None) -> SimulationResult:
    """Simulate `requests` on `engine.plan.dp` replicas of `engine.plan.pp` stages each."""
    wall_start = time.perf_counter()
    plan, args = engine.plan, engine.args
    dp, pp = plan.dp, plan.pp
    lane_engine = copy.copy(engine)  # same models; a 1/pp share of the KV pool per lane
    mem = engine.memory
    lane_engine.memory = replace(mem, num_kv_tokens=mem.num_kv_tokens // pp,
                                 num_kv_blocks=mem.num_kv_blocks // pp)
    for key in ("num_kv_blocks", "num_kv_tokens"):  # the engine's pool, when it keeps one
        if hasattr(engine, key):
            setattr(lane_engine, key, getattr(engine, key) // pp)
    lanes = []
    for r in range(dp):
        for _ in range(pp):
            kv = lane_engine._kv_manager()
            lanes.append(_Lane(r, lane_engine._scheduler(kv), kv))
    executors = [engine._executor(lanes[r * pp].kv.retains_kv, lanes[r * pp].kv)
                 for r in range(dp)]
    router = ROUTERS[args.data_parallel_router](dp)
    cost = engine.cost_model
    stage_times = getattr(cost, "stage_times_s", None) if pp > 1 else None
    info = ParallelStats(dp, pp, [0] * dp, [[0.0] * pp for _ in range(dp)],
                         router=args.data_parallel_router)
    stage_free_s = [[0.0] * pp for _ in range(dp)]
    metrics, stats, loop = MetricsCollector(), StepStats(), EventLoop()
    kept: list[Request] = []
    lane_of: dict[str, int] = {}
    source = iter(requests)
    counter = {"index": 0}
    last_arrival = [0.0]

    def next_arrival() -> None:
        item = next(source, None)
        if item is None:
            return
        index = counter["index"]
        req = item if isinstance(item, Request) else engine.request_from_spec(item, index)
        counter["index"] = index + 1
        if not req.arrival_s >= last_arrival[0]:
            raise ConfigError(f"request {req.request_id} arrives at {req.arrival_s} s, before "
                              f"the previous one ({last_arrival[0]} s); sort the workload")
        last_arrival[0] = req.arrival_s
        loop.schedule(req.arrival_s, ARRIVAL, req)

    def ended(req: Request) -> None:
        lane = lanes[lane_of.pop(req.request_id)]
        lane.outstanding -= 1
        metrics.record(request_times(req))
        executors[lane.replica].release(req)
        if keep_requests:
            kept.append(req)
        if on_finish is not None:
            on_finish(req)

    def dispatch_soon(i: int, now_s: float) -> None:
        if not lanes[i].pending:
            lanes[i].pending = True
            loop.schedule(now_s, DISPATCH, i)

    def price(i: int, step_plan: Any, now_s: float) -> float:
        """End time of lane i's micro-batch dispatched at now_s (reserving its stages)."""
        shape = step_plan.shape
        stats.num_steps += 1
        stats.num_tokens_computed += step_plan.num_new_tokens
        stats.num_tokens_priced += shape.total_new_tokens
        r = lanes[i].replica
        if stage_times is None:
            step_s = cost.step_time_s(shape.num_new_tokens, shape.num_context_tokens,
                                      shape.total_logits)
            info.stage_busy_s[r][0] += step_s
            stats.busy_s += step_s
            return now_s + step_s
        times = stage_times(shape)
        send_s = cost.send_recv_s(shape)
        t = now_s + cost.step_overhead_s  # CPU: scheduling and input preparation
        for s in range(pp):
            start = max(t, stage_free_s[r][s])
            stage_free_s[r][s] = start + times[s]
            info.stage_busy_s[r][s] += times[s]
            t = start + times[s] + (send_s if s < pp - 1 else 0.0)
        stats.busy_s += t - now_s
        return t

    next_arrival()
    while loop:
        event = loop.pop()
        now_s = event.time_s
        if event.priority == STEP_DONE:
            i, step_plan, result = event.payload
            for req in lanes[i].scheduler.update(step_plan, result, now_s):
                ended(req)
            lanes[i].busy = False
            info.last_done_s = max(info.last_done_s, now_s)
            dispatch_soon(i, now_s)
        elif event.priority == ARRIVAL:
            req = event.payload
            per_replica = [sum(lanes[r * pp + v].outstanding for v in range(pp))
                           for r in range(dp)]
            r = router.route(req, per_replica)
            i = min(range(r * pp, (r + 1) * pp), key=lambda j: lanes[j].outstanding)
            info.requests_per_replica[r] += 1
            lane_of[req.request_id] = i
            lanes[i].outstanding += 1
            reason = lanes[i].scheduler.add(req)
            if reason is not None:
                reject(req, reason)
                ended(req)
            next_arrival()
            if not lanes[i].busy:
                dispatch_soon(i, now_s)
        else:
            i = event.payload
            lane = lanes[i]
            lane.pending = False
            if lane.busy:
                continue
            step_plan = lane.scheduler.schedule(now_s)
            if step_plan is None:
                wake_s = engine._wakeup_s(lane.scheduler, now_s)
                if wake_s is not None:
                    loop.schedule(wake_s, DISPATCH, i)
                elif lane.scheduler.has_work() and not loop and not any(x.busy for x in lanes):
                    for req in lane.scheduler.abort_all("stalled"):
                        reject(req, "stalled: nothing was running and the request still could "
                               "not be scheduled within the engine's limits")
                        ended(req)
                continue
            lane.busy = True
            info.first_dispatch_s = min(info.first_dispatch_s, now_s)
            done_s = price(i, step_plan, now_s) + engine._swap_s(lane.kv, stats)
            result = executors[lane.replica].run(step_plan)
            loop.schedule(done_s, STEP_DONE, (i, step_plan, result))
    if isinstance(router, PrefixAffinityRouter):
        info.router_info = {"num_affine": router.num_affine, "num_spilled": router.num_spilled}
    stats.num_preemptions = sum(getattr(x.scheduler, "num_preemptions", 0) for x in lanes)
    engine.parallel_stats = info
    return SimulationResult(metrics.summary(), metrics, kept, stats,
                            time.perf_counter() - wall_start, engine.description)
