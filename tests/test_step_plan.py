"""The step plan is the whole scheduler -> executor / pricer contract; one executor constructor.

Oracles:
- 8-bit KV (int8, fp8) with speculative decoding (draft model, n-gram) gives exactly the greedy
  float64 tokens and cumulative logprobs of the same KV dtype without speculation (before,
  speculation silently dropped `kv_cache_dtype`), and those differ from unquantized KV;
- the functional executor runs from hand-built plans alone (block tables, filled slots, block
  copies) and matches a full recompute; it holds no KV manager;
- every block op the manager queues is in exactly one plan, in order (also those queued by a
  `schedule()` that planned nothing), and the swap / copy-on-write counts priced equal the ops
  of the plan, in functional and timing-only runs alike.
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np
import pytest

from batching.commit import StopCriteria
from batching.continuous import ContinuousScheduler
from batching.plan import build_plan
from cache.paged import PagedKVCache
from sim import LLM, SamplingParams
from sim.core.errors import ConfigError, InfersimError
from sim.core.protocols import KVCacheManager
from sim.core.request import Request
from sim.core.step import NO_KV_WORK, BlockOp, ScheduledSeq, SeqKV, StepKV, StepPlan, shape_of
from sim.engine.args import EngineArgs
from sim.engine.build import build_executor, build_kv_manager
from sim.engine.engine import Engine
from sim.engine.records import StepCharge, StepStats
from sim.executor.functional import NumpyExecutor, make_kv_store
from sim.model.numpy_model import NumpyModel
from sim.model.paged_store import PagedKVStore
from sim.model.proxy import tiny_proxy_config
from sim.model.zoo import resolve_model
from speculative.executor import DraftVerifier, SpeculativeTimingExecutor

MODEL = "meta-llama/Llama-2-7b-hf"
DRAFT = {"method": "draft_model", "num_speculative_tokens": 3, "draft_noise_scale": 0.1}
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1,
         "prompt_lookup_max": 2}
PROMPTS = [[5, 7, 5, 7, 5, 9, 11], [3, 4, 3, 4, 3, 4, 8, 8, 8, 8, 3],
           [12, 6, 12, 6, 12, 6, 12, 6, 1]]


@cache
def _generate(kv_cache_dtype: str, method: str | None,
              kv_cache: str = "paged") -> tuple[list[tuple[list[int], float]], dict | None]:
    spec = {"draft": DRAFT, "ngram": NGRAM, None: None}[method]
    llm = LLM(MODEL, dtype="float64", seed=7, kv_cache=kv_cache, kv_cache_dtype=kv_cache_dtype,
              speculative_config=spec)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=1)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
    result = [(list(o.outputs[0].token_ids), o.outputs[0].cumulative_logprob) for o in outs]
    return result, llm.last_result.speculation


@pytest.mark.parametrize(("kv_cache_dtype", "method", "kv_cache"), [
    ("int8", "draft", "paged"), ("int8", "ngram", "paged"), ("fp8_e4m3", "draft", "paged"),
    ("fp8_e4m3", "ngram", "paged"), ("int8", "draft", "contiguous")])
def test_quantized_kv_with_speculation_equals_quantized_kv_without(kv_cache_dtype, method,
                                                                   kv_cache):
    plain, _ = _generate(kv_cache_dtype, None, kv_cache)
    spec, summary = _generate(kv_cache_dtype, method, kv_cache)
    assert summary is not None and summary["num_draft_tokens"] > 0
    assert summary["num_accepted_tokens"] > 0  # drafts really were verified and kept
    for (tokens, logprob), (spec_tokens, spec_logprob) in zip(plain, spec, strict=True):
        assert spec_tokens == tokens
        assert math.isclose(spec_logprob, logprob, rel_tol=1e-9)
    # and the codec matters: unquantized KV gives other logprobs (so a dropped codec fails)
    unquantized, _ = _generate("auto", None, kv_cache)
    assert max(abs(a[1] - b[1]) for a, b in zip(unquantized, spec, strict=True)) > 1e-6


# ---------------------------------------------------------------------- the executor, by hand
@pytest.fixture(scope="module")
def tiny() -> NumpyModel:
    return NumpyModel.random(tiny_proxy_config(resolve_model(MODEL), n_layer=2), seed=3,
                             dtype="float64")


def _req(rid: str, ids: list[int], max_tokens: int = 4) -> Request:
    return Request(request_id=rid, index=0, num_prompt_tokens=len(ids),
                   sampling=SamplingParams(temperature=0.0, max_tokens=max_tokens), arrival_s=0.0,
                   prompt_token_ids=list(ids))


def _plan(seqs: list[ScheduledSeq], ops: tuple[BlockOp, ...] = ()) -> StepPlan:
    planned = tuple(seqs)
    return StepPlan(planned, shape_of(planned), StepKV(ops))


def _greedy_next(model: NumpyModel, ids: list[int]) -> int:
    return int(np.argmax(model.forward(np.asarray(ids))[-1]))  # full recompute: the oracle


def test_the_functional_executor_runs_from_the_plan_alone(tiny):
    """Prefill into scattered blocks, decode, swap both blocks out and back in elsewhere,
    decode again: every token equals a full recompute, though no manager exists."""
    store = make_kv_store(tiny, block_size=4)
    ex = NumpyExecutor(tiny, store, retains_kv=True, max_model_len=64)
    req = _req("a", [9, 4, 7, 1, 3, 8])

    def step(start: int, table: tuple[int, ...], ops: tuple[BlockOp, ...] = ()) -> None:
        seq = ScheduledSeq(req, start, req.num_tokens - start, kv=SeqKV(table, start))
        result = ex.run(_plan([seq], ops))
        assert result.token_ids is not None
        assert result.token_ids[0] == _greedy_next(tiny, req.token_ids_slice(0, req.num_tokens))
        req.output_token_ids.append(result.token_ids[0])
        req.num_output_tokens += 1

    step(0, (5, 2))  # 6 prompt tokens in physical blocks 5 then 2
    step(6, (5, 2))  # position 6 lands in block 2
    moves = (BlockOp("out", 5, 0), BlockOp("out", 2, 1), BlockOp("in", 0, 7),
             BlockOp("in", 1, 3))
    step(7, (7, 3), moves)  # swapped out and in onto other blocks: contents follow the ops
    step(8, (7, 3, 6))  # a third block for position 8
    copy = (BlockOp("copy", 7, 1), BlockOp("copy", 3, 0), BlockOp("copy", 6, 4))
    step(9, (1, 0, 4), copy)  # copied blocks read as the originals
    assert not any(isinstance(v, PagedKVCache) for v in vars(ex).values())


def test_a_paged_store_refuses_a_plan_without_block_tables(tiny):
    ex = NumpyExecutor(tiny, make_kv_store(tiny, block_size=4), retains_kv=True,
                       max_model_len=64)
    req = _req("a", [1, 2, 3])
    with pytest.raises(InfersimError, match="no block table"):
        ex.run(_plan([ScheduledSeq(req, 0, 3)]))


def _engine(**kw) -> Engine:
    return Engine(EngineArgs(MODEL, dtype="float64", **kw))


def _holds_manager(obj: object, seen: set[int] | None = None, depth: int = 0) -> bool:
    """Whether a KV manager is reachable from `obj`'s attributes (a few levels deep)."""
    seen = set() if seen is None else seen
    if id(obj) in seen or depth > 3:
        return False
    seen.add(id(obj))
    if isinstance(obj, PagedKVCache | ContinuousScheduler):
        return True
    attrs = getattr(obj, "__dict__", None)
    return attrs is not None and any(_holds_manager(v, seen, depth + 1) for v in attrs.values())


@pytest.mark.parametrize(("mode", "spec", "kind"), [
    ("functional", None, NumpyExecutor), ("functional", DRAFT, NumpyExecutor),
    ("functional", NGRAM, NumpyExecutor), ("timing", {**DRAFT, "acceptance_rate": 0.5},
                                           SpeculativeTimingExecutor)])
def test_build_executor_is_the_one_constructor_and_passes_every_option(mode, spec, kind):
    engine = _engine(mode=mode, kv_cache_dtype="int8", speculative_config=spec)
    kv = build_kv_manager(engine)
    ex = build_executor(engine, kv)
    assert type(ex) is kind
    assert not _holds_manager(ex)
    if isinstance(ex, NumpyExecutor):
        assert isinstance(ex.store, PagedKVStore)  # the paged manager's blocks
        assert ex.store.codec is not None and ex.store.codec.name == "int8"
        assert isinstance(ex.speculation, DraftVerifier) == (spec is not None)


def test_sharded_functional_refusals_come_when_the_engine_is_built():
    with pytest.raises(ConfigError, match="kv_cache_dtype='int8'.*tensor_parallel_size=2"):
        _engine(tensor_parallel_size=2, kv_cache_dtype="int8")
    with pytest.raises(ConfigError, match="enable_prefix_caching.*tensor_parallel_size=2"):
        _engine(tensor_parallel_size=2, enable_prefix_caching=True)


# ---------------------------------------------------------------------- KV work in the plan
def _scheduler(kv: KVCacheManager) -> ContinuousScheduler:
    return ContinuousScheduler(kv, StopCriteria(frozenset(), 64), max_num_seqs=8,
                               max_num_batched_tokens=64)


def test_ops_queued_by_a_schedule_that_plans_nothing_ride_in_the_next_plan():
    kv = PagedKVCache(4, 4, preemption_mode="swap", num_swap_blocks=4)
    sched = _scheduler(kv)
    a = _req("a", list(range(8)))
    sched.add(a)
    plan = sched.schedule(0.0)
    assert plan is not None and plan.seqs[0].kv == SeqKV((0, 1), 0)
    a.num_computed, a.output_token_ids, a.num_output_tokens = 8, [1], 1  # prefill committed
    other = _req("x", list(range(8)))  # memory taken outside the scheduler: a needs a 3rd block
    assert kv.allocate(other, 8)
    assert sched.schedule(0.0) is None  # a preempted itself (swapped out), nothing planned
    kv.free(other)
    plan = sched.schedule(0.0)  # a swaps back in and decodes
    assert plan is not None and [s.request for s in plan.seqs] == [a]
    work = plan.kv
    assert [op.kind for op in work.ops] == ["out", "out", "in", "in"]  # out before in, in order
    assert [op.src for op in work.ops[2:]] == [op.dst for op in work.ops[:2]]
    assert (work.num_swapped_out_blocks, work.num_swapped_in_blocks) == (2, 2)
    assert plan.seqs[0].kv == SeqKV(tuple(kv.block_table("a")), 8)
    assert tuple(op.dst for op in work.ops[2:]) == plan.seqs[0].kv.block_table[:2]


def test_timing_only_plans_carry_counts_but_no_tables_or_ops():
    kv = PagedKVCache(4, 4, preemption_mode="swap", num_swap_blocks=4)
    kv.record_block_ops = False  # as build_kv_manager sets it for mode="timing"
    a = _req("a", list(range(8)))
    assert kv.allocate(a, 8)
    assert kv.preempt(a)  # swapped out (2 blocks), then back in for a decode
    assert kv.allocate(a, 9)
    plan = build_plan(kv, [ScheduledSeq(a, 8, 1)])
    assert plan.kv == StepKV((), 2, 2, 0) and plan.seqs[0].kv is None
    assert build_plan(kv, [ScheduledSeq(a, 8, 1)]).kv is NO_KV_WORK  # nothing queued since


class _PlanProbe(Engine):
    """An engine that keeps the KV work of every plan it prices."""

    def __init__(self, args: EngineArgs) -> None:
        super().__init__(args)
        self.priced: list[StepKV] = []

    def charge(self, plan: StepPlan, busy_s: float, draft_s: float = 0.0) -> StepCharge:
        self.priced.append(plan.kv)
        return super().charge(plan, busy_s, draft_s)


def _probe_run(mode: str, params: SamplingParams, **kw) -> tuple[_PlanProbe, StepStats]:
    engine = _PlanProbe(EngineArgs(MODEL, mode=mode, dtype="float64", seed=1, **kw))
    reqs = [engine.make_request(str(i), i, len(p), params, 0.0, p) for i, p in enumerate(PROMPTS)]
    result = engine.run(reqs)
    assert all(r.reject_reason is None for r in result.requests)
    return engine, result.stats


@pytest.mark.parametrize("case", ["swap", "fork"])
def test_swap_and_copy_counts_priced_equal_the_ops_of_the_plan(case):
    if case == "swap":  # a tight pool: decodes preempt each other by swapping
        params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
        kw = {"num_gpu_blocks_override": 8, "block_size": 4, "max_model_len": 32,
              "preemption_mode": "swap", "swap_space": 1.0}
    else:  # n = 2: the samples share the prompt blocks, the partial last one copied on write
        params = SamplingParams(temperature=0.8, seed=0, n=2, max_tokens=6, ignore_eos=True)
        kw = {"block_size": 4}
    engine, stats = _probe_run("functional", params, **kw)
    priced = engine.priced
    for work in priced:
        kinds = [op.kind for op in work.ops]
        assert kinds.count("out") == work.num_swapped_out_blocks
        assert kinds.count("in") == work.num_swapped_in_blocks
        assert kinds.count("copy") == work.num_copied_blocks
    moved = sum(w.num_swapped_out_blocks + w.num_swapped_in_blocks for w in priced)
    copied = sum(w.num_copied_blocks for w in priced)
    assert (moved > 0) == (case == "swap") and (copied > 0) == (case == "fork")
    assert stats.num_copied_blocks == copied
    assert (stats.swap_s > 0) == (case == "swap")
    if case == "fork":
        return
    # a timing-only run of the same workload prices the same moves, without any ops (its
    # coasted decode stretches build no plans, and move no blocks)
    timing, timing_stats = _probe_run("timing", params, **kw)
    assert all(not w.ops for w in timing.priced)

    def moves(works: list[StepKV]) -> list[tuple[int, int]]:
        return [(w.num_swapped_out_blocks, w.num_swapped_in_blocks) for w in works
                if w.num_swapped_out_blocks or w.num_swapped_in_blocks]

    assert moves(timing.priced) == moves(priced)
    assert timing_stats.swap_s == stats.swap_s
