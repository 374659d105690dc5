"""KV-cache managers (accounting) and the NumPy KV store (contents).

`KV_CACHES` maps the engine argument `kv_cache=` to a manager class; its keys are the choices
`EngineArgs` accepts and the CLI offers (`sim.engine.args.CHOICES`), as are the other option lists
of this package: `cache.contiguous.RESERVATIONS`, `cache.paged.PREEMPTION_MODES` and
`cache.kv_eviction.KV_EVICTION_POLICIES`.
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
