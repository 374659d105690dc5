"""The discrete-event clock and its typed events.

Four events drive a run (`sim.engine.loop`): a request `Arrival`, a `Dispatch` of a lane (its
scheduler plans a step), the `StepDone` of a step in flight (its results are committed) and the
`CoastDone` of a coasted stretch of plain decodes (nothing left to commit: the stretch was
committed when it started, `sim.engine.coasting`). Lanes are named by index: the clock sits
below the engine, which owns the lanes.

Events are ordered by `(time_s, priority, seq)`: at the same instant step completions (and
coasted stretches) run before arrivals, and arrivals before dispatch (so a step scheduled at
time t sees every request that arrived at t); `seq` is a counter, so ties are FIFO and every run
with the same seed is bit-identical.

References: the event-list core of classic discrete-event simulators (e.g. SimPy, gem5's event
queue).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import ClassVar

from sim.core.request import Request
from sim.core.step import StepPlan, StepResult

#: the tie rule at one instant: completions, then arrivals, then dispatches
STEP_DONE = 0
ARRIVAL = 1
DISPATCH = 2


@dataclass(frozen=True, slots=True)
class Arrival:
    """`request` arrives (the router picks its lane)."""

    request: Request
    priority: ClassVar[int] = ARRIVAL


@dataclass(frozen=True, slots=True)
class Dispatch:
    """Lane `lane` may start a step (if it is idle)."""

    lane: int
    priority: ClassVar[int] = DISPATCH


@dataclass(frozen=True, slots=True)
class StepDone:
    """The step `plan` of lane `lane` completes with `result`; it is committed now."""

    lane: int
    plan: StepPlan
    result: StepResult
    priority: ClassVar[int] = STEP_DONE


@dataclass(frozen=True, slots=True)
class CoastDone:
    """The last coasted step of lane `lane`'s stretch `generation` completes (a stretch cut
    short by an arrival gets a new generation: the old event is stale)."""

    lane: int
    generation: int = 0
    priority: ClassVar[int] = STEP_DONE


Event = Arrival | Dispatch | StepDone | CoastDone


class EventQueue:
    """A min-heap of events and the current simulated time (never moves backwards)."""

    def __init__(self) -> None:
        # (time_s, priority, seq, event): seq is unique, so events themselves never compare
        self._heap: list[tuple[float, int, int, Event]] = []
        self._seq = 0
        self.now_s = 0.0

    def schedule(self, time_s: float, event: Event) -> None:
        if time_s < self.now_s:
            raise ValueError(f"event at {time_s} s is in the past (now {self.now_s} s)")
        heapq.heappush(self._heap, (time_s, event.priority, self._seq, event))
        self._seq += 1

    def pop(self) -> tuple[float, Event]:
        """The next event and its time (the clock moves there)."""
        time_s, _, _, event = heapq.heappop(self._heap)
        if time_s < self.now_s:  # only possible if someone moved the clock by hand
            raise RuntimeError(f"event at {time_s} s popped after {self.now_s} s")
        self.now_s = time_s
        return time_s, event

    def peek_time_s(self) -> float:
        """Time of the next event (inf when none)."""
        return self._heap[0][0] if self._heap else float("inf")

    def __bool__(self) -> bool:
        return bool(self._heap)

    def __len__(self) -> int:
        return len(self._heap)
