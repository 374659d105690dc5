"""A hypothesis state machine over the paged KV manager: allocate (with prefix-cache hits),
append, fork (copy-on-write), free, preempt, and evict-by-pressure.

A shadow of the block contents (which token, at which position, sits in which physical slot) is kept from the
manager's own decisions: every prefix hit must hand out blocks that really hold the request's
tokens, no write may land in a block another table still shares, and at every step reference
counts equal the table references exactly (no leak, no double free) and a cached prefix is
block-aligned and shorter than the request.

A second machine runs KV eviction (sliding window, StreamingLLM, H2O) over the manager: chunked
prompts, decode, preemption by recompute, free, with a shadow of the slots each request still
reads (H2O: its kept set, compacted to the table's first slots after each step, as `cache.h2o`
does). A released block must never hold a slot its request still reads (a later owner's writes
would show), an unpreempted request holds at most `max_held_blocks`, and nothing leaks.
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    rule,
)

from cache.kv_eviction import KV_EVICTION_POLICIES, KVEviction
from cache.paged import PagedKVCache
from sim.core.request import Request, SamplingParams

BLOCK = 4
NUM_BLOCKS = 12
PREFIXES = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 6, 6], [7] * 8, [1, 2, 3, 4] + [7] * 8]


def key(pos: int, token: int) -> int:
    """What a KV slot holds depends on the token *and* its position (RoPE)."""
    return pos * 1000 + token


class PagedMachine(RuleBasedStateMachine):
    live = Bundle("live")

    def __init__(self) -> None:
        super().__init__()
        self.kv = PagedKVCache(NUM_BLOCKS, BLOCK, enable_prefix_caching=True)
        self.content = np.full((NUM_BLOCKS, BLOCK), -1, dtype=np.int64)  # [n_blocks, bs]
        self.counter = 0
        self.alive: set[str] = set()

    def _new(self, ids: list[int]) -> Request:
        self.counter += 1
        return Request(request_id=f"r{self.counter}", index=self.counter,
                       num_prompt_tokens=len(ids), sampling=SamplingParams(max_tokens=None),
                       arrival_s=0.0, prompt_token_ids=list(ids), keep_tokens=True)

    def _write(self, req: Request, start: int, end: int) -> None:
        """What the store would do: apply queued copies, then write positions start..end-1."""
        for op in self.kv.take_step_kv(())[1].ops:
            assert op.kind == "copy"
            self.content[op.dst] = self.content[op.src]
        table = self.kv.block_table(req.request_id)
        ids = req.token_ids_slice(0, end)
        for pos in range(start, end):
            block = table[pos // BLOCK]
            assert self.kv.pool.ref_count[block] == 1, "write into a shared block"
            self.content[block, pos % BLOCK] = key(pos, ids[pos])

    @rule(target=live, prefix=st.sampled_from(PREFIXES),
          tail=st.lists(st.integers(0, 3), max_size=6))
    def allocate(self, prefix, tail):
        req = self._new(prefix + tail)
        hit = self.kv.cached_prefix(req)
        assert hit % BLOCK == 0 and hit < req.num_tokens
        if not self.kv.allocate(req, req.num_tokens, hit):
            return multiple()  # nothing to add
        table = self.kv.block_table(req.request_id)
        ids = req.token_ids_slice(0, hit)
        for pos in range(hit):  # a hit hands out blocks holding exactly these tokens
            assert self.content[table[pos // BLOCK], pos % BLOCK] == key(pos, ids[pos])
        self._write(req, hit, req.num_tokens)
        req.num_computed = req.num_tokens
        self.alive.add(req.request_id)
        return req

    @rule(req=live, new=st.lists(st.integers(0, 3), min_size=1, max_size=6))
    def append(self, req, new):
        if req.request_id not in self.alive:
            return
        old = req.num_tokens
        req.output_token_ids.extend(new)
        req.num_output_tokens += len(new)
        if self.kv.allocate(req, req.num_tokens):
            self._write(req, old, req.num_tokens)
        else:  # all or nothing: undo the tokens
            del req.output_token_ids[-len(new):]
            req.num_output_tokens -= len(new)

    @rule(target=live, req=live)
    def fork(self, req):
        if req.request_id not in self.alive:
            return multiple()
        child = self._new(req.prompt_token_ids)
        child.output_token_ids = list(req.output_token_ids)
        child.num_output_tokens = req.num_output_tokens
        self.kv.fork(req, child)
        self.alive.add(child.request_id)
        return child

    @rule(req=consumes(live))
    def free(self, req):
        self.kv.free(req)
        self.kv.free(req)  # idempotent: never a double free
        self.alive.discard(req.request_id)

    @rule(req=consumes(live))
    def preempt(self, req):
        assert self.kv.preempt(req) is False  # recompute mode frees
        self.alive.discard(req.request_id)

    @invariant()
    def exact_reference_counts(self):
        self.kv.check()
        pool = self.kv.pool
        assert 0 <= self.kv.num_used_tokens() <= self.kv.num_reserved_tokens()
        assert self.kv.num_reserved_tokens() + self.kv.num_free_tokens() == NUM_BLOCKS * BLOCK
        assert pool.num_used_blocks() == sum(1 for c in pool.ref_count if c > 0)

    def teardown(self):
        for rid in list(self.kv._tables):
            self.kv.free(Request(request_id=rid, index=0, num_prompt_tokens=1,
                                 sampling=SamplingParams(), arrival_s=0.0))
        self.kv.check()
        assert self.kv.num_free_tokens() == NUM_BLOCKS * BLOCK  # no leak


PagedMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None,
                                          suppress_health_check=[HealthCheck.too_slow])
TestPagedKVCache = PagedMachine.TestCase


class EvictionMachine(RuleBasedStateMachine):
    reqs = Bundle("reqs")

    @initialize(policy=st.sampled_from(KV_EVICTION_POLICIES), window=st.integers(1, 9),
                extra=st.integers(1, 6))
    def setup(self, policy, window, extra):
        self.ev = KVEviction(policy, window, sinks=extra, heavy=extra)
        self.kv = PagedKVCache(3 * NUM_BLOCKS, BLOCK, eviction=self.ev)
        self.content = np.full((3 * NUM_BLOCKS, BLOCK), -1, dtype=np.int64)  # [n_blocks, bs]
        self.state: dict[str, dict] = {}  # rid -> index, total tokens, kept positions, preempted
        self.counter = 0

    def _slot_of(self, rid: str, slot: int) -> tuple[int, int]:
        block = self.kv.block_table(rid)[slot // BLOCK]
        assert block >= 0 and self.kv.pool.ref_count[block] == 1
        return block, slot % BLOCK

    @rule(target=reqs, prompt=st.integers(1, 30))
    def new(self, prompt):
        self.counter += 1
        req = Request(request_id=f"r{self.counter}", index=self.counter,
                      num_prompt_tokens=prompt, sampling=SamplingParams(max_tokens=None),
                      arrival_s=0.0)
        self.state[req.request_id] = {"index": req.index, "total": prompt, "kept": [],
                                      "preempted": False}
        return req

    @rule(req=reqs, chunk=st.integers(1, 12), rnd=st.randoms(use_true_random=False))
    def step(self, req, chunk, rnd):
        """A prompt (or recompute) chunk, else one decode token; then the evictions."""
        rid, info = req.request_id, self.state.get(req.request_id)
        if info is None:
            return
        start = req.num_computed
        end = min(start + chunk, info["total"]) if start < info["total"] else start + 1
        if not self.kv.allocate(req, end):
            return
        if not info["preempted"]:
            held = [b for b in self.kv.block_table(rid) if b >= 0]
            assert len(held) <= self.ev.max_held_blocks(req.num_prompt_tokens, 10_000, BLOCK)
        positions = info["kept"] + list(range(start, end))  # H2O: slot i holds positions[i]
        first = len(info["kept"]) if self.ev.compacts else start  # slot of the first new token
        for i, pos in enumerate(range(start, end)):
            self.content[self._slot_of(rid, first + i)] = key(pos, info["index"])
        if self.ev.compacts:  # the recent window stays, a random older subset fills the rest
            recent = [i for i, p in enumerate(positions) if p >= end - self.ev.window]
            old = [i for i, p in enumerate(positions) if p < end - self.ev.window]
            keep = sorted(rnd.sample(old, min(end, self.ev.budget) - len(recent))) + recent
            values = [self.content[self._slot_of(rid, i)] for i in keep]
            for slot, value in enumerate(values):  # compacted to the front, in order
                self.content[self._slot_of(rid, slot)] = value
            info["kept"] = [positions[i] for i in keep]
        else:  # what a query from `end` on reads
            info["kept"] = self.ev.kept_positions(end, end).tolist()
        req.num_computed = end
        info["total"] = max(info["total"], end)

    @rule(req=reqs)
    def preempt(self, req):
        if req.request_id in self.state:
            assert self.kv.preempt(req) is False
            req.num_computed = 0
            self.state[req.request_id].update(kept=[], preempted=True)

    @rule(req=consumes(reqs))
    def free(self, req):
        self.kv.free(req)
        self.state.pop(req.request_id, None)

    @invariant()
    def live_slots_survive(self):
        if not hasattr(self, "kv"):
            return
        self.kv.check()
        assert self.kv.num_reserved_tokens() + self.kv.num_free_tokens() == self.kv.num_kv_tokens
        for rid, info in self.state.items():  # every slot a request reads still holds it
            for i, pos in enumerate(info["kept"]):
                slot = i if self.ev.compacts else pos
                assert self.content[self._slot_of(rid, slot)] == key(pos, info["index"])

    def teardown(self):
        if not hasattr(self, "kv"):
            return
        for rid in list(self.kv._tables):
            self.kv.free(Request(request_id=rid, index=0, num_prompt_tokens=1,
                                 sampling=SamplingParams(), arrival_s=0.0))
        self.kv.check()
        assert self.kv.pool.num_free_blocks() == self.kv.pool.num_blocks  # no leak


EvictionMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40,
                                             deadline=None,
                                             suppress_health_check=[HealthCheck.too_slow])
TestKVEvictionManager = EvictionMachine.TestCase
