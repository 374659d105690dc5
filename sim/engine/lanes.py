"""Lanes for data and pipeline parallelism: many schedulers on the engine's one clock.

A run with `dp` replicas and `pp` pipeline stages has dp x pp *lanes*, each a scheduler with its
own KV manager (vLLM's pipeline engine gives each of its pp "virtual engines" 1/pp of the KV
blocks); dp = pp = 1 is one lane, the plain engine. Lanes are built from explicit arguments
(`build_lane`: the engine's settings, the lane's index and replica, its share of the pool).

Two of the loop's hooks (`sim.engine.hooks`) live here, one of each chosen when a run is built:

- routing: `OneLane` (dp = pp = 1) or `ReplicaRouter`: at an arrival the router
  (`parallel.data.ROUTERS`) picks a replica from the requests each one has outstanding at that
  instant, and within the replica the virtual engine with the fewest unfinished requests takes
  it (vLLM's rule);
- pricing: `StepPricer` (pp = 1: a step holds its replica from dispatch for its priced time) or
  `StagePricer`: each lane has at most one micro-batch in flight; a micro-batch occupies stage
  0, then stage 1, ... of its replica (FIFO per stage, `StageClock`), each for
  `ParallelCostModel.stage_times_s`, with a send/recv between stages. So up to pp micro-batches
  of one replica are in flight at once, on different stages, and when fewer are ready the
  stages idle: the pipeline *bubble*, measured per stage as `1 - busy / makespan`
  (`ParallelStats`).

The event loop itself is the engine's (`sim.engine.loop`): it drives every lane, so admission
control, coasting (pp = 1), per-step series, `n > 1` forks and beam search work for every layout.

References: vLLM v0 `vllm/engine/llm_engine.py` (virtual engines for pipeline parallelism) and
`vllm/v1/engine/core_client.py` (data-parallel engines); Huang et al. 2019 (GPipe bubble).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from parallel.data import ROUTERS, PrefixAffinityRouter
from sim.core.events import Dispatch
from sim.core.protocols import KVCacheManager, Pricer, Scheduler
from sim.core.request import Request
from sim.core.step import StepPlan
from sim.engine.build import build_kv_manager, build_scheduler
from sim.engine.records import StepStats

if TYPE_CHECKING:
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

    @classmethod
    def empty(cls, num_replicas: int, num_stages: int, router: str = "") -> ParallelStats:
        return cls(num_replicas, num_stages, [0] * num_replicas,
                   [[0.0] * num_stages for _ in range(num_replicas)], router=router)

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


@dataclass(eq=False)
class Lane:
    """One scheduler + KV manager on the engine's clock (index = replica * pp + virtual engine)."""

    index: int
    replica: int
    scheduler: Scheduler
    kv: KVCacheManager
    busy: bool = False  # a micro-batch (or a coasted stretch) in flight
    pending: bool = False  # a dispatch is scheduled
    outstanding: int = 0  # unfinished requests (samples count one each)
    busy_until_s: float = 0.0  # end of the step in flight
    #: its steps' counters (per lane, so each sum runs in the lane's own step order whatever
    #: the other lanes do; `StepStats.merged` adds them up in lane order)
    stats: StepStats = field(default_factory=StepStats)
    # its dispatch event (immutable, so made once)
    dispatch: Dispatch = field(init=False)

    def __post_init__(self) -> None:
        self.dispatch = Dispatch(self.index)


def build_lane(engine: Engine, index: int, replica: int, num_kv_blocks: int | None) -> Lane:
    """Lane `index` of replica `replica`: a KV manager over `num_kv_blocks` blocks (None: the
    engine's whole pool) and the engine's scheduler over it."""
    kv = build_kv_manager(engine, num_kv_blocks)
    return Lane(index, replica, build_scheduler(engine, kv), kv)


def build_lanes(engine: Engine) -> list[Lane]:
    """dp x pp lanes, each with a 1/pp share of the KV pool (one lane: the whole pool)."""
    dp, pp = engine.plan.dp, engine.plan.pp
    # a pipeline lane's share of the pool (vLLM's virtual engines); no pool without a KV cache
    num_kv_blocks = None if pp == 1 or engine.args.kv_cache == "none" else engine.num_kv_blocks // pp
    return [build_lane(engine, r * pp + v, r, num_kv_blocks) for r in range(dp) for v in range(pp)]


# ---------------------------------------------------------------------- routing
class OneLane:
    """dp = pp = 1: every request joins the one lane."""

    def __init__(self, lane: Lane) -> None:
        self.lane = lane

    def route(self, request: Request) -> Lane:
        return self.lane

    def parallel_stats(self) -> ParallelStats | None:
        return None


class ReplicaRouter:
    """dp x pp lanes: the data-parallel router picks the replica, then the replica's least
    loaded virtual engine takes the request (see the module doc)."""

    def __init__(self, lanes: list[Lane], num_stages: int, router: str,
                 info: ParallelStats) -> None:
        self.lanes, self.pp, self.info = lanes, num_stages, info
        self.num_replicas = len(lanes) // num_stages
        self.router = ROUTERS[router](self.num_replicas)

    def route(self, request: Request) -> Lane:
        lanes, pp = self.lanes, self.pp
        per_replica = [sum(lanes[r * pp + v].outstanding for v in range(pp))
                       for r in range(self.num_replicas)]
        r = self.router.route(request, per_replica)
        self.info.requests_per_replica[r] += 1
        return min(lanes[r * pp:(r + 1) * pp], key=lambda x: x.outstanding)

    def parallel_stats(self) -> ParallelStats:
        if isinstance(self.router, PrefixAffinityRouter):
            self.info.router_info = {"num_affine": self.router.num_affine,
                                     "num_spilled": self.router.num_spilled}
        return self.info


# ---------------------------------------------------------------------- pricing
class StageClock:
    """The pp stages of each replica, each a FIFO resource: when a micro-batch dispatched now
    completes, with its stages reserved and their busy time counted in `ParallelStats`."""

    def __init__(self, cost_model: Pricer, info: ParallelStats) -> None:
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


class StepPricer:
    """pp = 1: a step holds its replica from dispatch for its priced time, then its KV moves
    (swaps, copy-on-write copies)."""

    def __init__(self, engine: Engine, info: ParallelStats) -> None:
        self.engine, self.info = engine, info

    def price(self, lane: Lane, plan: StepPlan, now_s: float) -> float:
        """End time of `lane`'s step `plan` dispatched at `now_s`."""
        charge = self.engine.price(plan)
        lane.stats.charge(plan, charge)
        self.info.stage_busy_s[lane.replica][0] += charge.busy_s
        return now_s + (charge.busy_s + charge.kv_move_s)


class StagePricer:
    """pp > 1: a micro-batch passes its replica's stages in order (`StageClock`)."""

    def __init__(self, engine: Engine, info: ParallelStats) -> None:
        self.engine = engine
        self.stages = StageClock(engine.cost_model, info)

    def price(self, lane: Lane, plan: StepPlan, now_s: float) -> float:
        """End time of `lane`'s micro-batch `plan` dispatched at `now_s` (stages reserved)."""
        end_s = self.stages.run(lane.replica, plan, now_s)
        charge = self.engine.charge(plan, end_s - now_s)
        lane.stats.charge(plan, charge)
        return end_s + charge.kv_move_s
