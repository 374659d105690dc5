"""Admission checks shared by every scheduler: can this request ever run on this engine?

A request that can never be scheduled is rejected at arrival with a reason (prompt longer than
`max_model_len`, a step larger than the token budget, a KV reservation larger than the whole
cache) instead of waiting forever.

References: vLLM `vllm/v1/engine/processor.py` (request validation), `vllm/config.py`
(max_num_batched_tokens >= max_model_len without chunked prefill).
"""

from __future__ import annotations

from batching.commit import StopCriteria
from cache.base import KVCacheManager
from sim.request import Request


def max_len(request: Request, max_model_len: int) -> int:
    """The longest this request may grow: prompt + max_tokens, capped by max_model_len."""
    if request.sampling.max_tokens is None:
        return max_model_len
    return min(max_model_len, request.num_prompt_tokens + request.sampling.max_tokens)


def never_runs(
    request: Request, kv: KVCacheManager, stop: StopCriteria, max_num_batched_tokens: int
) -> str | None:
    """Why `request` can never be scheduled ("<kind>: <details>"), or None."""
    if request.num_prompt_tokens > stop.max_model_len:
        return (f"prompt longer than max_model_len: {request.num_prompt_tokens} tokens > "
                f"max_model_len={stop.max_model_len}")
    longest = max_len(request, stop.max_model_len)
    # one step computes the whole prompt; without a KV cache, the whole (growing) sequence
    need = request.num_prompt_tokens if kv.retains_kv else longest
    if need > max_num_batched_tokens:
        return (f"step larger than max_num_batched_tokens: one step of this request needs "
                f"{need} tokens > max_num_batched_tokens={max_num_batched_tokens}; "
                "raise max_num_batched_tokens")
    return kv.never_fits(request, longest)
