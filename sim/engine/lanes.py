"""Lanes for data and pipeline parallelism: many schedulers on the engine's one clock.

A run with `dp` replicas and `pp` pipeline stages has dp x pp *lanes*, each a scheduler with its
own KV manager (vLLM's pipeline engine gives each of its pp "virtual engines" 1/pp of the KV
blocks); dp = pp = 1 is one lane, the plain engine. At an arrival the router
(`parallel.data.ROUTERS`) picks a replica from the requests each one has outstanding at that
instant, and within the replica the virtual engine with the fewest unfinished requests takes it
(vLLM's rule). Each lane has at most one micro-batch in flight; a micro-batch occupies stage 0,
then stage 1, ... of its replica (FIFO per stage, `StageClock`), each for
`ParallelCostModel.stage_times_s`, with a send/recv between stages. So up to pp micro-batches of
one replica are in flight at once, on different stages, and when fewer are ready the stages
idle: the pipeline *bubble*, measured per stage as `1 - busy / makespan` (`ParallelStats`).

The event loop itself is the engine's (`sim.engine.loop`): it drives every lane, so admission
control, coasting (pp = 1), per-step series, `n > 1` forks and beam search work for every layout.

References: vLLM v0 `vllm/engine/llm_engine.py` (virtual engines for pipeline parallelism) and
`vllm/v1/engine/core_client.py` (data-parallel engines); Huang et al. 2019 (GPipe bubble).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from sim.core.step import StepPlan
from sim.engine.build import build_kv_manager

if TYPE_CHECKING:
    from cache.beam_search import BeamSearch
    from sim.engine.engine import Engine


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
class Lane:
    """One scheduler + KV manager on the engine's clock (index = replica * pp + virtual engine)."""

    index: int
    replica: int
    scheduler: Any
    kv: Any
    beams: BeamSearch | None = None  # the lane's beam-search hook (functional mode)
    busy: bool = False  # a micro-batch (or a coasted stretch) in flight
    pending: bool = False  # a dispatch is scheduled
    outstanding: int = 0  # unfinished requests (samples count one each)
    busy_until_s: float = 0.0  # end of the step in flight


def make_lanes(engine: Engine) -> list[Lane]:
    """dp x pp lanes, each with a 1/pp share of the KV pool (one lane: the engine's own)."""
    dp, pp = engine.plan.dp, engine.plan.pp
    lane_engine = engine
    if pp > 1:  # same models; a 1/pp share of the KV pool per lane
        lane_engine = copy.copy(engine)
        mem = engine.memory
        lane_engine.memory = replace(mem, num_kv_tokens=mem.num_kv_tokens // pp,
                                     num_kv_blocks=mem.num_kv_blocks // pp)
        for key in ("num_kv_blocks", "num_kv_tokens"):  # the engine's pool, when it keeps one
            if hasattr(engine, key):
                setattr(lane_engine, key, getattr(engine, key) // pp)
    lanes: list[Lane] = []
    for r in range(dp):
        for _ in range(pp):
            kv = build_kv_manager(lane_engine)
            lanes.append(Lane(len(lanes), r, lane_engine._scheduler(kv), kv))
    return lanes


class StageClock:
    """The pp stages of each replica, each a FIFO resource: when a micro-batch dispatched now
    completes, with its stages reserved and their busy time counted in `ParallelStats`."""

    def __init__(self, cost_model: Any, info: ParallelStats) -> None:
        self.cost = cost_model
        self.info = info
        self.stage_free_s = [[0.0] * info.num_stages for _ in range(info.num_replicas)]

    def run(self, replica: int, plan: StepPlan, now_s: float) -> float:
        """End time of `plan` on `replica` dispatched at `now_s` (its stages reserved)."""
        cost, pp = self.cost, self.info.num_stages
        shape = plan.shape
        times = cost.stage_times_s(shape)
        send_s = cost.send_recv_s(shape)
        free, busy = self.stage_free_s[replica], self.info.stage_busy_s[replica]
        t = now_s + cost.step_overhead_s  # CPU: scheduling and input preparation
        for s in range(pp):
            start = max(t, free[s])
            free[s] = start + times[s]
            busy[s] += times[s]
            t = start + times[s] + (send_s if s < pp - 1 else 0.0)
        return t
