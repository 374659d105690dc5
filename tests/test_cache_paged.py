"""Paged KV: the block pool, the manager's block tables, the paged NumPy store, and the
contiguous reservation baselines."""

from __future__ import annotations

import numpy as np
import pytest

from cache.block_pool import BlockPool, block_hashes
from cache.contiguous import ContiguousKVCache
from cache.paged import PagedKVCache
from sim.core.errors import InfersimError
from sim.core.request import Request, SamplingParams
from sim.core.step import BlockOp
from sim.model.kv_store import ContiguousKVStore
from sim.model.paged_store import PagedKVStore


def req(rid: str, ids: list[int] | None = None, n: int = 10, max_tokens: int = 8) -> Request:
    ids = ids if ids is not None else list(range(n))
    return Request(request_id=rid, index=0, num_prompt_tokens=len(ids),
                   sampling=SamplingParams(max_tokens=max_tokens), arrival_s=0.0,
                   prompt_token_ids=ids, keep_tokens=False)


def test_block_hashes_are_chained_and_deterministic():
    a = block_hashes([1, 2, 3, 4, 5, 6, 7], 2)
    assert len(a) == 3  # full blocks only
    assert a == block_hashes([1, 2, 3, 4, 5, 6], 2)
    b = block_hashes([9, 9, 3, 4], 2)
    assert b[1] != a[1]  # same block tokens, different prefix: different hash
    assert block_hashes([5, 6], 2, parent=a[1]) == a[2:]  # incremental extension


def test_pool_free_list_lowest_first_and_double_free():
    pool = BlockPool(4, 16)
    assert pool.take_new(2) == [0, 1]
    pool.release([1])
    assert pool.take_new(1) == [1]
    pool.release([0, 1])
    with pytest.raises(InfersimError, match="double free"):
        pool.release([0])
    with pytest.raises(InfersimError):
        pool.take_new(5)
    pool.check()


def test_pool_lru_evicts_least_recently_released_cached_block():
    pool = BlockPool(3, 1)
    blocks = pool.take_new(3)
    for b in blocks:
        pool.register(b, bytes([b]))
    pool.release([2, 0, 1])  # 2 is the least recently released
    assert pool.num_free_blocks() == 3 and pool.num_cached_free_blocks() == 3
    assert pool.take_new(1) == [2] and pool.lookup(bytes([2])) is None
    assert pool.lookup(bytes([0])) == 0
    pool.take_cached(0)  # revive
    assert pool.ref_count[0] == 1 and pool.num_free_blocks() == 1
    pool.check()


def test_paged_allocates_block_by_block_and_frees_everything():
    kv = PagedKVCache(num_blocks=8, block_size=4)
    r = req("a", n=5)
    assert kv.allocate(r, 5) and len(kv.block_table("a")) == 2
    assert kv.capacity(r) == 8 and kv.num_used_tokens() == 5
    usage = kv.usage()
    assert (usage.num_used_tokens, usage.num_internal_frag_tokens, usage.num_free_tokens) == (5, 3, 24)
    assert kv.allocate(r, 9) and len(kv.block_table("a")) == 3
    assert not kv.allocate(r, 33)  # all or nothing
    assert len(kv.block_table("a")) == 3
    kv.check()
    kv.free(r)
    assert kv.num_free_tokens() == 32 and kv.num_used_tokens() == 0
    kv.check()


def test_paged_never_fits_says_why():
    kv = PagedKVCache(num_blocks=2, block_size=4)
    assert kv.never_fits(req("a"), 8) is None
    assert "blocks" in kv.never_fits(req("a"), 9)


def test_prefix_cache_hit_is_block_aligned_and_leaves_one_token():
    kv = PagedKVCache(num_blocks=16, block_size=4, enable_prefix_caching=True)
    a = req("a", list(range(12)))
    assert kv.cached_prefix(a) == 0
    assert kv.allocate(a, 12)
    same = req("b", list(range(12)))
    assert kv.cached_prefix(same) == 8  # all 12 cached, but the last token must be computed
    longer = req("c", [*list(range(10)), 99, 98, 97])
    assert kv.cached_prefix(longer) == 8
    assert kv.allocate(longer, 13, num_cached_tokens=8)
    assert kv.block_table("c")[:2] == kv.block_table("a")[:2]
    assert kv.num_used_tokens() == 12 + 13 - 8  # shared blocks count once
    kv.check()
    kv.free(a)
    kv.free(longer)
    assert kv.num_free_tokens() == 64
    # still cached after release, until evicted
    assert kv.cached_prefix(req("d", list(range(12)))) == 8
    kv.check()
    assert kv.hit_rate == pytest.approx(8 / 25)


def test_swap_preemption_queues_block_copies_and_restores():
    kv = PagedKVCache(num_blocks=4, block_size=4, preemption_mode="swap", num_swap_blocks=2)
    r = req("a", n=6)
    assert kv.allocate(r, 6)
    table = list(kv.block_table("a"))
    assert kv.preempt(r) is True
    assert kv.num_free_tokens() == 16
    _, out = kv.take_step_kv(())
    assert out.ops == (BlockOp("out", table[0], 0), BlockOp("out", table[1], 1))
    assert (out.num_swapped_out_blocks, out.num_swapped_in_blocks) == (2, 0)
    assert kv.allocate(r, 7)
    _, back = kv.take_step_kv(())
    assert [op.kind for op in back.ops] == ["in", "in"]
    assert (back.num_swapped_out_blocks, back.num_swapped_in_blocks) == (0, 2)
    kv.check()
    big = req("b", n=12)
    kv.free(r)
    assert kv.allocate(big, 12)
    assert kv.preempt(big) is False  # 3 blocks > 2 swap blocks: falls back to recompute
    assert kv.num_free_tokens() == 16
    kv.check()


@pytest.mark.parametrize("reservation,expected", [("max_len", 2048), ("pow2", 128), ("oracle", 100)])
def test_contiguous_reservations(reservation, expected):
    kv = ContiguousKVCache(10_000, 2048, reservation)
    r = req("a", n=60, max_tokens=40)
    assert kv.reservation_tokens(r) == expected
    assert kv.allocate(r, 60) and kv.num_reserved_tokens() == expected
    usage = kv.usage()
    assert usage.num_used_tokens == 60 and usage.num_reserved_tokens == 40
    assert usage.num_internal_frag_tokens == expected - 100
    assert usage.real_token_fraction == pytest.approx(60 / expected)


@pytest.mark.parametrize("block_size", [1, 3, 16])
def test_paged_store_reads_what_contiguous_store_reads(block_size):
    rng = np.random.default_rng(0)
    n_layer, n_kv, d = 2, 2, 4
    paged = PagedKVStore(n_layer, n_kv, d, block_size, "float64")
    cont = ContiguousKVStore(n_layer, n_kv, d, "float64")
    n = 11
    table = rng.permutation(20)[: -(-n // block_size)].tolist()  # scattered physical blocks
    paged.prepare("s", table, 0)
    cont.allocate("s", n)
    for start, stop in ((0, 7), (7, 8), (8, 11)):
        for layer in range(n_layer):
            k = rng.normal(size=(stop - start, n_kv, d))  # [n_new, n_kv, d]
            v = rng.normal(size=(stop - start, n_kv, d))  # [n_new, n_kv, d]
            paged.write("s", layer, start, k, v)
            cont.write("s", layer, start, k, v)
    for layer in range(n_layer):
        for end in (1, 5, 11):
            for x, y in zip(paged.read("s", layer, end), cont.read("s", layer, end), strict=True):
                np.testing.assert_array_equal(x, y)
    with pytest.raises(InfersimError, match="only"):
        paged.read("s", 0, 12)
    with pytest.raises(InfersimError, match="gap|past"):
        paged.write("s", 0, 12, np.zeros((1, n_kv, d)), np.zeros((1, n_kv, d)))
    # swap a block out and back in elsewhere
    paged.apply_ops([("out", table[0], 5)])
    paged.pool[:, :, table[0]] = 0
    new_table = [30, *table[1:]]
    paged.apply_ops([("in", 5, 30)])
    paged.prepare("s", new_table, 11)
    for x, y in zip(paged.read("s", 1, 11), cont.read("s", 1, 11), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("window", [None, 5])
def test_paged_gather_gives_identical_decode_attention(window):
    """The one-gather padded batch equals the per-sequence read path bit for bit."""
    from sim.model.numpy_model import NumpyModel, SeqChunk
    from sim.model.zoo import resolve_model

    rng = np.random.default_rng(1)
    cfg = resolve_model("meta-llama/Llama-2-7b-hf").replace(n_layer=1, n_head=4, n_kv_head=2,
                                                            d_head=8, n_embd=32)
    model = NumpyModel(cfg, weights=None, dtype="float64")  # type: ignore[arg-type]
    paged = PagedKVStore(1, 2, 8, 4, "float64")
    cont = ContiguousKVStore(1, 2, 8, "float64")
    lengths = [3, 9, 14]
    chunks = []
    for s, n in enumerate(lengths):
        k, v = rng.normal(size=(2, n, 2, 8))  # [n, n_kv, d] x2
        cont.allocate(s, n)
        cont.write(s, 0, 0, k, v)
        paged.prepare(s, rng.permutation(40)[: -(-n // 4)].tolist(), 0)
        paged.write(s, 0, 0, k, v)
        chunks.append(SeqChunk(s, np.zeros(1, dtype=np.int64), n - 1))
    q = rng.normal(size=(3, 4, 8))  # [n_seq, n_head, d]
    q_pos = np.asarray(lengths) - 1  # [n_seq]
    a = model._decode_attention(0, chunks, q, q_pos, cont, window).copy()
    b = model._decode_attention(0, chunks, q, q_pos, paged, window)
    np.testing.assert_array_equal(a, b)
