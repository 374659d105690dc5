"""The `KVCacheManager` protocol: KV-cache *accounting* (which request holds how much memory).

The KV *contents* live in a `KVStore` (`cache/kv_store.py`) that the functional executor fills;
managers only decide whether memory exists. All-or-nothing: `allocate` either grants the whole
request or changes nothing.

References: Kwon et al., "Efficient Memory Management for Large Language Model Serving with
PagedAttention" (SOSP'23) for the manager/block-table split; vLLM `vllm/v1/core/kv_cache_manager.py`.
"""

from __future__ import annotations

from typing import Protocol

from sim.request import Request


class KVCacheManager(Protocol):
    """Decides whether a request's KV fits; the scheduler asks before it schedules tokens."""

    #: False for the no-KV-cache baseline: KV is dropped after every step and recomputed.
    retains_kv: bool

    def never_fits(self, request: Request, max_len: int) -> str | None:
        """Why a request of up to `max_len` tokens could never be held (None if it could)."""
        ...

    def allocate(self, request: Request, num_tokens: int) -> bool:
        """Make room for KV of the request's first `num_tokens` tokens; False changes nothing."""
        ...

    def free(self, request: Request) -> None:
        """Release everything the request holds (a no-op if it holds nothing)."""
        ...

    def num_free_tokens(self) -> int: ...

    def num_used_tokens(self) -> int:
        """Tokens of KV that exist for real requests (not merely reserved)."""
        ...

    def num_reserved_tokens(self) -> int:
        """Tokens of capacity held by requests (used + reserved-but-unused)."""
        ...
