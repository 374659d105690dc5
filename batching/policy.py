"""Waiting-queue orderings: which waiting request the scheduler considers next.

- `fcfs`: arrival order (vLLM's default); a preempted request goes back to the front;
- `priority`: lowest `Request.priority` value first, then arrival (vLLM's `priority` policy);
  the scheduler may preempt running requests of worse priority to admit a better one;
- `shortest_prompt_first`: fewest prompt tokens first, then arrival (SJF for prefill; it lowers
  mean TTFT and can starve long prompts under sustained load).

References: vLLM `vllm/v1/core/sched/request_queue.py` (FCFS and priority queues); Sarathi-Serve
and the SJF discussion in "Andes" (Liu et al. 2024).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator

from sim.core.errors import ConfigError
from sim.core.request import Request

#: `scheduling_policy=` name -> the sort key of a waiting request (ties: arrival, then index).
#: The one list of queue policies: `EngineArgs` and the CLI take their choices from its keys.
POLICIES: dict[str, Callable[[Request], tuple[float, ...]]] = {
    "fcfs": lambda req: (req.arrival_s, req.index),
    "priority": lambda req: (req.priority, req.arrival_s, req.index),
    "shortest_prompt_first": lambda req: (req.num_prompt_tokens, req.arrival_s, req.index),
}


class WaitingQueue:
    """The waiting requests, kept in policy order (a sorted list; cheap for FCFS appends)."""

    def __init__(self, policy: str = "fcfs") -> None:
        if policy not in POLICIES:
            raise ConfigError(f"scheduling_policy={policy!r} is not one of "
                              f"{', '.join(POLICIES)}")
        self.policy = policy
        self._key = POLICIES[policy]
        self._items: list[tuple[tuple[float, ...], Request]] = []

    def add(self, req: Request) -> None:
        bisect.insort(self._items, (self._key(req), req), key=lambda item: item[0])

    def requeue(self, req: Request) -> None:
        """A preempted request: first in line under FCFS, by its key otherwise."""
        if self.policy == "fcfs":
            self._items.insert(0, ((float("-inf"),), req))
        else:
            self.add(req)

    def remove(self, req: Request) -> None:
        """Take `req` out of the queue (a beam search dropping a beam)."""
        self._items = [item for item in self._items if item[1] is not req]

    def peek(self) -> Request:
        return self._items[0][1]

    def pop(self) -> Request:
        return self._items.pop(0)[1]

    def __len__(self) -> int:
        return len(self._items)

    def __bool__(self) -> bool:
        return bool(self._items)

    def __iter__(self) -> Iterator[Request]:
        return (req for _, req in self._items)

    def clear(self) -> list[Request]:
        out = [req for _, req in self._items]
        self._items = []
        return out
