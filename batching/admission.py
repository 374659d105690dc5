"""Admission checks shared by every scheduler: can this request ever run on this engine?

A request that can never be scheduled is rejected at arrival with a reason (prompt longer than
`max_model_len`, a step larger than the token budget, a KV reservation larger than the whole
cache) instead of waiting forever.

References: vLLM `vllm/v1/engine/processor.py` (request validation), `vllm/config.py`
(max_num_batched_tokens >= max_model_len without chunked prefill).
"""

from __future__ import annotations

from collections.abc import Callable

from batching.commit import StopCriteria
from sim.core.protocols import KVCacheManager, Scheduler
from sim.core.request import Request


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
      bound on the real wait, so a rejection is never premature.

    References: the token bucket (Turner 1986; as in rate limiters of API gateways); SLO-aware
    admission as in "Andes" (Liu et al. 2024) and Llumnix-style load shedding.
    """

    def __init__(self, max_waiting: int | None = None, rate_per_s: float | None = None,
                 burst: int = 1, ttft_slo_s: float | None = None,
                 prefill_s: Callable[[int], float] | None = None) -> None:
        self.max_waiting = max_waiting
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.ttft_slo_s = ttft_slo_s
        self.prefill_s = prefill_s
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
        if self.ttft_slo_s is not None and self.prefill_s is not None:
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
