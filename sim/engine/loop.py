"""The engine's event loop: requests in, a discrete-event simulation over lanes, results out.

One loop drives every parallel layout. A *lane* is a scheduler with its KV manager
(`sim.engine.lanes.Lane`): dp = pp = 1 is one lane, data parallelism gives a lane per replica,
pipeline parallelism pp lanes (virtual engines) per replica. At each dispatch a lane's scheduler
plans a step from committed state, the replica's executor computes it (real tokens, or none in
timing mode), the pricer prices its shape (with pp > 1 through the replica's stage FIFO), and a
`StepDone` event at the step's end commits the results. Arrivals stream in lazily from any
iterable (a million-request workload never sits in memory); with several lanes the router picks
the replica.

`EngineLoop` has one handler per event type (`sim.core.events`: `Arrival`, `Dispatch`,
`StepDone`, `CoastDone`); everything optional (admission control, `n > 1` forks, beam search,
speculation's observation, coasting, the per-step series, routing and pipeline stages) is a hook
registered when the run is built (`sim.engine.hooks`, which documents the order the hooks run
in). Coasting runs each lane's certified plain decodes as one stretch, cut short only by a
request routed to that lane (`sim.engine.coasting`), which keeps it exactly equivalent to
step-by-step dispatch; with pp > 1 it is off. Speculative decoding is single-lane only.

A request that can never run is rejected with a reason when it arrives; if a lane stalls with
nothing running anywhere and nothing left to arrive, its remaining requests are rejected with a
reason rather than retried forever.

References: vLLM `vllm/v1/engine/core.py` (step loop), vLLM v0 `vllm/engine/llm_engine.py`
(virtual engines) and `vllm/v1/engine/core_client.py` (data-parallel engines); Vidur (Agrawal et
al., MLSys'24) for the simulated-clock serving loop.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from sim.core.errors import ConfigError
from sim.core.events import Arrival, CoastDone, Dispatch, Event, EventQueue, StepDone
from sim.core.request import Request, reject
from sim.engine.build import build_executor, measured_expert_load
from sim.engine.hooks import build_hooks
from sim.engine.lanes import Lane, ParallelStats, build_lanes
from sim.engine.records import SimulationResult, StepStats, request_times
from sim.metrics.collector import MetricsCollector
from sim.metrics.step_series import StepSeries
from sim.workload.specs import RequestSpec

if TYPE_CHECKING:
    from sim.engine.engine import Engine

STALLED = ("stalled: nothing was running and the request still could not be scheduled within "
           "the engine's limits")


class EngineLoop:
    """One run of `engine`: its lanes, executors and hooks, built once, driven by the clock."""

    def __init__(self, engine: Engine, keep_requests: bool = True,
                 on_finish: Callable[[Request], None] | None = None,
                 record_steps: bool = False, max_concurrency: int | None = None) -> None:
        if max_concurrency is not None and (type(max_concurrency) is not int
                                            or max_concurrency < 1):
            raise ConfigError(f"max_concurrency={max_concurrency!r} must be a whole number >= 1 "
                              "(requests in flight at once), or None for no cap")
        dp, pp = engine.plan.dp, engine.plan.pp
        self.engine = engine
        self.lanes = build_lanes(engine)
        # one executor per replica, shared by its pipeline lanes (speculation, sharding, the KV
        # codec and eviction are its options)
        self.executors = [build_executor(engine, self.lanes[r * pp].kv) for r in range(dp)]
        self.metrics, self.clock = MetricsCollector(), EventQueue()
        self.stats = StepStats()  # the lanes' counters together, once the run is done
        self.steps = StepSeries() if record_steps else None
        self.info = ParallelStats.empty(dp, pp, engine.args.data_parallel_router)
        self.hooks = build_hooks(engine, self.lanes, self.executors, self.steps, self.info)
        self.coaster = self.hooks.coast[0] if self.hooks.coast else None
        self.keep_requests, self.on_finish = keep_requests, on_finish
        self.kept: list[Request] = []
        self._source: Iterator[Request | RequestSpec] = iter(())
        self._num_arrived = 0
        self._last_arrival_s = 0.0
        # the client-side cap (`vllm bench serve --max-concurrency`): requests in flight, and
        # those held until one ends (FIFO)
        self.max_concurrency = max_concurrency
        self._in_flight = 0
        self._held: deque[Request] = deque()
        self._wall_start_s = time.perf_counter()  # (reset by `start`)

    def run(self, requests: Iterable[Request | RequestSpec]) -> SimulationResult:
        """Simulate `requests` (sorted by arrival) to completion."""
        wall_start = time.perf_counter()
        self._source = iter(requests)
        self._next_arrival()
        clock, lanes = self.clock, self.lanes
        while clock:
            now_s, event = clock.pop()
            match event:
                case StepDone():
                    self._on_step_done(event, now_s)
                case Dispatch():
                    self._on_dispatch(lanes[event.lane], now_s)
                case Arrival():
                    self._on_arrival(event.request, now_s)
                case CoastDone():
                    lane = lanes[event.lane]
                    if self.coaster is not None and self.coaster.done(lane, event):
                        self._lane_free(lane, now_s)
                    elif not clock:  # a stale event was the last: re-check idle lanes
                        self._recheck_idle(now_s)
        return self._result(wall_start)

    # ------------------------------------------------------------------ incremental driving
    # A server (`sim.serve`) drives the same loop from outside: requests join while it runs,
    # and simulated time advances only as far as the caller's clock allows. `run` is untouched
    # (its results, and so the goldens, stay identical): these four methods are the loop above
    # cut at its seams.
    def start(self, requests: Iterable[Request | RequestSpec] = ()) -> None:
        """Begin a run driven by `submit`, `advance_until` and `finish` (with an optional
        stream of `requests`, sorted by arrival, as `run` takes)."""
        self._wall_start_s = time.perf_counter()
        self._source = iter(requests)
        self._next_arrival()

    def submit(self, req: Request) -> None:
        """`req` arrives at `max(req.arrival_s, now)`: a request cannot arrive in the simulated
        past, where steps have already been planned without it."""
        req.arrival_s = max(req.arrival_s, self.clock.now_s)
        for sample in req.forks:
            sample.arrival_s = req.arrival_s
        self.clock.schedule(req.arrival_s, Arrival(req))

    def next_event_s(self) -> float:
        """Simulated time of the next event (inf: nothing is pending)."""
        return self.clock.peek_time_s() if self.clock else float("inf")

    def advance_until(self, until_s: float) -> int:
        """Handle every event due at or before `until_s` (simulated seconds), in order; the
        number handled. The clock then stands at the last one's time."""
        clock, num_handled = self.clock, 0
        while clock and clock.peek_time_s() <= until_s:
            now_s, event = clock.pop()
            self._handle(now_s, event)
            num_handled += 1
        return num_handled

    def finish(self) -> SimulationResult:
        """The result of a run begun with `start` (the same object `run` returns)."""
        return self._result(self._wall_start_s)

    def _handle(self, now_s: float, event: Event) -> None:
        """One event, as `run`'s loop handles it."""
        match event:
            case StepDone():
                self._on_step_done(event, now_s)
            case Dispatch():
                self._on_dispatch(self.lanes[event.lane], now_s)
            case Arrival():
                self._on_arrival(event.request, now_s)
            case CoastDone():
                lane = self.lanes[event.lane]
                if self.coaster is not None and self.coaster.done(lane, event):
                    self._lane_free(lane, now_s)
                elif not self.clock:
                    self._recheck_idle(now_s)

    # ------------------------------------------------------------------ handlers
    def _on_arrival(self, req: Request, now_s: float) -> None:
        if self.max_concurrency is not None:
            if self._in_flight >= self.max_concurrency:  # the client holds it until one ends
                self._held.append(req)
                self._next_arrival()
                return
            self._in_flight += 1 + len(req.forks)
        lane = self.hooks.router.route(req)
        lane.outstanding += 1 + len(req.forks)  # samples count one each
        if self.coaster is not None and lane.busy:  # the lane's coasted steps stop here
            cut = self.coaster.truncate(lane, now_s)
            if cut is not None:
                self.clock.schedule(lane.busy_until_s, cut)
        reason = self._refusal(lane, req, now_s)
        if reason is not None:
            reject(req, reason)
            self._end(lane, req)
        self._next_arrival()
        if not lane.busy:
            self._dispatch_soon(lane, now_s)

    def _on_dispatch(self, lane: Lane, now_s: float) -> None:
        lane.pending = False
        if lane.busy:
            return
        plan = lane.scheduler.schedule(now_s)
        if plan is None:
            self._on_idle(lane, now_s)
            return
        lane.busy = True
        self.info.first_dispatch_s = min(self.info.first_dispatch_s, now_s)
        end_s = self.hooks.pricer.price(lane, plan, now_s)
        for hook in self.hooks.dispatch:
            hook.on_dispatch(lane, plan, now_s, end_s)
        result = self.executors[lane.replica].run(plan)
        lane.busy_until_s = end_s
        self.clock.schedule(end_s, StepDone(lane.index, plan, result))

    def _on_step_done(self, done: StepDone, now_s: float) -> None:
        lane = self.lanes[done.lane]
        for hook in self.hooks.step_done:  # they may rewrite what is committed
            done, ended = hook.on_step_done(lane, done, now_s)
            self._end_all(lane, ended)
        self._end_all(lane, lane.scheduler.update(done.plan, done.result, now_s))
        self._lane_free(lane, now_s)

    # ------------------------------------------------------------------ helpers
    def _lane_free(self, lane: Lane, now_s: float) -> None:
        """`lane`'s step (or coasted stretch) is done: coast on, or dispatch."""
        self.info.last_done_s = max(self.info.last_done_s, now_s)
        if self.coaster is not None:
            done = self.coaster.coast(lane, now_s, self.clock.peek_time_s())
            if done is not None:  # busy until the last coasted step completes
                self.clock.schedule(lane.busy_until_s, done)
                return
        lane.busy = False
        self._dispatch_soon(lane, now_s)

    def _recheck_idle(self, now_s: float) -> None:
        """The clock ran dry on a truncated stretch's stale `CoastDone`: a lane that found
        nothing to run while that event was pending saw a non-empty clock and so could not
        declare a stall; dispatch the idle lanes with work once more, so a stall is still
        detected (and its requests end with a reason) instead of being left unfinished."""
        for lane in self.lanes:
            if not lane.busy and lane.scheduler.has_work():
                self._dispatch_soon(lane, now_s)

    def _dispatch_soon(self, lane: Lane, now_s: float) -> None:
        if not lane.pending:
            lane.pending = True
            self.clock.schedule(now_s, lane.dispatch)

    def _refusal(self, lane: Lane, req: Request, now_s: float) -> str | None:
        """Why `req` cannot join `lane` (the arrival hooks, then the scheduler), or None."""
        for hook in self.hooks.arrival:
            reason = hook.on_arrival(lane, req, now_s)
            if reason is not None:
                return reason
        return lane.scheduler.add(req)

    def _on_idle(self, lane: Lane, now_s: float) -> None:
        """`lane` has nothing to run now: a hook's work, a wakeup, or (nothing anywhere) a stall."""
        if any([hook.on_idle(lane, now_s) for hook in self.hooks.idle]):
            self._dispatch_soon(lane, now_s)  # (a search restarted: its prompt can run now)
            return
        scheduler = lane.scheduler
        wake_s = scheduler.next_wakeup_s(now_s)
        if wake_s is not None and wake_s > now_s:
            self.clock.schedule(wake_s, lane.dispatch)
        elif scheduler.has_work() and not self.clock and not any(x.busy for x in self.lanes):
            aborted = scheduler.abort_all("stalled")
            for req in aborted:
                reject(req, STALLED)
            for hook in self.hooks.abort:
                aborted = hook.on_abort(lane, aborted)
            self._end_all(lane, aborted)

    def _end(self, lane: Lane, req: Request) -> None:
        lane.outstanding -= 1
        if self.max_concurrency is not None:
            self._in_flight -= 1
            if self._held and self._in_flight < self.max_concurrency:
                held = self._held.popleft()
                held.arrival_s = self.clock.now_s  # sent now: its latencies count from here
                for sample in held.forks:
                    sample.arrival_s = held.arrival_s
                self.clock.schedule(held.arrival_s, Arrival(held))
        self.metrics.record(request_times(req))
        self.executors[lane.replica].release(req)
        if self.keep_requests:
            self.kept.append(req)
        if self.on_finish is not None:
            self.on_finish(req)
        for hook in self.hooks.end:
            self._end_all(lane, hook.on_end(lane, req))

    def _end_all(self, lane: Lane, reqs: Iterable[Request]) -> None:
        for req in reqs:
            self._end(lane, req)

    def _next_arrival(self) -> None:
        """Schedule the next request of the stream (one ahead: the stream stays lazy)."""
        item = next(self._source, None)
        if item is None:
            return
        req = (item if isinstance(item, Request)
               else self.engine.request_from_spec(item, self._num_arrived))
        self._num_arrived += 1
        if not req.arrival_s >= self._last_arrival_s:
            raise ConfigError(
                f"request {req.request_id} arrives at {req.arrival_s} s, before the previous "
                f"one ({self._last_arrival_s} s); sort the workload by arrival time"
            )
        self._last_arrival_s = req.arrival_s
        self.clock.schedule(req.arrival_s, Arrival(req))

    def _result(self, wall_start: float) -> SimulationResult:
        engine = self.engine
        self.stats = stats = StepStats.merged([lane.stats for lane in self.lanes])
        if self.steps is not None:  # lanes record out of order: by start time, then lane
            self.steps.rows.sort(key=lambda row: (row[0], row[-1]))
        stats.num_preemptions = sum(lane.scheduler.num_preemptions for lane in self.lanes)
        engine.parallel_stats = self.hooks.router.parallel_stats()
        speculation = engine.speculation
        return SimulationResult(self.metrics.summary(), self.metrics, self.kept, stats,
                                time.perf_counter() - wall_start, engine.description, self.steps,
                                None if speculation is None else speculation.summary(),
                                tuple(lane.kv for lane in self.lanes),
                                measured_expert_load(engine))


def run_engine(engine: Engine, requests: Iterable[Request | RequestSpec],
               keep_requests: bool = True, on_finish: Callable[[Request], None] | None = None,
               record_steps: bool = False, max_concurrency: int | None = None
               ) -> SimulationResult:
    """Simulate `requests` (sorted by arrival) to completion on `engine`'s lanes (`Engine.run`)."""
    return EngineLoop(engine, keep_requests, on_finish, record_steps,
                      max_concurrency).run(requests)
