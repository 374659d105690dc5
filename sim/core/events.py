"""The discrete-event clock.

Events are ordered by `(time_s, priority, seq)`: at the same instant step completions run before
arrivals, and arrivals before dispatch (so a step scheduled at time t sees every request that
arrived at t); `seq` is a counter, so ties are FIFO and every run with the same seed is
bit-identical.

References: the event-list core of classic discrete-event simulators (e.g. SimPy, gem5's event
queue); DESIGN.md rule 6.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Any

STEP_DONE = 0
ARRIVAL = 1
DISPATCH = 2


@dataclass(order=True, slots=True)
class Event:
    time_s: float
    priority: int
    seq: int
    payload: Any = field(compare=False, default=None)


class EventLoop:
    """A min-heap of events and the current simulated time (never moves backwards)."""

    def __init__(self) -> None:
        self._heap: list[Event] = []
        self._seq = 0
        self.now_s = 0.0

    def schedule(self, time_s: float, priority: int, payload: Any = None) -> None:
        if time_s < self.now_s:
            raise ValueError(f"event at {time_s} s is in the past (now {self.now_s} s)")
        heapq.heappush(self._heap, Event(time_s, priority, self._seq, payload))
        self._seq += 1

    def pop(self) -> Event:
        event = heapq.heappop(self._heap)
        if event.time_s < self.now_s:  # only possible if someone moved the clock by hand
            raise RuntimeError(f"event at {event.time_s} s popped after {self.now_s} s")
        self.now_s = event.time_s
        return event

    def peek_time_s(self) -> float:
        """Time of the next event (inf when none)."""
        return self._heap[0].time_s if self._heap else float("inf")

    def __bool__(self) -> bool:
        return bool(self._heap)

    def __len__(self) -> int:
        return len(self._heap)
