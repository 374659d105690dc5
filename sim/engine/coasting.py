"""Timing-only coasting: run certified plain-decode steps without building a plan per step.

When the scheduler certifies (`coast_horizon`) that the next steps are plain decodes of exactly
the running batch, with no request stopping, no admission and no KV change that could alter
the schedule, the engine prices those steps in one vectorised call from the batch's context
lengths (`Pricer.decode_stretch_s`) and commits them together (`scheduler.coast`), each at its
own end time exactly as step-by-step dispatch would. Tests prove the results bit-identical to
step-by-step runs (times, stats, step series) on one lane and across replicas.

Two horizons, chosen when the run is built (`Coaster.local`):

- **lane-local** (the default): a lane's decisions change only through its own steps and the
  requests routed to it, so a stretch runs to the scheduler's horizon whatever the other lanes
  do. It is committed when its last step ends (`CoastDone`); an arrival routed to the lane
  before then truncates it (`truncate`): the steps that started before the arrival stand (the
  one in flight completes, as it would step by step), the rest are never run. So with data
  parallelism a stretch is no longer cut at every other replica's event.
- **bounded**: no coasted step starts at or after the next event of any lane, and the stretch
  is committed at once. Used when an arrival hook reads a lane's running state at arrival
  (admission control), which a pending stretch would hide.

`Coaster` is the loop's coasting hook (`sim.engine.hooks.CoastHook`); it is registered only when
every lane's scheduler is a `CoastableScheduler` and coasting can be exact (timing-only, one
pipeline stage, no speculation), which the loop's builder checks once.

References: the same idea as a discrete-event simulator's "fast-forward" of a state that no
event can change before a known time (e.g. Vidur's replica-stage scheduling of batches).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from sim.core.dtypes import FloatArray, IntArray
from sim.core.events import CoastDone
from sim.core.protocols import CoastableScheduler
from sim.engine.lanes import Lane, ParallelStats
from sim.metrics.step_series import StepSeries

#: the longest stretch priced at once (a longer horizon coasts on in the next stretch: the
#: cap bounds the certification tables, never the result)
MAX_STRETCH_STEPS = 64


class DecodePricer(Protocol):
    """What coasting needs from a cost model: the times of a stretch of plain decodes."""

    def decode_stretch_s(self, context_tokens: IntArray, num_steps: int) -> FloatArray:
        """Seconds of each of `num_steps` plain-decode steps of one sequence per entry of
        `context_tokens` ([num_seqs] cached tokens before the first step): [num_steps]."""
        ...


@dataclass(slots=True)
class Stretch:
    """A lane's certified, priced, not yet committed plain-decode steps."""

    start_s: float
    end_times_s: list[float]  # [num_steps]
    step_times_s: list[float]  # [num_steps]
    reserved_tokens: list[int]  # [num_steps] KV tokens reserved after each step
    used_tokens0: int  # distinct KV tokens before the first step
    num_seqs: int
    num_waiting: int
    event: CoastDone  # the event that commits it (a truncated stretch gets a new one)

    @property
    def end_s(self) -> float:
        return self.end_times_s[-1]


class Coaster:
    """The coasting hook: after a lane's step (or coasted stretch) completes, price what its
    scheduler certifies (see the module doc for the two horizons)."""

    def __init__(self, cost_model: DecodePricer, schedulers: list[CoastableScheduler],
                 steps: StepSeries | None, info: ParallelStats, local: bool = True) -> None:
        self.cost_model, self.schedulers = cost_model, schedulers  # [lane]
        self.steps, self.info, self.local = steps, info, local
        self.pending: dict[int, Stretch] = {}  # lane index -> its stretch in flight (local)
        self._generation = 0

    def coast(self, lane: Lane, now_s: float, next_event_s: float) -> CoastDone | None:
        """`lane` is free at `now_s`: the event ending the stretch it coasts now (its time is
        `lane.busy_until_s`), or None when nothing is certified."""
        if not self.local and now_s >= next_event_s:  # an event at this instant: the cheap check
            return None
        scheduler = self.schedulers[lane.index]
        horizon = scheduler.coast_horizon(MAX_STRETCH_STEPS)
        if horizon <= 0:
            return None
        running = scheduler.running
        context0 = np.array([r.num_computed for r in running])  # [num_seqs]
        step_times = self.cost_model.decode_stretch_s(context0, horizon).tolist()  # [horizon]
        # end times one by one (the same float sums as step-by-step dispatch)
        end_times: list[float] = []
        t = now_s
        for step_s in step_times:
            if not self.local and t >= next_event_s:  # an arrival at this dispatch joins it
                break
            t = t + step_s
            end_times.append(t)
        n = len(end_times)
        self._generation += 1
        stretch = Stretch(now_s, end_times, step_times[:n], scheduler.coast_reserved_tokens[:n],
                          scheduler.kv.num_used_tokens(), len(running), scheduler.num_waiting,
                          CoastDone(lane.index, self._generation))
        lane.busy_until_s = stretch.end_s
        if not self.local:
            self._commit(lane, stretch)
        else:
            self.pending[lane.index] = stretch
        return stretch.event

    def done(self, lane: Lane, event: CoastDone) -> bool:
        """Whether `event` ends `lane`'s stretch (committed now); False for the stale event of
        a truncated stretch."""
        if not self.local:
            return True
        stretch = self.pending.get(lane.index)
        if stretch is None or stretch.event is not event:
            return False
        del self.pending[lane.index]
        self._commit(lane, stretch)
        return True

    def truncate(self, lane: Lane, now_s: float) -> CoastDone | None:
        """A request arrives for `lane` at `now_s`: keep the steps of its stretch that started
        before now. The event ending what is left (to schedule), or None when nothing changed
        (no stretch, or none of its steps starts at or after now). With no step left the lane
        is free now (`lane.busy_until_s` back at the stretch's start)."""
        stretch = self.pending.get(lane.index)
        if stretch is None:
            return None
        ends = stretch.end_times_s
        # steps starting before now: step k starts at the end of step k - 1
        keep = 0 if now_s <= stretch.start_s else bisect.bisect_left(ends, now_s) + 1
        if keep >= len(ends):
            return None
        if keep == 0:
            del self.pending[lane.index]
            lane.busy_until_s = stretch.start_s
            lane.busy = False
            return None
        self._generation += 1
        stretch.end_times_s, stretch.step_times_s = ends[:keep], stretch.step_times_s[:keep]
        stretch.reserved_tokens = stretch.reserved_tokens[:keep]
        stretch.event = CoastDone(lane.index, self._generation)
        lane.busy_until_s = stretch.end_s
        return stretch.event

    def _commit(self, lane: Lane, stretch: Stretch) -> None:
        """Apply a stretch: the scheduler's counters and KV, the lane's stats, the series."""
        scheduler = self.schedulers[lane.index]
        scheduler.coast(stretch.end_times_s)
        lane.stats.charge_coasted(stretch.step_times_s, stretch.num_seqs)
        busy = self.info.stage_busy_s[lane.replica]
        start_s = stretch.start_s
        steps, n = self.steps, stretch.num_seqs
        for k, end_s in enumerate(stretch.end_times_s):
            busy[0] += stretch.step_times_s[k]
            if steps is not None:
                steps.add(start_s, end_s, n, 0, n, stretch.num_waiting,
                          stretch.used_tokens0 + (k + 1) * n, stretch.reserved_tokens[k],
                          lane.index)
            start_s = end_s
