"""Paged KV cache accounting (PagedAttention): block tables over a shared block pool.

KV memory is cut into blocks of `block_size` tokens; a request holds a *block table* (logical
block i -> physical block id) that grows one block at a time as it produces tokens, so at most
`block_size - 1` slots per request are wasted (the unfilled tail of its last block), instead of a
whole `max_model_len` reservation.

With `enable_prefix_caching`, every full block is indexed by the chained hash of the tokens up to
its end (`cache.prefix_index`). A new request whose prompt starts with cached blocks shares them
by reference count, and its progress counter starts after them: those tokens are never recomputed.
At least one token is always computed (its logits give the first output token), so a hit covers
at most the full blocks before the last token. Released cached blocks stay valid until the pool
needs room, then the least recently released is evicted (LRU).

Preemption (`preempt`): `recompute` frees the request's blocks (its progress restarts at 0;
cached blocks may give part of it back); `swap` copies them to host blocks (`cache.swap_space`) and
back on resumption, each move priced over the profile's host link by the engine. With too little
swap space left, a swap falls back to recompute. Under KV eviction a swap first releases the
blocks no later query reads, then moves only the kept ones: released entries stay -1 in the
table that comes back (sliding window, StreamingLLM), H2O's compacted slots come back in order.
The block copies the contents side must do are queued in order as `sim.core.step.BlockOp`s:
("out", gpu_block, host_block), ("in", host_block, gpu_block), and ("copy", src_block,
dst_block) for copy-on-write after `fork`. The scheduler takes them, with their counts for the
pricer and each scheduled sequence's block table, into the step's plan (`take_step_kv`), so
the executor never reads this manager.

References: Kwon et al., SOSP'23 (PagedAttention, sections 4.2-4.5: block tables, sharing,
swapping and recomputation); vLLM `vllm/v1/core/kv_cache_manager.py` (prefix caching, hit only
up to `num_tokens - 1`) and vLLM v0 `block_manager` (swap space in GiB).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from cache.block_pool import BlockPool
from cache.kv_eviction import KVEviction
from cache.prefix_index import PrefixIndex
from cache.swap_space import SwapSpace
from sim.core.errors import InfersimError
from sim.core.request import Request
from sim.core.step import NO_KV_WORK, BlockOp, ScheduledSeq, SeqKV, StepKV
from sim.core.usage import KVMemoryUsage

PREEMPTION_MODES = ("recompute", "swap")


class PagedKVCache:
    """Block tables, reference counts and (optionally) prefix caching and swap space."""

    retains_kv = True

    def __init__(self, num_blocks: int, block_size: int = 16, *,
                 enable_prefix_caching: bool = False, preemption_mode: str = "recompute",
                 num_swap_blocks: int = 0, eviction: KVEviction | None = None) -> None:
        if preemption_mode not in PREEMPTION_MODES:
            raise InfersimError(f"preemption_mode={preemption_mode!r} is not one of "
                                f"{', '.join(PREEMPTION_MODES)}")
        self.pool = BlockPool(num_blocks, block_size)
        self.block_size = block_size
        self.num_kv_tokens = num_blocks * block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.preemption_mode = preemption_mode
        self.swap = SwapSpace(num_swap_blocks)  # host blocks of swapped-out requests
        # KV eviction (cache.kv_eviction): a request's blocks stop growing at the kept budget.
        # Sliding window / StreamingLLM: blocks no later query reads go back to the pool (their
        # table entries become -1). H2O: the kept KV is compacted into the table's first slots
        # after each step, and the tail blocks past a step's need go back to the pool.
        self.eviction = eviction
        self._frees = eviction is not None
        self._evicted_upto: dict[str, int] = {}  # request_id -> table entries checked so far
        self.num_evicted_blocks = 0  # blocks released by KV eviction (metric)
        self._tables: dict[str, list[int]] = {}
        self._num_tokens: dict[str, int] = {}
        self._sum_tokens = 0
        self.prefix = PrefixIndex(self.pool)  # block hashes (prefix caching)
        self._ops: list[BlockOp] = []  # block copies since the last take_step_kv(), in order
        #: queue block copies and give block tables for a contents store (False in timing-only
        #: runs: none reads them, and the counts are kept either way)
        self.record_block_ops = True
        self._pending_copies = 0  # copy-on-write block copies since the last take_step_kv()
        self._forked = False  # a fork may share a partly filled block
        # no fork, prefix caching or eviction: an allocation within the held blocks only moves
        # the token count (the common decode step's fast path)
        self._plain = not (enable_prefix_caching or eviction is not None)
        # with prefix caching, a request without token ids has nothing to hash or share: its
        # allocations within its held blocks take the fast path too (no fork, no eviction)
        self._plain_without_ids = eviction is None

    # ------------------------------------------------------------------ KVCacheManager
    def never_fits(self, request: Request, max_len: int) -> str | None:
        need = self._blocks_for(max_len)
        if self.eviction is not None:
            need = self.eviction.max_held_blocks(request.num_prompt_tokens, max_len,
                                                 self.block_size)
        if need > self.pool.num_blocks:
            return (f"larger than the KV cache: {max_len} tokens need {need} blocks of "
                    f"{self.block_size} > the whole pool ({self.pool.num_blocks} blocks); lower "
                    "max_tokens or max_model_len, or use a larger GPU")
        return None

    def cached_prefix(self, request: Request) -> int:
        """Tokens of the request's start whose KV is cached (whole blocks, < num_tokens)."""
        return self.prefix.cached_prefix(request) if self.enable_prefix_caching else 0

    def allocate(self, request: Request, num_tokens: int, num_cached_tokens: int = 0) -> bool:
        """Blocks for the first `num_tokens` tokens (all or nothing). A request without blocks
        may first share `num_cached_tokens` (from `cached_prefix`) from the prefix cache."""
        rid = request.request_id
        table = self._tables.get(rid)
        if (table is not None and num_tokens <= len(table) * self.block_size and (
                self._plain or (self._plain_without_ids and request.prompt_token_ids is None))):
            # the common decode step: no new block, nothing shared, cached or evicted
            self._sum_tokens += num_tokens - self._num_tokens[rid]
            self._num_tokens[rid] = num_tokens
            return True
        pool = self.pool
        need = self._blocks_for(num_tokens, request.num_computed)
        if table is None:
            if self.swap.holds(rid):
                return self._swap_in(request, num_tokens)
            if num_cached_tokens and not self.enable_prefix_caching:
                raise InfersimError("allocate: num_cached_tokens needs enable_prefix_caching")
            hits = self.prefix.hit_blocks(request, num_cached_tokens) if num_cached_tokens else []
            num_revived = sum(1 for b in hits if pool.ref_count[b] == 0)
            if need - len(hits) + num_revived > pool.num_free_blocks():
                return False
            for block in hits:
                pool.take_cached(block)
            table = hits + pool.take_new(need - len(hits))
            self._tables[rid] = table
            self.prefix.admitted(request, len(hits), count=self.enable_prefix_caching)
        else:
            if self._frees:
                self._release_evicted(rid, table, request.num_computed, need)
            # copy-on-write: a block shared with a fork is copied before this step writes it
            old = self._num_tokens.get(rid, 0)
            cow = ([i for i in range(old // self.block_size, min(len(table), need))
                    if pool.ref_count[table[i]] > 1] if num_tokens > old else [])
            if max(need - len(table), 0) + len(cow) > pool.num_free_blocks():
                return False
            for i in cow:
                (fresh,) = pool.take_new(1)
                if self.record_block_ops:
                    self._ops.append(BlockOp("copy", table[i], fresh))
                self._pending_copies += 1
                pool.release([table[i]])
                table[i] = fresh
            if need > len(table):
                table.extend(pool.take_new(need - len(table)))
        self._sum_tokens += self._kept(num_tokens) - self._kept(self._num_tokens.get(rid, 0))
        self._num_tokens[rid] = num_tokens
        if self.enable_prefix_caching:
            self.prefix.register(request, table, num_tokens)
        return True

    def free(self, request: Request) -> None:
        self._drop_blocks(request.request_id)
        self.swap.free(request.request_id)

    def _drop_blocks(self, rid: str) -> None:
        """Release the request's GPU blocks and bookkeeping (not its host blocks)."""
        table = self._tables.pop(rid, None)
        if table is not None:
            self.pool.release([b for b in table[::-1] if b >= 0])  # tail first: evicted first
        self._evicted_upto.pop(rid, None)
        self._sum_tokens -= self._kept(self._num_tokens.pop(rid, 0))
        self.prefix.forget(rid)

    def preempt(self, request: Request) -> bool:
        """Take the request's blocks away; True if its KV was kept (swapped to host)."""
        rid = request.request_id
        table = self._tables.get(rid)
        if self.preemption_mode == "swap" and table is not None and self._frees:
            self._release_dead(rid, table, request.num_computed)  # no need to move those
        moves = (self.swap.swap_out(rid, table)
                 if self.preemption_mode == "swap" and table is not None else None)
        if moves is not None:  # each live entry to a host block; -1 (released) stays -1
            if self.record_block_ops:
                self._ops.extend(BlockOp("out", g, h) for g, h in moves)
            evicted_upto = self._evicted_upto.get(rid)
            self._drop_blocks(rid)
            if evicted_upto is not None:
                self._evicted_upto[rid] = evicted_upto
            return True
        self.free(request)
        return False

    def fork(self, parent: Request, child: Request, num_tokens: int | None = None) -> None:
        """`child` shares the blocks holding `parent`'s first `num_tokens` tokens (all of them
        by default) by reference (parallel sampling, beam search); a shared block is copied
        only when one of them writes into it (a partly filled last block included)."""
        cid, pid = child.request_id, parent.request_id
        table = self._tables.get(pid)
        if table is None or cid in self._tables or self.swap.holds(cid):
            raise InfersimError(f"fork: {pid!r} must hold blocks and {cid!r} none")
        held = self._num_tokens[pid]
        n = held if num_tokens is None else num_tokens
        if not 0 <= n <= held:
            raise InfersimError(f"fork: can share 0..{held} tokens of {pid!r}, asked for {n}")
        if self.eviction is not None:
            raise InfersimError("fork: not supported with KV eviction (evicted positions differ "
                                "per sequence); use kv_eviction=None for parallel sampling")
        shared = table[: -(-n // self.block_size)]
        for block in shared:
            self.pool.incref(block)
        self._forked = True
        self._plain = self._plain_without_ids = False
        self._tables[cid] = list(shared)
        self._num_tokens[cid] = n
        self._sum_tokens += n
        num_full = n // self.block_size  # hashes of the parent's later blocks may not be ours
        self.prefix.fork(pid, cid, num_full)

    def coast_growth(self, requests: Sequence[Request], max_steps: int) -> list[int]:
        """For plain-decode steps of `requests` (step j allocates `num_tokens + j` tokens of
        each, in order): the reserved KV tokens after each step's allocation, for as many steps
        (<= max_steps) as the pool surely serves by only taking fresh blocks. With prefix
        caching or forks an allocation may do more (register, copy-on-write): then only the
        steps that need no new block at all."""
        bs = self.block_size
        if self.eviction is not None:  # capped growth: priced step by step, never coasted
            return []
        num_tokens = np.array([r.num_tokens for r in requests])  # [n]
        held = np.array([len(self._tables[r.request_id]) for r in requests])  # [n] blocks
        used_blocks = self.pool.num_used_blocks()
        if self._forked and any(self.pool.ref_count[b] > 1 for r in requests
                                for b in self._tables[r.request_id][(r.num_tokens - 1) // bs:]):
            return []  # a step would write into a block shared with a fork: copy-on-write first
        if self.enable_prefix_caching or self._forked:
            steps = int(min(max_steps, (held * bs - num_tokens + 1).min()))
            return [used_blocks * bs] * max(steps, 0)
        step = np.arange(max_steps)  # [k]
        # blocks each request holds after step j's allocation: [k, n]
        after = np.maximum(held[None, :], -(-(num_tokens[None, :] + step[:, None]) // bs))
        extra = (after - held[None, :]).sum(axis=1)  # [k] new blocks taken up to step j
        ok = extra <= self.pool.num_free_blocks()  # [k], monotone: a prefix of True
        return ((used_blocks + extra[ok]) * bs).tolist()

    def capacity(self, request: Request) -> int:
        """Tokens the request can hold without a new block."""
        held = len(self._tables.get(request.request_id, ()))
        if self.eviction is not None and self.eviction.compacts and (
                held * self.block_size > self.eviction.budget):
            return 2**62  # H2O: the kept slots plus a decoded token's always fit
        return held * self.block_size

    def num_free_tokens(self) -> int:
        return self.pool.num_free_blocks() * self.block_size

    def num_used_tokens(self) -> int:
        """Distinct token slots holding KV (a block shared by several tables counts once)."""
        if not self._forked:  # shared blocks are full prefix-cache blocks
            return self._sum_tokens - self.pool.num_extra_refs * self.block_size
        bs = self.block_size
        fills: dict[int, int] = {}
        for rid, table in self._tables.items():
            n = self._num_tokens[rid]
            for i, block in enumerate(table[: -(-n // bs)]):
                fills[block] = max(fills.get(block, 0), min(bs, n - i * bs))
        return sum(fills.values())

    def num_reserved_tokens(self) -> int:
        return self.pool.num_used_blocks() * self.block_size

    def usage(self) -> KVMemoryUsage:
        used = self.num_used_tokens()
        held = self.num_reserved_tokens()
        return KVMemoryUsage(
            num_total_tokens=self.num_kv_tokens, num_used_tokens=used, num_reserved_tokens=0,
            num_internal_frag_tokens=held - used, num_free_tokens=self.num_free_tokens(),
            num_requests=len(self._tables),
            num_cached_free_tokens=self.pool.num_cached_free_blocks() * self.block_size)

    # ------------------------------------------------------------------ paged extras
    def block_table(self, request_id: str) -> list[int]:
        """Physical block ids of the request's logical blocks (a live list: do not modify);
        -1 for a block released by KV eviction."""
        return self._tables.get(request_id, [])

    def take_step_kv(self, seqs: tuple[ScheduledSeq, ...]
                     ) -> tuple[tuple[ScheduledSeq, ...], StepKV]:
        """The plan's KV side (`KVCacheManager.take_step_kv`): with a contents store, each
        sequence's block table and filled slots (its `start`, H2O's compacted kept set) and the
        block copies queued since the last call, in order; always the blocks swapped out / in
        and copied since then (for pricing). Timing-only runs build no tables."""
        num_out, num_in = self.swap.take_moved()
        num_copied, self._pending_copies = self._pending_copies, 0
        ops: tuple[BlockOp, ...] = ()
        if self.record_block_ops:
            ops, self._ops = tuple(self._ops), []
            ev, tables = self.eviction, self._tables
            seqs = tuple(dataclasses.replace(s, kv=SeqKV(
                tuple(tables[s.request.request_id]),
                s.start if ev is None else ev.num_slots(s.start))) for s in seqs)
        if not (ops or num_out or num_in or num_copied):
            return seqs, NO_KV_WORK
        return seqs, StepKV(ops, num_out, num_in, num_copied)

    @property
    def hit_rate(self) -> float:
        """Prompt tokens served from the prefix cache / prompt tokens looked up."""
        return self.prefix.hit_rate

    def check(self) -> None:
        """Invariants (tests): reference counts equal table references exactly."""
        self.pool.check()
        refs = [0] * len(self.pool.ref_count)  # the blocks handed out so far (lazy pool)
        for table in self._tables.values():
            for block in table:
                if block >= 0:
                    refs[block] += 1
        assert refs == self.pool.ref_count, "reference counts differ from block tables"
        for rid, table in self._tables.items():
            held = sum(1 for b in table if b >= 0)
            assert held * self.block_size >= self._kept(self._num_tokens[rid])
            if self.eviction is not None and self.eviction.compacts:  # H2O: no holes
                assert held == len(table), "an H2O block table has a released entry"
        self.swap.check()

    # ------------------------------------------------------------------ internals
    def _blocks_for(self, num_tokens: int, start: int = 0) -> int:
        """Block-table entries a request of `num_tokens` tokens needs for a step from `start`
        (H2O: its kept slots plus the step's new ones, `KVEviction.step_blocks`)."""
        if self.eviction is None:
            return -(-num_tokens // self.block_size)
        return self.eviction.step_blocks(start, num_tokens, self.block_size)

    def _kept(self, num_tokens: int) -> int:
        """Tokens whose KV a request of `num_tokens` tokens keeps (once its step is done)."""
        return num_tokens if self.eviction is None else min(num_tokens, self.eviction.budget)

    def _release_dead(self, rid: str, table: list[int], num_computed: int) -> None:
        """Release every block no query from `num_computed` on reads (before a swap-out): the
        positional policies' dead blocks, H2O's slots past the kept ones."""
        assert self.eviction is not None
        live = -(-self.eviction.num_slots(num_computed) // self.block_size)
        self._release_evicted(rid, table, num_computed, live if self.eviction.compacts else 0)

    def _release_evicted(self, rid: str, table: list[int], num_computed: int,
                         need: int) -> None:
        """Release the blocks that lie past the sinks and wholly before the oldest position a
        query from `num_computed` on can read (sliding window / StreamingLLM); under H2O, the
        tail blocks past the `need` of the step from `num_computed` (its kept slots, compacted
        to the front, plus the new tokens' slots)."""
        assert self.eviction is not None
        bs = self.block_size
        if self.eviction.compacts:
            dead = table[need:][::-1]
            del table[need:]
            self.pool.release(dead)
            self.num_evicted_blocks += len(dead)
            return
        first_kept = num_computed - self.eviction.window + 1  # oldest key a later query reads
        lo = max(-(-self.eviction.num_sinks // bs), self._evicted_upto.get(rid, 0))
        hi = min(max(first_kept, 0) // bs, len(table))  # block b is dead iff (b+1)*bs <= first
        dead = [table[i] for i in range(lo, hi) if table[i] >= 0]
        for i in range(lo, hi):
            table[i] = -1
        if hi > lo:
            self._evicted_upto[rid] = hi
        self.pool.release(dead)
        self.num_evicted_blocks += len(dead)

    def _swap_in(self, request: Request, num_tokens: int) -> bool:
        """Bring a swapped-out request back: fresh GPU blocks for its host blocks, in table
        order (entries released by KV eviction stay -1), and for the step's new entries."""
        rid = request.request_id
        host = self.swap.host_table(rid)
        num_entries = max(self._blocks_for(num_tokens, request.num_computed), len(host))
        num_released = sum(1 for h in host if h < 0)
        if num_entries - num_released > self.pool.num_free_blocks():
            return False
        fresh = iter(self.pool.take_new(num_entries - num_released))
        table = [-1 if h < 0 else next(fresh) for h in host]
        table.extend(fresh)
        moves = self.swap.swap_in(rid, table)
        if self.record_block_ops:
            self._ops.extend(BlockOp("in", h, g) for h, g in moves)
        self._tables[rid] = table
        self.prefix.admitted(request, 0, count=False)
        self._sum_tokens += self._kept(num_tokens) - self._kept(self._num_tokens.get(rid, 0))
        self._num_tokens[rid] = num_tokens
        if self.enable_prefix_caching:
            self.prefix.register(request, table, num_tokens)
        return True
