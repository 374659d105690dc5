"""The buddy allocator (cache/buddy.py) and the contiguous KV manager that places its slabs with
it: conservation (free + allocated = total), no overlap, buddies merge back, and external
fragmentation measured."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from cache.buddy import BuddyAllocator, chunk_order
from cache.contiguous import ContiguousKVCache
from sim.core.errors import ConfigError
from sim.core.request import Request, SamplingParams


def test_split_and_merge_back_to_one_chunk() -> None:
    buddy = BuddyAllocator(64)
    a, b, c = buddy.allocate(8), buddy.allocate(8), buddy.allocate(16)
    assert (a, b, c) == (0, 8, 16)  # lowest address first, split from the one 64 chunk
    assert buddy.free_chunks() == [(32, 32)]
    for offset in (b, c, a):
        buddy.free(offset)
    assert buddy.free_chunks() == [(0, 64)]  # every buddy merged again


def test_external_fragmentation_refuses_a_chunk_that_the_free_total_would_hold() -> None:
    buddy = BuddyAllocator(64)
    offsets = [buddy.allocate(16) for _ in range(4)]
    buddy.free(offsets[0])
    buddy.free(offsets[2])  # 32 units free, but in two 16-unit chunks that are not buddies
    assert buddy.num_free_units == 32
    assert buddy.allocate(32) is None
    assert buddy.external_fragmentation(32) == 32
    assert buddy.external_fragmentation(16) == 0


def test_exact_allocation_gives_the_tail_back() -> None:
    buddy = BuddyAllocator(64)
    offset = buddy.allocate(20, exact=True)  # a 32 chunk: keep 16 + 4, free 8 and 4
    assert offset == 0 and buddy.allocated_units(0) == 20
    assert buddy.num_free_units == 44
    assert buddy.free_chunks() == [(20, 4), (24, 8), (32, 32)]
    buddy.free(offset)
    assert buddy.free_chunks() == [(0, 64)]


def test_a_pool_that_is_not_a_power_of_two_never_merges_across_roots() -> None:
    buddy = BuddyAllocator(12)  # roots 8 + 4
    assert buddy.free_chunks() == [(0, 8), (8, 4)]
    assert buddy.max_chunk_units == 8
    assert buddy.allocate(16) is None
    first, second = buddy.allocate(4), buddy.allocate(4)
    assert (first, second) == (8, 0)  # smallest free chunk that fits first (best fit)
    buddy.free(first)
    buddy.free(second)
    assert buddy.free_chunks() == [(0, 8), (8, 4)]


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ConfigError, match="num_units"):
        BuddyAllocator(-1)
    with pytest.raises(ValueError, match="no allocation"):
        BuddyAllocator(8).free(0)


class BuddyMachine(RuleBasedStateMachine):
    """Random allocate/free sequences against a model of which units each allocation holds."""

    def __init__(self) -> None:
        super().__init__()
        self.buddy: BuddyAllocator | None = None
        self.held: dict[int, tuple[int, int]] = {}  # offset -> (units asked, units held)

    @precondition(lambda self: self.buddy is None)
    @rule(num_units=st.integers(0, 300))
    def create(self, num_units: int) -> None:
        self.buddy = BuddyAllocator(num_units)

    @precondition(lambda self: self.buddy is not None)
    @rule(num_units=st.integers(1, 128), exact=st.booleans())
    def allocate(self, num_units: int, exact: bool) -> None:
        assert self.buddy is not None
        can = self.buddy.largest_free_units() >= 1 << chunk_order(num_units)
        offset = self.buddy.allocate(num_units, exact=exact)
        assert (offset is not None) == can  # refused only when no chunk is large enough
        if offset is not None:
            held = self.buddy.allocated_units(offset)
            assert held == (num_units if exact else 1 << chunk_order(num_units))
            self.held[offset] = (num_units, held)

    @precondition(lambda self: bool(self.held))
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        assert self.buddy is not None
        offset = data.draw(st.sampled_from(sorted(self.held)))
        del self.held[offset]
        self.buddy.free(offset)

    @invariant()
    def conserved_and_disjoint(self) -> None:
        if self.buddy is None:
            return
        buddy = self.buddy
        allocated = sum(held for _, held in self.held.values())
        assert buddy.num_allocated_units == allocated
        assert buddy.num_free_units + buddy.num_allocated_units == buddy.num_units
        chunks = sorted(buddy.free_chunks() + buddy.allocated_chunks())
        # free and allocated chunks tile the pool exactly: no overlap, no gap
        position = 0
        for offset, size in chunks:
            assert offset == position and size & (size - 1) == 0 and offset % size == 0
            position += size
        assert position == buddy.num_units
        assert sum(size for _, size in buddy.free_chunks()) == buddy.num_free_units
        # buddies merge: no two free buddies of one size stay apart (within one root)
        free = set(buddy.free_chunks())
        for offset, size in free:
            partner = (offset ^ size, size)
            if partner in free:
                root_sizes = [s for o, s in _roots(buddy.num_units)
                              if o <= offset < o + s]
                assert root_sizes and root_sizes[0] == size
        if not self.held:
            assert buddy.free_chunks() == _roots(buddy.num_units)  # all merged back

    @invariant()
    def external_fragmentation_is_free_memory_in_small_chunks(self) -> None:
        if self.buddy is None:
            return
        for num_units in (1, 7, 64):
            expected = sum(size for _, size in self.buddy.free_chunks()
                           if size < 1 << chunk_order(num_units))
            assert self.buddy.external_fragmentation(num_units) == expected


def _roots(num_units: int) -> list[tuple[int, int]]:
    roots, offset = [], 0
    for bit in reversed(range(num_units.bit_length())):
        if num_units >> bit & 1:
            roots.append((offset, 1 << bit))
            offset += 1 << bit
    return roots


TestBuddyMachine = BuddyMachine.TestCase
TestBuddyMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def _request(rid: str, num_prompt: int, max_tokens: int) -> Request:
    return Request(rid, 0, num_prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                   arrival_s=0.0)


def test_contiguous_oracle_reports_external_fragmentation() -> None:
    # 2048 slots; each request's limit is 500 tokens: four fit in 512-token chunks, and the
    # 12-token tails given back cannot hold a fifth 500-token reservation
    kv = ContiguousKVCache(2048, 1024, "oracle")
    requests = [_request(f"r{i}", 200, 300) for i in range(5)]
    assert [kv.allocate(r, 200) for r in requests] == [True] * 4 + [False]
    parts = kv.fragmentation()
    assert parts == {"used_tokens": 800, "reserved_unused_tokens": 1200,
                     "internal_frag_tokens": 0, "external_frag_tokens": 48, "free_tokens": 0}
    assert sum(parts.values()) == 2048
    for r in requests[:4]:
        kv.free(r)
    assert kv.fragmentation()["free_tokens"] == 2048 - kv.fragmentation()["external_frag_tokens"]
    assert kv.num_free_tokens() == 2048


def test_contiguous_pow2_chunk_past_the_limit_is_internal_fragmentation() -> None:
    kv = ContiguousKVCache(2048, 1024, "pow2")
    assert kv.allocate(_request("a", 200, 300), 200)
    parts = kv.fragmentation()
    assert parts["internal_frag_tokens"] == 12 and parts["reserved_unused_tokens"] == 300
