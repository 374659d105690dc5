"""ContiguousKVStore: contents, reservations, rollback, and the errors that catch misuse."""

from __future__ import annotations

import numpy as np
import pytest

from sim.core.errors import InfersimError
from sim.core.protocols import KVStore
from sim.model.kv_store import ContiguousKVStore

RNG = np.random.default_rng(0)


def _kv(n: int) -> tuple[np.ndarray, np.ndarray]:
    return RNG.standard_normal((n, 2, 3)), RNG.standard_normal((n, 2, 3))


def test_write_then_read_in_pieces() -> None:
    store: KVStore = ContiguousKVStore(n_layer=2, n_kv_head=2, d_head=3, dtype="float64")
    assert isinstance(store, ContiguousKVStore)
    store.allocate("s", 10)
    k1, v1 = _kv(4)
    k2, v2 = _kv(3)
    for layer in range(2):
        store.write("s", layer, 0, k1, v1)
        store.write("s", layer, 4, k2, v2)
    k, v = store.read("s", 1, 7)
    np.testing.assert_array_equal(k, np.concatenate([k1, k2]))
    np.testing.assert_array_equal(v, np.concatenate([v1, v2]))
    assert store.num_tokens("s") == 7 and store.capacity("s") == 10
    assert store.read("s", 0, 5)[0].shape == (5, 2, 3)


def test_reservation_and_gaps_are_enforced() -> None:
    store = ContiguousKVStore(1, 2, 3, "float32")
    store.allocate(1, 4)
    with pytest.raises(InfersimError, match="reservation"):
        store.write(1, 0, 0, *_kv(5))
    with pytest.raises(InfersimError, match="gap"):
        store.write(1, 0, 1, *_kv(1))
    store.write(1, 0, 0, *_kv(2))
    with pytest.raises(InfersimError, match="only 0..1 are written"):
        store.read(1, 0, 3)
    with pytest.raises(InfersimError, match="shape"):
        store.write(1, 0, 2, np.zeros((1, 2, 4)), np.zeros((1, 2, 4)))
    with pytest.raises(InfersimError, match="already allocated"):
        store.allocate(1, 4)
    with pytest.raises(InfersimError, match="not allocated"):
        store.read(2, 0, 0)


def test_truncate_grow_free() -> None:
    store = ContiguousKVStore(1, 2, 3, "float64")
    store.allocate("a", 3)
    k, v = _kv(3)
    store.write("a", 0, 0, k, v)
    store.truncate("a", 1)  # e.g. two rejected draft tokens
    assert store.num_tokens("a") == 1
    with pytest.raises(InfersimError):
        store.read("a", 0, 2)
    store.grow("a", 6)
    k2, v2 = _kv(5)
    store.write("a", 0, 1, k2, v2)
    np.testing.assert_array_equal(store.read("a", 0, 6)[0], np.concatenate([k[:1], k2]))
    assert store.has("a") and store.num_sequences == 1
    store.free("a")
    assert not store.has("a") and store.num_sequences == 0
    with pytest.raises(InfersimError):
        store.free("a")


def test_store_casts_to_its_dtype() -> None:
    store = ContiguousKVStore(1, 2, 3, "float32")
    store.allocate(0, 2)
    store.write(0, 0, 0, *_kv(2))
    assert store.read(0, 0, 2)[0].dtype == np.float32
