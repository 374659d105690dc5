"""Per-GPU KV stores and the functional executor of a sharded model.

Each simulated GPU (pipeline stage s, tensor rank r) keeps its own `ContiguousKVStore` holding only
stage s's layers and rank r's KV heads (replicated when tp > n_kv_head, as in vLLM); the sharded
model `select`s the GPU before each attention call. The KV manager of the engine (any kind) still
decides admission and memory; the contents are per GPU.

References: vLLM `vllm/worker/cache_engine.py` (one KV cache per worker).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import numpy as np

from parallel.tensor import ShardedModel
from sim.core.errors import ConfigError
from sim.executor.functional import NumpyExecutor
from sim.model.kv_store import ContiguousKVStore
from sim.model.numpy_model import NumpyModel


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

    def __getattr__(self, name: str) -> Any:
        """Other per-sequence operations (grow, truncate, ...) apply to every GPU's store."""
        stores = self.__dict__.get("stores")
        if not stores or not hasattr(ContiguousKVStore, name):
            raise AttributeError(name)

        def each(*args: Any, **kwargs: Any) -> Any:
            results = [getattr(store, name)(*args, **kwargs) for store in stores.values()]
            return results[0]
        return each


class ShardedExecutor(NumpyExecutor):
    """`NumpyExecutor` over a `ShardedModel`, each GPU with its own KV store."""

    def __init__(self, model: NumpyModel, retains_kv: bool, max_model_len: int) -> None:
        if not isinstance(model, ShardedModel):
            raise ConfigError("ShardedExecutor needs a ShardedModel")
        super().__init__(model, retains_kv, max_model_len)
        # per-GPU contiguous contents; the KV manager (any kind) still decides admission
        self.store = RankedKVStore(model, model.dtype)  # type: ignore[assignment]
