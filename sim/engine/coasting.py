"""Timing-only coasting: run certified plain-decode steps without building a plan per step.

When the scheduler certifies (`coast_horizon`) that the next steps are plain decodes of exactly
the running batch, with no request stopping, no admission and no KV change that could alter
the schedule, the engine prices those steps directly from the batch's context lengths and
commits them at once (`scheduler.coast`), each at its own end time exactly as step-by-step
dispatch would. No coasted step starts at or after the next event (an arrival may join it).
A test proves the results bit-identical to step-by-step runs (times, stats, step series).

`Coaster` is the loop's coasting hook (`sim.engine.hooks.CoastHook`); it is registered only when
every lane's scheduler is a `CoastableScheduler` and coasting can be exact (timing-only, one
pipeline stage, no speculation), which the loop's builder checks once.

References: the same idea as a discrete-event simulator's "fast-forward" of a state that no
event can change before a known time (e.g. Vidur's replica-stage scheduling of batches).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from sim.core.protocols import CoastableScheduler
from sim.engine.lanes import Lane, ParallelStats
from sim.engine.records import StepStats
from sim.metrics.step_series import StepSeries


class DecodePricer(Protocol):
    """What coasting needs from a cost model: the time of one step of a batch."""

    def step_time_s(self, num_new_tokens: tuple[int, ...], num_context_tokens: tuple[int, ...],
                    num_logits: int | None = None) -> float: ...


def coast_decodes(cost_model: DecodePricer, scheduler: CoastableScheduler, now_s: float,
                  next_event_s: float, stats: StepStats, steps: StepSeries | None, lane: int = 0,
                  busy_row: list[float] | None = None) -> float:
    """Price and commit the plain-decode steps the scheduler certifies, starting none at or
    after `next_event_s`; the end time of the last one (`now_s` when none ran). `lane` labels
    the step series' rows; `busy_row[0]` (a replica's stage busy time) gets each step's time."""
    if now_s >= next_event_s:  # an event at this instant: nothing to coast (the cheap check)
        return now_s
    horizon = scheduler.coast_horizon()
    if horizon == 0:
        return now_s
    running = scheduler.running
    num_seqs = len(running)
    ones = (1,) * num_seqs
    context0 = np.array([r.num_computed for r in running])  # [num_seqs]
    used0 = scheduler.kv.num_used_tokens()  # distinct KV tokens before the first coasted step
    end_times_s: list[float] = []
    step_times_s: list[float] = []
    for k in range(horizon):
        if now_s >= next_event_s:  # an arrival at or before this dispatch joins it
            break
        step_s = cost_model.step_time_s(ones, tuple((context0 + k).tolist()), num_seqs)
        if steps is not None:
            held = used0 + (k + 1) * num_seqs
            steps.add(now_s, now_s + step_s, num_seqs, 0, num_seqs, scheduler.num_waiting, held,
                      scheduler.coast_reserved_tokens[k], lane)
        now_s = now_s + step_s
        end_times_s.append(now_s)
        step_times_s.append(step_s)
        if busy_row is not None:
            busy_row[0] += step_s
    scheduler.coast(end_times_s)
    stats.charge_coasted(step_times_s, num_seqs)
    return now_s


class Coaster:
    """The coasting hook: after a lane's step (or coasted stretch) completes, coast what its
    scheduler certifies, up to the next event of any lane."""

    def __init__(self, cost_model: DecodePricer, schedulers: list[CoastableScheduler],
                 stats: StepStats, steps: StepSeries | None, info: ParallelStats) -> None:
        self.cost_model, self.schedulers = cost_model, schedulers  # [lane]
        self.stats, self.steps, self.info = stats, steps, info

    def coast(self, lane: Lane, now_s: float, next_event_s: float) -> float:
        """End time of the coasted stretch of `lane` starting at `now_s` (`now_s`: none)."""
        return coast_decodes(self.cost_model, self.schedulers[lane.index], now_s, next_event_s,
                             self.stats, self.steps, lane.index,
                             self.info.stage_busy_s[lane.replica])
