"""The `KVCacheManager` protocol: KV-cache *accounting* (which request holds how much memory).

The KV *contents* live in a `KVStore` (`cache/kv_store.py`) that the functional executor fills;
managers only decide whether memory exists. All-or-nothing: `allocate` either grants the whole
request or changes nothing.

References: Kwon et al., "Efficient Memory Management for Large Language Model Serving with
PagedAttention" (SOSP'23) for the manager/block-table split; vLLM `vllm/v1/core/kv_cache_manager.py`.
"""

from __future__ import annotations

from typing import Protocol

from cache.usage import KVMemoryUsage
from sim.request import Request


class KVCacheManager(Protocol):
    """Decides whether a request's KV fits; the scheduler asks before it schedules tokens."""

    #: False for the no-KV-cache baseline: KV is dropped after every step and recomputed.
    retains_kv: bool

    def never_fits(self, request: Request, max_len: int) -> str | None:
        """Why a request of up to `max_len` tokens could never be held (None if it could)."""
        ...

    def cached_prefix(self, request: Request) -> int:
        """Tokens at the start of the request whose KV is already cached and can be shared
        (whole blocks, always fewer than `request.num_tokens`); 0 without prefix caching.
        A pure lookup: nothing changes."""
        ...

    def allocate(self, request: Request, num_tokens: int, num_cached_tokens: int = 0) -> bool:
        """Make room for KV of the request's first `num_tokens` tokens; False changes nothing.
        A request holding nothing may share its first `num_cached_tokens` (the value
        `cached_prefix` just returned) instead of getting fresh memory for them."""
        ...

    def free(self, request: Request) -> None:
        """Release everything the request holds (a no-op if it holds nothing)."""
        ...

    def preempt(self, request: Request) -> bool:
        """Take the request's memory away so others can run: True if its KV was kept (swapped
        out, to come back on its next `allocate`), False if freed (it must be recomputed)."""
        ...

    def capacity(self, request: Request) -> int:
        """Tokens the request can hold without allocating more memory."""
        ...

    def usage(self) -> KVMemoryUsage:
        """Where the KV memory goes now (used, reserved, fragmentation, free)."""
        ...

    def num_free_tokens(self) -> int: ...

    def num_used_tokens(self) -> int:
        """Tokens of KV that exist for real requests (not merely reserved)."""
        ...

    def num_reserved_tokens(self) -> int:
        """Tokens of capacity held by requests (used + reserved-but-unused)."""
        ...
