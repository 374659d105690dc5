"""Per-GPU KV stores of a sharded model.

Each simulated GPU (pipeline stage s, tensor rank r) keeps its own `ContiguousKVStore` holding only
stage s's layers and rank r's KV heads (replicated when tp > n_kv_head, as in vLLM); the sharded
model `select`s the GPU before each attention call. The functional executor
(`sim.executor.functional.NumpyExecutor`, built by `sim.engine.build.build_executor`) runs the
sharded model over a `RankedKVStore` as over any store addressed by sequence id. The KV manager
of the engine (any kind) still decides admission and memory; the contents are per GPU, so the
paged manager's block tables and block copies are not used for them (a swapped-out request's
contents simply stay in the per-GPU stores).

References: vLLM `vllm/worker/cache_engine.py` (one KV cache per worker).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import numpy as np

from parallel.tensor import ShardedModel
from sim.model.kv_store import ContiguousKVStore


class RankedKVStore:
    """One `ContiguousKVStore` per GPU (stage, tp rank): its stage's layers, its KV heads.
    `select(stage, rank)` picks the GPU that the next `write`/`read` belong to."""

    def __init__(self, model: ShardedModel, dtype: Any) -> None:
        c = model.config
        self.model = model
        self.stores: dict[tuple[int, int], ContiguousKVStore] = {}
        for s, layers in enumerate(model.stage_ranges):
            for r, kv in enumerate(model.kv_split):
                if kv:
                    self.stores[(s, r)] = ContiguousKVStore(len(layers), len(kv), c.d_head, dtype)
        self._gpu = next(iter(self.stores))

    def select(self, stage: int, rank: int) -> None:
        self._gpu = (stage, rank)

    def n_kv_heads(self) -> int:
        return self.stores[self._gpu].n_kv_head

    def _local(self, layer: int) -> int:
        return layer - self.model.stage_ranges[self._gpu[0]].start

    def write(self, seq_id: Hashable, layer: int, start_pos: int, k: np.ndarray,
              v: np.ndarray) -> None:
        self.stores[self._gpu].write(seq_id, self._local(layer), start_pos, k, v)

    def read(self, seq_id: Hashable, layer: int, end_pos: int) -> tuple[np.ndarray, np.ndarray]:
        return self.stores[self._gpu].read(seq_id, self._local(layer), end_pos)

    def allocate(self, seq_id: Hashable, num_tokens: int) -> None:
        for store in self.stores.values():
            store.allocate(seq_id, num_tokens)

    def has(self, seq_id: Hashable) -> bool:
        return self.stores[next(iter(self.stores))].has(seq_id)

    def free(self, seq_id: Hashable) -> None:
        for store in self.stores.values():
            store.free(seq_id)

    def truncate(self, seq_id: Hashable, num_tokens: int) -> None:
        """Keep the first `num_tokens` positions on every GPU."""
        for store in self.stores.values():
            store.truncate(seq_id, num_tokens)
