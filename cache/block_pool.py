"""The physical KV block pool: free list, reference counts, and the prefix cache's hash index.

A pool of `num_blocks` fixed-size blocks (each holds the K/V of `block_size` tokens). A block is
either *referenced* (reference count >= 1: in some request's block table), *cached* (count 0, but
its contents are still valid and indexed by the hash of the tokens it holds, so a later request
with the same prefix can take it back), or *free* (count 0, no contents). New blocks come from
the free list first (lowest id first, so a NumPy block store grows only as far as the peak use)
and otherwise by evicting the least recently released cached block (LRU).

Block hashes are chained: a block's hash covers its parent's hash and its own token ids, so equal
hashes mean equal *prefixes*, not merely equal blocks. They use SHA-256 over the token ids as
little-endian int64 (never Python's per-process salted `hash`), so runs are reproducible.

References: Kwon et al., SOSP'23 (PagedAttention: block tables, reference counts, copy-on-write);
vLLM `vllm/v1/core/block_pool.py` and `kv_cache_utils.py` (chained block hashes, LRU free queue);
Zheng et al., "SGLang" (2024) for prefix reuse across requests.
"""

from __future__ import annotations

import hashlib
import heapq
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from sim.core.errors import InfersimError

#: the parent hash of a sequence's first block
ROOT_HASH = hashlib.sha256(b"infersim-prefix-cache-v1").digest()


def block_hashes(token_ids: Sequence[int] | np.ndarray, block_size: int,
                 parent: bytes = ROOT_HASH, start_block: int = 0) -> list[bytes]:
    """Chained hashes of the *full* blocks of `token_ids`, from block `start_block` on.

    `parent` is the hash of block `start_block - 1` (ROOT_HASH for block 0), so hashes can be
    extended incrementally as a sequence grows.
    """
    ids = np.asarray(token_ids, dtype="<i8")  # [n_tok]
    num_full = ids.shape[0] // block_size
    out = []
    for b in range(start_block, num_full):
        parent = hashlib.sha256(parent + ids[b * block_size:(b + 1) * block_size].tobytes()).digest()
        out.append(parent)
    return out


class BlockPool:
    """Reference-counted KV blocks with an LRU cache of released, still-valid blocks."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 0 or block_size < 1:
            raise InfersimError(f"BlockPool: need num_blocks >= 0 and block_size >= 1, got "
                                f"{num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # Lazy: only blocks handed out at least once have a count and may sit in `_free`; ids
        # from `_num_touched` up are fresh. Every id in `_free` is below them, so popping
        # `_free` first, then the next fresh id, hands out the lowest free id as a heap of all
        # ids would, without a per-block list of a pool given in millions of blocks.
        self.ref_count: list[int] = []  # [num_touched] references per block
        self._free: list[int] = []  # a heap of released ids: lowest id first
        self._num_touched = 0
        #: hand out the lowest free id first (a NumPy block store then grows only as far as
        #: the peak use). False when block ids are never read (timing-only runs): released ids
        #: then form a stack, taken and returned in bulk; which ids a request holds never
        #: changes a decision (counts, reference counts and the LRU cache are the same)
        self.lowest_first = True
        self._cached_free: OrderedDict[int, None] = OrderedDict()  # count 0, valid; LRU first
        self._hash_to_block: dict[bytes, int] = {}
        self._block_hash: dict[int, bytes] = {}
        self.num_evictions = 0
        self.num_extra_refs = 0  # sum over blocks of max(ref_count - 1, 0): sharing

    # ------------------------------------------------------------------ queries
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now (free, or cached and evictable)."""
        return len(self._free) + (self.num_blocks - self._num_touched) + len(self._cached_free)

    def num_cached_free_blocks(self) -> int:
        return len(self._cached_free)

    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks()

    def references(self, block: int) -> int:
        """Reference count of `block` (0 for one never handed out: the pool is lazy)."""
        return self.ref_count[block] if block < self._num_touched else 0

    def lookup(self, block_hash: bytes) -> int | None:
        """The block holding this chained hash, if cached (referenced or not)."""
        return self._hash_to_block.get(block_hash)

    # ------------------------------------------------------------------ changes
    def take_new(self, num: int) -> list[int]:
        """`num` fresh blocks with reference count 1 (evicting LRU cached blocks if needed)."""
        if num > self.num_free_blocks():
            raise InfersimError(f"BlockPool: asked for {num} blocks, only "
                                f"{self.num_free_blocks()} free; check num_free_blocks() first")
        free = self._free
        if not self.lowest_first and num <= len(free):  # the bulk path: no heap, no eviction
            out = free[len(free) - num:]
            del free[len(free) - num:]
            ref_count = self.ref_count
            for block in out:
                ref_count[block] = 1
            return out
        out = []
        for _ in range(num):
            if free:
                block = heapq.heappop(free) if self.lowest_first else free.pop()
            elif self._num_touched < self.num_blocks:
                block = self._num_touched
                self._num_touched += 1
                self.ref_count.append(0)
            else:
                block, _ = self._cached_free.popitem(last=False)
                del self._hash_to_block[self._block_hash.pop(block)]
                self.num_evictions += 1
            self.ref_count[block] = 1
            out.append(block)
        return out

    def take_cached(self, block: int) -> None:
        """Take one more reference on a cached block (found by `lookup`)."""
        if block not in self._block_hash:
            raise InfersimError(f"BlockPool: block {block} is not cached")
        if self.ref_count[block] == 0:
            del self._cached_free[block]
        else:
            self.num_extra_refs += 1
        self.ref_count[block] += 1

    def incref(self, block: int) -> None:
        """One more reference on a referenced block (a forked sequence shares it)."""
        if self.ref_count[block] < 1:
            raise InfersimError(f"BlockPool: cannot share unreferenced block {block}")
        self.ref_count[block] += 1
        self.num_extra_refs += 1

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference on each block, in order; cached blocks whose count reaches 0 stay
        valid and join the LRU end (so release a table tail-first: tails are evicted first)."""
        for block in blocks:
            count = self.ref_count[block]
            if count <= 0:
                raise InfersimError(f"BlockPool: double free of block {block}")
            self.ref_count[block] = count - 1
            if count > 1:
                self.num_extra_refs -= 1
            elif count == 1:
                if block in self._block_hash:
                    self._cached_free[block] = None
                elif self.lowest_first:
                    heapq.heappush(self._free, block)
                else:
                    self._free.append(block)

    def register(self, block: int, block_hash: bytes) -> bool:
        """Index a full, referenced block under its chained hash (False if the hash is already
        held by another block, or the block already has a hash: it then stays as it is)."""
        if self.ref_count[block] < 1:
            raise InfersimError(f"BlockPool: cannot cache unreferenced block {block}")
        if block_hash in self._hash_to_block or block in self._block_hash:
            return False
        self._hash_to_block[block_hash] = block
        self._block_hash[block] = block_hash
        return True

    def check(self) -> None:
        """Internal consistency (tests): every block is in exactly one state."""
        free = set(self._free)
        cached_free = set(self._cached_free)
        assert len(free) == len(self._free) and not free & cached_free
        assert len(self.ref_count) == self._num_touched <= self.num_blocks
        for block, count in enumerate(self.ref_count):
            assert count >= 0
            assert (count == 0) == (block in free or block in cached_free), block
            assert (block in cached_free) <= (block in self._block_hash)
            assert (block in free) <= (block not in self._block_hash)
        assert {b: h for h, b in self._hash_to_block.items()} == self._block_hash
        assert self.num_extra_refs == sum(max(c - 1, 0) for c in self.ref_count)
