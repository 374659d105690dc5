"""KV compression by eviction (`kv_eviction`): a budget that covers the sequence changes nothing,
the masks are the policies', H2O keeps its budget, held blocks stop growing (more requests fit),
decode is priced over the kept tokens, and the quality cost is measured and ordered.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import sim.engine.lanes as engine_lanes
from cache.kv_eviction import EvictingModel, KVEviction
from cache.kv_quality import eviction_logits, eviction_quality
from cache.paged import PagedKVCache
from sim import LLM, SamplingParams
from sim.cli.main import build_parser, engine_args_from
from sim.core.errors import ConfigError, InfersimError
from sim.core.request import Request
from sim.engine.args import EngineArgs
from sim.engine.engine import Engine
from sim.model.numpy_model import NumpyModel, SeqChunk
from sim.model.paged_store import PagedKVStore
from sim.model.proxy import load_functional_model
from sim.model.quality import eval_token_ids, reference_logits, teacher_forced_logits
from sim.model.sampling import SamplingParams as SP
from sim.workload.specs import make_workload

RNG = np.random.default_rng(0)
PROMPTS = [{"prompt_token_ids": RNG.integers(1, 200, n).tolist()} for n in (9, 21, 40)]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
POLICIES = [("sliding_window", {}), ("streaming_llm", {"kv_eviction_sinks": 4}),
            ("h2o", {"kv_eviction_heavy": 8})]


def _req(rid):
    return Request(request_id=rid, index=0, num_prompt_tokens=10, sampling=SP(max_tokens=500),
                   arrival_s=0.0)


def _tokens(**kwargs):
    llm = LLM(dtype="float64", max_model_len=96, **kwargs)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]


@pytest.fixture(scope="module")
def proxy():
    return load_functional_model("meta-llama/Llama-2-7b-hf", dtype="float64")


def test_a_budget_covering_the_sequence_changes_no_token():
    full = _tokens()
    for policy, extra in POLICIES:
        assert _tokens(kv_eviction=policy, kv_eviction_window=52, **extra) == full, policy
    # a small window does change them (the eviction is real)
    assert _tokens(kv_eviction="sliding_window", kv_eviction_window=4) != full
    # n > 1: each sample computes its own prompt (no fork) and equals an n = 1 run with its seed
    llm = LLM(dtype="float64", max_model_len=96, kv_eviction="h2o", kv_eviction_window=6,
              kv_eviction_heavy=6)
    params = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=16, ignore_eos=True)
    samples = [c.token_ids for c in llm.generate(PROMPTS[2], params)[0].outputs]
    for i, sample in enumerate(samples):
        one = SamplingParams(temperature=1.0, seed=5 + i, max_tokens=16, ignore_eos=True)
        assert llm.generate(PROMPTS[2], one)[0].outputs[0].token_ids == sample


def test_masks_are_the_policies(proxy):
    model, tokenizer = proxy
    ids = eval_token_ids(tokenizer, 48)
    windowed = NumpyModel(model.config, model.weights, "float64",
                          layer_windows=(8,) * model.config.n_layer)
    sliding = eviction_logits(model, ids, KVEviction("sliding_window", 8))
    np.testing.assert_allclose(sliding, reference_logits(windowed, ids), atol=1e-10)
    no_sinks = eviction_logits(model, ids, KVEviction("streaming_llm", 8, sinks=0))
    np.testing.assert_array_equal(no_sinks, sliding)
    ev = KVEviction("streaming_llm", 3, sinks=2)
    mask = ev.static_mask(np.array([0, 4, 9]), 10)
    assert mask.astype(int).tolist() == [[1] + [0] * 9, [1, 1, 1, 1, 1] + [0] * 5,
                                         [1, 1] + [0] * 5 + [1, 1, 1]]


@pytest.mark.parametrize("policy, kwargs", [("streaming_llm", {"sinks": 4}),
                                            ("h2o", {"heavy": 6})])
def test_prefill_equals_token_by_token_decode(proxy, policy, kwargs):
    model, tokenizer = proxy
    ids = eval_token_ids(tokenizer, 40)
    ev = KVEviction(policy, 6, **kwargs)
    np.testing.assert_allclose(eviction_logits(model, ids, ev),
                               eviction_logits(model, ids, ev, chunk_size=1), atol=1e-12)


def test_h2o_keeps_its_budget_and_the_recent_window(proxy):
    model, tokenizer = proxy
    ids = np.asarray(eval_token_ids(tokenizer, 50))
    ev = KVEviction("h2o", 5, heavy=7)
    evicting = EvictingModel(model, ev)
    from sim.model.kv_store import ContiguousKVStore
    from sim.model.numpy_model import SeqChunk

    c = model.config
    store = ContiguousKVStore(c.n_layer, c.n_kv_head, c.d_head, model.dtype)
    store.allocate("s", len(ids))
    evicting.forward_step([SeqChunk("s", ids, 0, 1)], store)
    state = evicting._h2o["s"]
    for kept in state.kept:
        assert kept.sum() == ev.budget
        assert kept[-ev.window:].all()  # the recent window is never evicted
    for kept, score in zip(state.kept, state.score, strict=True):
        old = np.arange(len(ids) - ev.window)  # [n_old] positions outside the recent window
        # the heavy hitters kept are the old positions with the most accumulated attention
        # among those still present when each eviction happened: here, at least, position 0
        assert kept[0] and score[old][kept[old]].min() > 0
    evicting.release("s")
    assert "s" not in evicting._h2o


def test_quality_cost_is_measured_and_shrinks_with_the_budget(proxy):
    model, tokenizer = proxy
    ids = eval_token_ids(tokenizer, 96)
    ref = reference_logits(model, ids)
    kl = {w: eviction_quality(model, ids, KVEviction("sliding_window", w), ref).mean_kl
          for w in (8, 32, 96)}
    assert kl[96] < 1e-20 < kl[32] < kl[8]
    sinks = eviction_quality(model, ids, KVEviction("streaming_llm", 28, sinks=4), ref)
    h2o = eviction_quality(model, ids, KVEviction("h2o", 16, heavy=16), ref)
    for report in (sinks, h2o):
        assert report.mean_kl > 0 and report.top1_agreement <= 1


def test_h2o_blocks_are_bounded_and_go_back_to_the_pool():
    """H2O's kept set sits compacted in the table's first slots: a step holds those slots plus
    its new tokens' (written before its evictions), and the tail blocks past them go back."""
    ev = KVEviction("h2o", 20, heavy=4)  # budget 24 tokens; a decode step needs 25 slots
    kv = PagedKVCache(16, 16, eviction=ev)
    req = _req("a")
    assert kv.never_fits(req, 10_000) is None  # any length fits: the KV stops growing
    assert ev.max_held_blocks(10, 10_000, 16) == 2 and ev.max_held_blocks(100, 10_000, 16) == 7
    steps = [(0, 48), (48, 96), (96, 100)] + [(n - 1, n) for n in range(101, 400)]
    for start, n in steps:  # a 100-token prompt in chunks, then decode
        req.num_computed = start
        assert kv.allocate(req, n)
        kv.check()
        assert len(kv.block_table("a")) == -(-(min(start, 24) + n - start) // 16) <= 5
        assert kv.num_used_tokens() == min(n, 24) <= kv.num_reserved_tokens()
    assert kv.num_evicted_blocks == 3  # the second chunk's 5 blocks (24 kept + 48) shrank to 2
    assert kv.pool.num_free_blocks() == 14 and kv.capacity(req) == 2**62
    assert kv.coast_growth([req], 10) == []  # priced step by step
    other = _req("b")
    kv.allocate(other, 10)
    assert kv.capacity(other) == 16  # below the budget: one block of room
    with pytest.raises(InfersimError, match="eviction"):
        kv.fork(req, _req("c"))
    kv.free(req)
    kv.free(other)
    kv.check()
    assert kv.num_used_tokens() == 0 and kv.pool.num_free_blocks() == 16


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_h2o_in_slots_equals_masked_h2o(proxy, block_size):
    """Teacher-forced logits and kept sets of H2O over compacted paged slots equal the masked
    reference over all positions, whatever the chunking (prompt longer than the budget)."""
    model, tokenizer = proxy
    ids = np.asarray(eval_token_ids(tokenizer, 45))
    ev = KVEviction("h2o", 5, heavy=7)
    ref = eviction_logits(model, ids, ev, block_size=None)
    for chunk in (None, 1, 13):
        got = eviction_logits(model, ids, ev, chunk, block_size=block_size)
        np.testing.assert_allclose(got, ref, atol=1e-10)
        assert (got.argmax(axis=1) == ref.argmax(axis=1)).all()
    c = model.config
    slots, masked = EvictingModel(model, ev), EvictingModel(model, ev)
    paged = PagedKVStore(c.n_layer, c.n_kv_head, c.d_head, block_size, model.dtype)
    paged.prepare("s", range(-(-len(ids) // block_size)), 0)
    teacher_forced_logits(slots, ids, paged, 10, seq_id="s")
    teacher_forced_logits(masked, ids, None, None, seq_id="s")
    for layer in range(c.n_layer):  # the same positions kept, in slots 0..budget-1
        np.testing.assert_array_equal(slots._h2o["s"].pos[layer],
                                      np.flatnonzero(masked._h2o["s"].kept[layer]))
        assert paged._num_written["s"][layer] == ev.budget
    with pytest.raises(ConfigError, match="resumes at 50"):  # a gap in the sequence
        slots.forward_step([SeqChunk("s", ids[:3], 50, 1)], paged)
    slots.forward_step([SeqChunk("s", ids[:3], 0, 1)], paged)  # a recompute starts afresh
    assert slots._h2o["s"].num_tokens == 3 and len(slots._h2o["s"].pos[0]) == 3


def test_compact_moves_slots_through_the_block_table():
    store = PagedKVStore(1, 1, 2, 2, "float64")
    store.prepare("s", [5, 2, 7], 0)
    kv = np.arange(12, dtype=np.float64).reshape(6, 1, 2)  # [6, n_kv, d_head]
    store.write("s", 0, 0, kv, -kv)
    store.compact("s", 0, np.array([0, 2, 3, 5]))
    k, v = store.read("s", 0, 4)
    np.testing.assert_array_equal(k, kv[[0, 2, 3, 5]])
    np.testing.assert_array_equal(v, -kv[[0, 2, 3, 5]])
    with pytest.raises(InfersimError, match="ascending written"):
        store.compact("s", 0, np.array([1, 0]))


@pytest.mark.parametrize("policy", ["sliding_window", "streaming_llm"])
def test_dead_blocks_go_back_to_the_pool(policy):
    ev = KVEviction(policy, 20, sinks=4)
    kv = PagedKVCache(16, 16, eviction=ev)
    req = _req("a")
    assert kv.never_fits(req, 10_000) is None
    bound = ev.max_held_blocks(10, 10_000, 16)
    assert bound == (4 if policy == "streaming_llm" else 3)
    assert kv.allocate(req, 10)
    free_counts = []
    for n in range(11, 400):  # decode: step n computes position n - 1
        req.num_computed = n - 1
        assert kv.allocate(req, n)
        kv.check()
        table = kv.block_table("a")
        held = [b for b in table if b >= 0]
        assert len(held) <= bound and len(table) == -(-n // 16)
        if policy == "streaming_llm":
            assert table[0] >= 0  # the sinks' block stays
        free_counts.append(kv.pool.num_free_blocks())
    assert kv.num_evicted_blocks > 16  # more blocks than the pool has: they were reused
    assert min(free_counts[-100:]) >= 16 - bound
    kv.free(req)
    kv.check()
    assert kv.pool.num_free_blocks() == 16 and kv.num_used_tokens() == 0


PREEMPTED = dict(enable_chunked_prefill=True, max_num_batched_tokens=16,
                 num_gpu_blocks_override=24)  # 96 tokens for 10 requests
MANY_PROMPTS = PROMPTS + [{"prompt_token_ids": RNG.integers(1, 200, n).tolist()}
                          for n in (12, 33, 17, 26, 5, 38, 14)]


@pytest.mark.parametrize("setting", [{}, PREEMPTED], ids=["plain", "chunked-preempted"])
@pytest.mark.parametrize("policy,extra", POLICIES)
def test_paged_eviction_frees_blocks_and_keeps_the_masked_tokens(monkeypatch, policy, extra, setting):
    """Over the paged store (H2O: in compacted slots), generation equals masked attention over
    all positions (the contiguous path, `EvictingModel.forward` on the whole sequence), with
    prompts longer than the budget, chunked prefill and preemption by recompute; each request
    holds at most `max_held_blocks`, released blocks are reused, and none leaks."""
    ev = KVEviction(policy, 6, **{k.removeprefix("kv_eviction_"): v for k, v in extra.items()})
    llm = LLM(dtype="float64", max_model_len=96, kv_eviction=policy, kv_eviction_window=6,
              block_size=4, **extra, **setting)
    managers = []
    make = engine_lanes.build_kv_manager

    def checked_manager(engine, num_blocks=None):
        kv = make(engine, num_blocks)
        allocate = kv.allocate

        def checked(req, num_tokens, hit=0):
            ok = allocate(req, num_tokens, hit)
            held = [b for b in kv.block_table(req.request_id) if b >= 0]
            assert len(held) <= ev.max_held_blocks(req.num_prompt_tokens, 96, 4)
            return ok

        kv.allocate = checked
        managers.append(kv)
        return kv

    monkeypatch.setattr(engine_lanes, "build_kv_manager", checked_manager)
    prompts = MANY_PROMPTS if setting else PROMPTS[:2]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))
    assert (llm.last_result.stats.num_preemptions > 0) == bool(setting)
    masked = EvictingModel(llm.engine.functional_model, ev)
    for p, o in zip(prompts, outs, strict=True):
        seq = list(p["prompt_token_ids"])
        for _ in range(30):  # the masked path, greedy, token by token
            seq.append(int(np.argmax(masked.forward(seq)[-1])))
        assert o.outputs[0].token_ids == seq[len(p["prompt_token_ids"]):]
    (kv,) = managers
    assert kv.num_evicted_blocks > 0
    kv.check()
    assert kv.pool.num_free_blocks() == kv.pool.num_blocks


def test_more_requests_fit_and_decode_reads_fewer_bytes():
    def run(**kwargs):
        engine = Engine(EngineArgs(mode="timing", num_gpu_blocks_override=400, **kwargs))
        wl = make_workload(24, math.inf, 1024, 256, seed=0)
        result = engine.run(wl, keep_requests=False, record_steps=True)
        return engine, result, int(result.steps.columns()["num_seqs"].max())

    _, full, peak_full = run()
    engine, evicted, peak_evicted = run(kv_eviction="sliding_window", kv_eviction_window=256)
    assert peak_evicted > peak_full
    assert evicted.summary.num_completed == full.summary.num_completed == 24
    assert evicted.summary.duration_s < full.summary.duration_s
    _, h2o, peak_h2o = run(kv_eviction="h2o", kv_eviction_window=128, kv_eviction_heavy=128)
    assert peak_h2o > peak_full and h2o.summary.num_completed == 24
    assert h2o.steps.columns()["kv_used_tokens"].max() <= peak_h2o * 256
    cols = evicted.steps.columns()
    assert cols["kv_used_tokens"].max() <= peak_evicted * 256
    cost = engine.cost_model
    assert cost.step_time_s((1,) * 8, (4000,) * 8) == cost.step_time_s((1,) * 8, (256,) * 8)
    assert cost.inner.step_time_s((1,) * 8, (4000,) * 8) > cost.step_time_s((1,) * 8, (4000,) * 8)
    assert "kv_eviction=sliding_window" in engine.description


def test_bad_combinations_are_rejected_and_flags_parse():
    for kwargs, match in ((dict(kv_cache="contiguous"), "paged"),
                          (dict(enable_prefix_caching=True), "prefix"),
                          (dict(speculative_config={"method": "ngram",
                                                    "num_speculative_tokens": 2}), "speculative"),
                          (dict(tensor_parallel_size=2), "parallelism"),
                          (dict(kv_eviction_window=0), "window")):
        with pytest.raises(ConfigError, match=match):
            EngineArgs(kv_eviction="sliding_window", **kwargs)
    # 8-bit KV and swap preemption combine with it (tests/test_cache_eviction_combined.py)
    EngineArgs(kv_eviction="h2o", kv_eviction_heavy=4, kv_cache_dtype="fp8",
               preemption_mode="swap")
    with pytest.raises(ConfigError, match="heavy"):
        EngineArgs(kv_eviction="h2o")
    with pytest.raises(ConfigError, match="kv_eviction"):
        EngineArgs(kv_eviction="lru")
    ns = build_parser().parse_args(["simulate", "--kv-eviction", "h2o", "--kv-eviction-window",
                                    "64", "--kv-eviction-heavy", "32", "--kv-eviction-sinks", "2"])
    args = engine_args_from(ns)
    assert (args.kv_eviction, args.kv_eviction_window, args.kv_eviction_heavy,
            args.kv_eviction_sinks) == ("h2o", 64, 32, 2)
    assert args.eviction().budget == 96
