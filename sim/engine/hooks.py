"""The event loop's hooks: what each optional feature adds to a run, at fixed points.

The loop (`sim.engine.loop.EngineLoop`) handles four typed events (`sim.core.events`) and calls
the hooks registered for a run at these points, in this order:

- `Arrival(request)`: (1) the `LaneRouter` picks the lane (`OneLane`, or the data-parallel
  router and the replica's least loaded virtual engine); (2) every `ArrivalHook`, in order:
  `n > 1` samples (their seats), beam search (can the search ever complete here), admission
  control (load shedding); the first reason rejects the request; (3) the lane's scheduler
  `add`s it (or gives its own reason).
- `Dispatch(lane)`, the lane idle: its scheduler plans a step. A plan: the `LanePricer` gives
  its end time (`StepPricer`, or `StagePricer` through the pipeline stages), every
  `DispatchHook` sees it (the per-step series), the replica's executor computes it and a
  `StepDone` is due at its end. No plan: every `IdleHook` (beam search restarting a preempted
  search) may make work runnable at once; else the scheduler's wakeup time, or, with nothing in
  flight on any lane and nothing left to arrive, a stall: the lane's requests are aborted, each
  `AbortHook` (beam search: an aborted search is reported once, on its submitted request) sees
  them, and they end rejected.
- `StepDone(lane, plan, result)`: (1) every `StepDoneHook` by rank: speculation's observation
  (0), beam-search rounds (1; it rewrites what is committed), `n > 1` forks (2); each may end
  requests; (2) the scheduler commits the step; (3) the lane is free: a `CoastHook`
  (timing-only coasting) may keep it busy until a `CoastDone`, else a `Dispatch` is due now.
- `CoastDone(lane)`: step (3) again.
- whenever a request ends: metrics, the executor's release, the caller's callbacks, then every
  `EndHook` (`n > 1`: the samples of a request that never ran end with it).

A feature that is off registers no hook, so the plain path pays nothing for it. Engine-level
features (admission control, speculation, coasting, the step series, lanes) are known when the
run is built; the request-level ones (`n > 1` samples, beam search) register their arrival hook
then and their other hooks when the first request that uses them arrives.

Capabilities are Protocols (`sim.core.protocols`) checked once, in `build_hooks`: coasting needs
a `CoastableScheduler` on every lane, beam search a `JoinableScheduler`, shared samples a
`ForkableKV` and a `JoinableScheduler`; an unsupported combination of settings is a
`ConfigError` naming both.

References: vLLM v1 `vllm/v1/engine/core.py` (the step loop these points sit in); the
observer/plug-in structure of discrete-event simulators (SimPy processes, Vidur's schedulers).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Protocol

from batching.admission import AdmissionControl
from cache.beam_search import BeamSearch
from cache.parallel_sampling import SampleForks
from sim.core.errors import ConfigError
from sim.core.events import CoastDone, StepDone
from sim.core.protocols import CoastableScheduler, Executor, JoinableScheduler
from sim.core.request import Request, reject
from sim.core.step import StepPlan
from sim.engine.coasting import Coaster
from sim.engine.lanes import (
    Lane,
    OneLane,
    ParallelStats,
    ReplicaRouter,
    StagePricer,
    StepPricer,
)
from sim.engine.records import record_step
from sim.metrics.step_series import StepSeries

if TYPE_CHECKING:
    from sim.engine.engine import Engine
    from speculative.decoding import Speculation


# ---------------------------------------------------------------------- the hook points
class LaneRouter(Protocol):
    def route(self, request: Request) -> Lane:
        """The lane a new request joins."""
        ...

    def parallel_stats(self) -> ParallelStats | None:
        """What the lanes did (None with one lane)."""
        ...


class LanePricer(Protocol):
    def price(self, lane: Lane, plan: StepPlan, now_s: float) -> float:
        """End time of `lane`'s step `plan` dispatched at `now_s` (its costs counted)."""
        ...


class ArrivalHook(Protocol):
    def on_arrival(self, lane: Lane, request: Request, now_s: float) -> str | None:
        """Why `request`, routed to `lane`, is refused now; None lets it through."""
        ...


class DispatchHook(Protocol):
    def on_dispatch(self, lane: Lane, plan: StepPlan, start_s: float, end_s: float) -> None:
        """`lane` starts step `plan` at `start_s`; it ends at `end_s`."""
        ...


class StepDoneHook(Protocol):
    #: the order among step hooks (lower first), whatever the order they were registered in
    rank: ClassVar[int]

    def on_step_done(self, lane: Lane, done: StepDone, now_s: float
                     ) -> tuple[StepDone, list[Request]]:
        """Before the step is committed: the step to commit (`done`, or a rewritten one) and
        the requests that ended (rejected or finished by the hook)."""
        ...


class IdleHook(Protocol):
    def on_idle(self, lane: Lane, now_s: float) -> bool:
        """`lane` found nothing to run: whether the hook made work runnable now."""
        ...


class AbortHook(Protocol):
    def on_abort(self, lane: Lane, aborted: list[Request]) -> list[Request]:
        """The requests to report among those a stall aborted (already rejected)."""
        ...


class EndHook(Protocol):
    def on_end(self, lane: Lane, request: Request) -> list[Request]:
        """`request` ended: other requests that end with it (already rejected)."""
        ...


class CoastHook(Protocol):
    def coast(self, lane: Lane, now_s: float, next_event_s: float) -> CoastDone | None:
        """`lane` is free at `now_s`: the event (due at `lane.busy_until_s`) ending what the
        hook runs now, or None."""
        ...

    def done(self, lane: Lane, event: CoastDone) -> bool:
        """Whether `event` ends what `lane` runs (False: a stale event, ignored)."""
        ...

    def truncate(self, lane: Lane, now_s: float) -> CoastDone | None:
        """A request arrives for `lane`: cut what it runs to the steps started before now; the
        event ending what is left (to schedule), or None when that event stands or the lane
        is free."""
        ...


@dataclass
class Hooks:
    """The hooks of one run, per point (see the module doc for the order they run in)."""

    router: LaneRouter
    pricer: LanePricer
    arrival: list[ArrivalHook] = field(default_factory=list)
    dispatch: list[DispatchHook] = field(default_factory=list)
    step_done: list[StepDoneHook] = field(default_factory=list)
    idle: list[IdleHook] = field(default_factory=list)
    abort: list[AbortHook] = field(default_factory=list)
    end: list[EndHook] = field(default_factory=list)
    coast: list[CoastHook] = field(default_factory=list)

    def add_step_done(self, hook: StepDoneHook) -> None:
        """Register a step hook in its rank's place."""
        self.step_done.append(hook)
        self.step_done.sort(key=lambda h: h.rank)


# ---------------------------------------------------------------------- the features
class Admission:
    """Admission control (`batching.admission.AdmissionControl`): one for the engine, looking
    at the queue and step in flight of the lane the request was routed to."""

    def __init__(self, control: AdmissionControl) -> None:
        self.control = control

    def on_arrival(self, lane: Lane, request: Request, now_s: float) -> str | None:
        return self.control.check(request, now_s, lane.scheduler, lane.busy_until_s)


class SampleForking:
    """`n > 1` (`cache.parallel_sampling`): the samples join their leader's lane and fork its
    prompt KV when the leader's prompt is done (into the running batch); they end with a leader
    that never ran. A leader holds a seat per sample, so more samples than seats are refused."""

    rank: ClassVar[int] = 2

    def __init__(self, hooks: Hooks, lanes: list[Lane], share: bool) -> None:
        self.hooks = hooks
        self.forks = [SampleForks(lane.scheduler, lane.kv, share) for lane in lanes]  # [lane]
        self.active = False

    def on_arrival(self, lane: Lane, request: Request, now_s: float) -> str | None:
        if not request.forks:
            return None
        if not self.active:  # the first request with samples: forks may start from now on
            self.active = True
            self.hooks.add_step_done(self)
            self.hooks.end.append(self)
        return self.forks[lane.index].check(request)

    def on_step_done(self, lane: Lane, done: StepDone, now_s: float
                     ) -> tuple[StepDone, list[Request]]:
        refused = self.forks[lane.index].start(done.plan, now_s)
        for req, reason in refused:
            reject(req, reason)
        return done, [req for req, _ in refused]

    def on_end(self, lane: Lane, request: Request) -> list[Request]:
        children, request.forks = request.forks, []
        for child in children:  # samples of a request that never ran share its fate
            reject(child, request.reject_reason or "its first sample never ran")
        return children


class BeamRounds:
    """Beam search (`cache.beam_search`): a `BeamSearch` per lane, so beams fork within it."""

    rank: ClassVar[int] = 1

    def __init__(self, hooks: Hooks, searches: list[BeamSearch]) -> None:
        self.hooks = hooks
        self.searches = searches  # [lane]
        self.active = False

    def on_arrival(self, lane: Lane, request: Request, now_s: float) -> str | None:
        if request.beam is None:
            return None
        if not self.active:  # the first search: rounds, restarts and aborts from now on
            self.active = True
            self.hooks.add_step_done(self)
            self.hooks.idle.append(self)
            self.hooks.abort.append(self)
        return self.searches[lane.index].check(request)

    def on_step_done(self, lane: Lane, done: StepDone, now_s: float
                     ) -> tuple[StepDone, list[Request]]:
        plan, result, searched = self.searches[lane.index].step_done(done.plan, done.result,
                                                                     now_s)
        return StepDone(done.lane, plan, result), searched

    def on_idle(self, lane: Lane, now_s: float) -> bool:
        return bool(self.searches[lane.index].restart_preempted())

    def on_abort(self, lane: Lane, aborted: list[Request]) -> list[Request]:
        return list(self.searches[lane.index].surface(aborted))


class SpeculationObserver:
    """Speculative decoding: acceptance counts of every verified step (`Speculation.observe`)."""

    rank: ClassVar[int] = 0

    def __init__(self, speculation: Speculation) -> None:
        self.speculation = speculation

    def on_step_done(self, lane: Lane, done: StepDone, now_s: float
                     ) -> tuple[StepDone, list[Request]]:
        self.speculation.observe(done.plan, done.result)
        return done, []


class StepRecorder:
    """The per-step series (`record_steps=True`): a row per dispatched step, labelled by lane."""

    def __init__(self, steps: StepSeries) -> None:
        self.steps = steps

    def on_dispatch(self, lane: Lane, plan: StepPlan, start_s: float, end_s: float) -> None:
        record_step(self.steps, plan, start_s, end_s, lane.scheduler, lane.kv, lane.index)


# ---------------------------------------------------------------------- registration
def build_hooks(engine: Engine, lanes: list[Lane], executors: list[Executor],
                steps: StepSeries | None, info: ParallelStats) -> Hooks:
    """The hooks of one run of `engine` on `lanes` (`executors`: one per replica); the
    capabilities they need are checked here, once."""
    args, pp = engine.args, engine.plan.pp
    functional = args.mode == "functional"
    speculation = engine.speculation
    if speculation is not None and len(lanes) > 1:
        raise ConfigError(
            "speculative_config with data_parallel_size="
            f"{engine.plan.dp} and pipeline_parallel_size={pp}: speculative decoding runs on "
            "one lane; use data_parallel_size=1 and pipeline_parallel_size=1")
    router: LaneRouter = (OneLane(lanes[0]) if len(lanes) == 1 else
                          ReplicaRouter(lanes, pp, args.data_parallel_router, info))
    pricer: LanePricer = (StagePricer(engine, info) if pp > 1 else StepPricer(engine, info))
    hooks = Hooks(router, pricer)
    # samples share the prompt's blocks unless per-GPU stores (a sharded functional model)
    # or KV eviction (evicted positions differ per sample) keep them apart
    share = not (engine.sharded and functional) and args.kv_eviction is None
    hooks.arrival.append(SampleForking(hooks, lanes, share))
    joinable = [lane.scheduler for lane in lanes if isinstance(lane.scheduler, JoinableScheduler)]
    if functional and speculation is None and len(joinable) == len(lanes):
        # (timing-only runs and speculation refuse beam requests: `Engine.make_request`)
        searches = [BeamSearch(scheduler, lane.kv, executors[lane.replica].release,
                               not engine.sharded)
                    for scheduler, lane in zip(joinable, lanes, strict=True)]
        hooks.arrival.append(BeamRounds(hooks, searches))
    admission = engine.admission_control()
    if admission.active:
        hooks.arrival.append(Admission(admission))
    if speculation is not None:
        hooks.add_step_done(SpeculationObserver(speculation))
    if steps is not None:
        hooks.dispatch.append(StepRecorder(steps))
    coastable = [lane.scheduler for lane in lanes
                 if isinstance(lane.scheduler, CoastableScheduler)]
    # coasting is exact only for timing-only steps of one stage without drafts
    if (engine.coast_enabled and not functional and pp == 1 and speculation is None
            and len(coastable) == len(lanes)):
        # lane-local stretches, unless admission control reads a lane's state at arrival
        local = not any(isinstance(h, Admission) for h in hooks.arrival)
        hooks.coast.append(Coaster(engine.cost_model, coastable, steps, info, local))
    return hooks
