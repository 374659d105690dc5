"""The quality cost of a lossy KV cache, measured on the functional model.

`kv_quality(model, token_ids, kv_cache_dtype)` teacher-forces a text through the model with its
K/V stored in a paged store of that dtype (`sim.model.kv_quant`) and compares the next-token
distributions with the unmodified model's (`sim.model.quality`: perplexity, KL, top-1 agreement).
`kv_quality_table` does it for several settings and adds each one's KV capacity on a target GPU,
the capacity-quality trade-off in one table. `eviction_quality` measures KV eviction
(`cache.kv_eviction`), alone or combined with an 8-bit `kv_cache_dtype`, against full-precision,
full KV.

Per-token, per-head scales make the stored values independent of how the text is chunked, so
one prefill gives the logits token-by-token decoding would (up to float rounding, ~1e-15).

References: `sim.model.quality` (metrics); Hooper et al. 2024 (KVQuant) and Liu et al. 2024 (KIVI) for
this evaluation of KV quantization.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from cache.kv_eviction import EvictingModel, KVEviction
from sim.model.kv_quant import kv_codec
from sim.model.kv_store import ContiguousKVStore
from sim.model.numpy_model import NumpyModel
from sim.model.paged_store import PagedKVStore
from sim.model.quality import QualityReport, compare, reference_logits, teacher_forced_logits


def kv_logits(model: NumpyModel, token_ids: Sequence[int] | np.ndarray,
              kv_cache_dtype: str = "auto", block_size: int = 16,
              chunk_size: int | None = None) -> np.ndarray:
    """Logits `[n, n_vocab]` at every position with the K/V kept in a paged store of
    `kv_cache_dtype`."""
    c = model.config
    n = len(token_ids)
    store = PagedKVStore(c.n_layer, c.n_kv_head, c.d_head, block_size, model.dtype,
                         codec=kv_codec(kv_cache_dtype))
    store.prepare("eval", range(-(-n // block_size)), 0)
    return teacher_forced_logits(model, token_ids, store, chunk_size, seq_id="eval")


def eviction_logits(model: NumpyModel, token_ids: Sequence[int] | np.ndarray,
                    eviction: KVEviction, chunk_size: int | None = None,
                    block_size: int | None = 16, kv_cache_dtype: str = "auto") -> np.ndarray:
    """Logits `[n, n_vocab]` at every position when attention reads only what `eviction`
    keeps (`cache.kv_eviction`; each query sees what decoding it would, whatever the chunking),
    with the K/V in a paged store of `block_size` and `kv_cache_dtype` as the engine keeps them
    (H2O in compacted slots), or, with `block_size=None`, masked over a contiguous store that
    keeps the same quantize-dequantized K/V (the reference)."""
    evicting: Any = EvictingModel(model, eviction)  # NumpyModel's forward_step interface
    c = model.config
    codec = kv_codec(kv_cache_dtype)
    if block_size is None:
        flat = ContiguousKVStore(c.n_layer, c.n_kv_head, c.d_head, model.dtype, codec=codec)
        return teacher_forced_logits(evicting, token_ids, flat, chunk_size)
    store = PagedKVStore(c.n_layer, c.n_kv_head, c.d_head, block_size, model.dtype,
                         codec=codec)
    store.prepare("eval", range(-(-len(token_ids) // block_size)), 0)  # slots never exceed n
    return teacher_forced_logits(evicting, token_ids, store, chunk_size, seq_id="eval")


def eviction_quality(model: NumpyModel, token_ids: Sequence[int] | np.ndarray,
                     eviction: KVEviction, reference: np.ndarray | None = None,
                     kv_cache_dtype: str = "auto") -> QualityReport:
    """Perplexity, next-token KL and top-1 agreement of an evicting KV cache (its K/V stored
    in `kv_cache_dtype`: eviction and 8-bit KV combined) against full, unquantized KV."""
    ref = reference_logits(model, token_ids) if reference is None else reference
    return compare(ref, eviction_logits(model, token_ids, eviction,
                                        kv_cache_dtype=kv_cache_dtype), token_ids)


def kv_quality(model: NumpyModel, token_ids: Sequence[int] | np.ndarray,
               kv_cache_dtype: str, reference: np.ndarray | None = None) -> QualityReport:
    """Perplexity, next-token KL and top-1 agreement of a `kv_cache_dtype` KV cache against the
    unmodified model (`reference`: its logits, if already computed)."""
    ref = reference_logits(model, token_ids) if reference is None else reference
    return compare(ref, kv_logits(model, token_ids, kv_cache_dtype), token_ids)


def kv_quality_table(model: NumpyModel, token_ids: Sequence[int] | np.ndarray,
                     kv_cache_dtypes: Sequence[str] = ("auto", "int8", "fp8_e4m3", "fp8_e5m2"),
                     capacity: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """One row per KV dtype: its quality report, and its KV tokens from `capacity` if given."""
    ref = reference_logits(model, token_ids)  # [n, n_vocab]
    rows = []
    for dtype in kv_cache_dtypes:
        row: dict[str, Any] = {"kv_cache_dtype": dtype}
        if capacity is not None:
            row["num_kv_tokens"] = capacity[dtype]
        row.update(kv_quality(model, token_ids, dtype, ref).as_dict())
        rows.append(row)
    return rows
