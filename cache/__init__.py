"""KV-cache managers (accounting) and the NumPy KV store (contents).

`KV_CACHES` maps the engine argument `kv_cache=` to a manager class.
"""

from collections.abc import Callable

from cache.contiguous import ContiguousKVCache
from cache.none import NoKVCache
from cache.paged import PagedKVCache
from sim.core.protocols import KVCacheManager

KV_CACHES: dict[str, Callable[..., KVCacheManager]] = {
    "none": NoKVCache,
    "contiguous": ContiguousKVCache,
    "paged": PagedKVCache,
}

__all__ = ["KV_CACHES", "ContiguousKVCache", "NoKVCache", "PagedKVCache"]
