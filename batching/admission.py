"""Admission checks shared by every scheduler: can this request ever run on this engine?

A request that can never be scheduled is rejected at arrival with a reason (prompt longer than
`max_model_len`, a step larger than the token budget, a KV reservation larger than the whole
cache) instead of waiting forever.

References: vLLM `vllm/v1/engine/processor.py` (request validation), `vllm/config.py`
(max_num_batched_tokens >= max_model_len without chunked prefill).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol, runtime_checkable

from batching.commit import StopCriteria
from sim.core.protocols import KVCacheManager, Scheduler
from sim.core.request import Request

#: a step's price: (new tokens per sequence, context tokens per sequence, logits) -> seconds
StepPrice = Callable[[tuple[int, ...], tuple[int, ...], int], float]


@runtime_checkable
class RunningBatch(Protocol):
    """What the look-ahead reads of an iteration-level scheduler (`batching.continuous`)."""

    running: list[Request]
    max_num_seqs: int
    max_num_batched_tokens: int
    chunked: bool


def never_runs(
    request: Request, kv: KVCacheManager, stop: StopCriteria, max_num_batched_tokens: int,
    chunked: bool = False,
) -> str | None:
    """Why `request` can never be scheduled ("<kind>: <details>"), or None. With chunked
    prefill a prompt longer than the token budget is fine: it is computed in chunks."""
    if request.num_prompt_tokens > stop.max_model_len:
        return (f"prompt longer than max_model_len: {request.num_prompt_tokens} tokens > "
                f"max_model_len={stop.max_model_len}")
    longest = request.max_len(stop.max_model_len)
    # one step computes the whole prompt; without a KV cache, the whole (growing) sequence
    need = request.num_prompt_tokens if kv.retains_kv else longest
    if need > max_num_batched_tokens and not (chunked and kv.retains_kv):
        return (f"step larger than max_num_batched_tokens: one step of this request needs "
                f"{need} tokens > max_num_batched_tokens={max_num_batched_tokens}; "
                "raise max_num_batched_tokens")
    return kv.never_fits(request, longest)


class AdmissionControl:
    """Load shedding at arrival, before a request is queued: each rejection has a reason.

    - `max_waiting`: a queue limit (reject when that many requests already wait);
    - `rate_per_s` / `burst`: a token bucket (a request takes one token; tokens refill at
      `rate_per_s` up to `burst`), i.e. a sustained admission rate with bursts;
    - `ttft_slo_s`: SLO-aware rejection: reject when the predicted TTFT already misses the SLO.
      The prediction prices the prefills queued ahead of the request plus its own, each as a
      lone prefill step on the cost model, plus what is left of the step in flight: a lower
      bound on the real wait, so a rejection is never premature. With `step_s` and an
      iteration-level scheduler (`RunningBatch`) the prediction is a look-ahead instead: the
      scheduler's steps are replayed on the cost model from its state (running decodes keep
      their seats and token budget until their `max_tokens`; queued prompts, then the new one,
      are admitted FCFS into the budget left, chunked when the scheduler chunks), and the new
      request's TTFT is the end of the step that computes its last prompt token. Decodes are
      assumed to run to `max_tokens` (their real lengths are unknown), so it errs long.

    References: the token bucket (Turner 1986; as in rate limiters of API gateways); SLO-aware
    admission as in "Andes" (Liu et al. 2024) and Llumnix-style load shedding.
    """

    def __init__(self, max_waiting: int | None = None, rate_per_s: float | None = None,
                 burst: int = 1, ttft_slo_s: float | None = None,
                 prefill_s: Callable[[int], float] | None = None,
                 step_s: StepPrice | None = None) -> None:
        self.max_waiting = max_waiting
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.ttft_slo_s = ttft_slo_s
        self.prefill_s = prefill_s
        self.step_s = step_s
        self._tokens = float(burst)
        self._last_s = 0.0

    @property
    def active(self) -> bool:
        return any(x is not None for x in (self.max_waiting, self.rate_per_s, self.ttft_slo_s))

    def check(self, request: Request, now_s: float, scheduler: Scheduler,
              busy_until_s: float) -> str | None:
        """Why `request` is refused now ("<kind>: <details>"), or None (then it is counted).
        `scheduler` is the one the request would wait in; `busy_until_s` the end of its step in
        flight."""
        num_waiting = scheduler.num_waiting
        if self.max_waiting is not None and num_waiting >= self.max_waiting:
            return (f"queue full: {num_waiting} requests waiting >= max_waiting="
                    f"{self.max_waiting}")
        if (self.ttft_slo_s is not None and self.step_s is not None
                and isinstance(scheduler, RunningBatch)):
            predicted_s = max(busy_until_s - now_s, 0.0) + self.look_ahead_s(
                request, scheduler, scheduler.waiting_requests(), self.ttft_slo_s)
            if predicted_s > self.ttft_slo_s:
                return (f"TTFT SLO would be missed: predicted TTFT {predicted_s * 1e3:.0f} ms "
                        f"> SLO {self.ttft_slo_s * 1e3:.0f} ms")
        elif self.ttft_slo_s is not None and self.prefill_s is not None:
            ahead = sum(self.prefill_s(r.num_prompt_tokens - r.num_computed)
                        for r in scheduler.waiting_requests())
            predicted_s = max(busy_until_s - now_s, 0.0) + ahead + self.prefill_s(
                request.num_prompt_tokens)
            if predicted_s > self.ttft_slo_s:
                return (f"TTFT SLO already missed: predicted TTFT {predicted_s * 1e3:.0f} ms > "
                        f"SLO {self.ttft_slo_s * 1e3:.0f} ms")
        if self.rate_per_s is not None:
            self._tokens = min(self.burst, self._tokens + (now_s - self._last_s) * self.rate_per_s)
            self._last_s = now_s
            if self._tokens < 1.0:
                return (f"rate limited: token bucket empty (rate {self.rate_per_s}/s, "
                        f"burst {self.burst})")
            self._tokens -= 1.0
        return None

    def look_ahead_s(self, request: Request, batch: RunningBatch, waiting: Iterable[Request],
                     horizon_s: float, max_model_len: int = 1 << 30) -> float:
        """Seconds from the next step's start until `request`'s prompt is computed, replaying
        the scheduler's steps from its state (see the class doc); stops past `horizon_s`."""
        assert self.step_s is not None
        # running decodes: [context tokens, tokens left]
        decodes = [[r.num_tokens, r.max_len(max_model_len) - r.num_tokens]
                   for r in batch.running if r.num_computed >= r.num_prompt_tokens]
        # prompts still to compute, in admission order: [tokens computed, prompt tokens]
        queue = [[r.num_computed, r.num_prompt_tokens] for r in batch.running
                 if r.num_computed < r.num_prompt_tokens]
        queue += [[r.num_computed, r.num_prompt_tokens] for r in waiting]
        if not batch.chunked:  # a prompt no step can hold is refused by `never_runs`, not here
            limit = batch.max_num_batched_tokens
            if request.num_prompt_tokens > limit:
                return 0.0
            queue = [q for q in queue if q[1] - q[0] <= limit]
        queue.append([0, request.num_prompt_tokens])
        mine = queue[-1]
        t_s = 0.0
        while t_s <= horizon_s:
            decodes = [d for d in decodes if d[1] > 0]
            budget = batch.max_num_batched_tokens - len(decodes)
            seats = batch.max_num_seqs - len(decodes)
            new = [1] * len(decodes)
            ctx = [d[0] for d in decodes]
            chunks: list[tuple[list[int], int]] = []
            for item in queue:
                left = item[1] - item[0]
                n = min(left, budget) if batch.chunked else left
                if seats < 1 or n < 1 or n > budget:
                    break  # FCFS: the head blocks the rest
                chunks.append((item, n))
                new.append(n)
                ctx.append(item[0])
                budget, seats = budget - n, seats - 1
            if not new:
                break  # nothing can run on what is known: the lower bound so far
            t_s += self.step_s(tuple(new), tuple(ctx), len(new))
            for d in decodes:
                d[0], d[1] = d[0] + 1, d[1] - 1
            for item, n in chunks:
                item[0] += n
                if item[0] >= item[1]:
                    queue.remove(item)
                    if item is mine:
                        return t_s
                    decodes.append([item[1], 1 << 30])  # decodes on (its length is unknown)
        return t_s
