"""KV eviction combined with 8-bit KV (`kv_cache_dtype`) and with swap preemption.

Oracles (float64, greedy): a budget covering the sequence with int8 KV gives int8 KV's tokens;
eviction over the quantized paged store gives the masked reference fed the same
quantize-dequantized K/V; swapped out and back in gives the never-preempted tokens, for every
policy, while a swap moves only the kept blocks (released entries stay -1, H2O's compacted
slots come back in order) and the swapped-in request needs no more blocks than its budget.
"""

from __future__ import annotations

import numpy as np
import pytest

import sim.engine.lanes as engine_lanes
from cache.kv_eviction import EvictingModel, KVEviction
from cache.kv_quality import eviction_logits, eviction_quality
from cache.paged import PagedKVCache
from sim import LLM, SamplingParams
from sim.core.request import Request
from sim.engine.args import EngineArgs
from sim.engine.engine import Engine
from sim.model.kv_quant import KVCodec, kv_codec
from sim.model.paged_store import PagedKVStore
from sim.model.proxy import load_functional_model
from sim.model.quality import eval_token_ids, reference_logits
from sim.model.sampling import SamplingParams as SP
from sim.workload.specs import make_workload

RNG = np.random.default_rng(3)
PROMPTS = [{"prompt_token_ids": RNG.integers(1, 200, n).tolist()}
           for n in (9, 21, 40, 12, 33, 17, 26, 5, 38, 14)]
POLICIES = [("sliding_window", {}), ("streaming_llm", {"kv_eviction_sinks": 4}),
            ("h2o", {"kv_eviction_heavy": 8})]


def _tokens(llm, prompts, max_tokens):
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


def _eviction(policy, extra, window=6):
    return KVEviction(policy, window, **{k.removeprefix("kv_eviction_"): v
                                         for k, v in extra.items()})


@pytest.fixture(scope="module")
def proxy():
    return load_functional_model("meta-llama/Llama-2-7b-hf", dtype="float64")


def test_a_covering_budget_with_int8_kv_gives_int8_kv_tokens():
    kw = dict(dtype="float64", max_model_len=96, kv_cache_dtype="int8")
    quantized = _tokens(LLM(**kw), PROMPTS[:3], 12)
    for policy, extra in POLICIES:
        llm = LLM(**kw, kv_eviction=policy, kv_eviction_window=52, **extra)
        assert _tokens(llm, PROMPTS[:3], 12) == quantized, policy


@pytest.mark.parametrize("kv_cache_dtype", ["int8", "fp8_e5m2"])
@pytest.mark.parametrize("policy,extra", POLICIES)
def test_quantized_paged_eviction_equals_the_masked_reference(policy, extra, kv_cache_dtype):
    """Generation over the 8-bit paged store (released blocks, H2O's compacted slots with
    their scales, chunked prefill, recompute preemption) equals masked attention over all
    positions of a contiguous store that keeps the same quantize-dequantized K/V."""
    llm = LLM(dtype="float64", max_model_len=96, kv_eviction=policy, kv_eviction_window=6,
              block_size=4, kv_cache_dtype=kv_cache_dtype, enable_chunked_prefill=True,
              max_num_batched_tokens=16, num_gpu_blocks_override=12, **extra)
    prompts = PROMPTS[:6]
    outs = _tokens(llm, prompts, 20)
    assert llm.last_result.stats.num_preemptions > 0
    masked = EvictingModel(llm.engine.functional_model, _eviction(policy, extra))
    codec = kv_codec(kv_cache_dtype)
    for p, out in zip(prompts, outs, strict=True):
        seq = list(p["prompt_token_ids"])
        for _ in range(20):
            seq.append(int(np.argmax(masked.forward(seq, codec)[-1])))
        assert out == seq[len(p["prompt_token_ids"]):]


def test_quantized_eviction_logits_and_quality(proxy):
    model, tokenizer = proxy
    ids = np.asarray(eval_token_ids(tokenizer, 48))
    ref = reference_logits(model, ids)
    for ev in (KVEviction("streaming_llm", 8, sinks=4), KVEviction("h2o", 6, heavy=6)):
        masked = eviction_logits(model, ids, ev, block_size=None, kv_cache_dtype="fp8")
        for chunk in (None, 7):
            paged = eviction_logits(model, ids, ev, chunk, block_size=4, kv_cache_dtype="fp8")
            np.testing.assert_allclose(paged, masked, atol=1e-10)
        # the quantization is real (its error does not simply add to eviction's: on this
        # random-weight proxy the two may partly cancel, so only "measured and different")
        plain = eviction_logits(model, ids, ev, block_size=None)
        assert np.abs(masked - plain).max() > 1e-6
        both = eviction_quality(model, ids, ev, ref, kv_cache_dtype="fp8_e5m2")
        alone = eviction_quality(model, ids, ev, ref)
        assert both.mean_kl > 0 and alone.mean_kl > 0 and both.mean_kl != alone.mean_kl
        assert both.num_tokens == alone.num_tokens == len(ids)


def test_compact_and_gathers_carry_the_scales():
    codec = KVCodec("int8")
    store = PagedKVStore(1, 2, 4, 2, "float64", codec=codec)
    x = RNG.standard_normal((8, 2, 4)) * np.exp(RNG.standard_normal((8, 2, 1)))  # [8, n_kv, d]
    store.prepare("s", [5, 3, 7, 2], 0)
    store.write("s", 0, 0, x, -x)
    store.prepare("s", [5, -1, 7, 2], 8)  # block 1 released by eviction
    k, v = store.read_positions("s", 0, np.array([0, 1, 4, 6, 7]))
    np.testing.assert_array_equal(k, codec.round_trip(x[[0, 1, 4, 6, 7]], np.float64))
    np.testing.assert_array_equal(v, codec.round_trip(-x[[0, 1, 4, 6, 7]], np.float64))
    store.prepare("s", [5, 3, 7, 2], 8)
    store.compact("s", 0, np.array([1, 2, 5, 7]))
    k, v = store.read("s", 0, 4)
    np.testing.assert_array_equal(k, codec.round_trip(x[[1, 2, 5, 7]], np.float64))
    np.testing.assert_array_equal(v, codec.round_trip(-x[[1, 2, 5, 7]], np.float64))


def test_engine_capacity_multiplies():
    """8-bit KV doubles the pool's tokens, eviction caps each request's blocks: together they
    multiply the requests that fit (timing, all 128 arriving at once)."""
    def peak(**kwargs):
        engine = Engine(EngineArgs(mode="timing", gpu_memory_utilization=0.3, **kwargs))
        result = engine.run(make_workload(128, float("inf"), 2048, 256, seed=0),
                            keep_requests=False, record_steps=True)
        assert result.summary.num_completed == 128
        return engine.num_kv_tokens, int(result.steps.columns()["num_seqs"].max())

    ev = dict(kv_eviction="sliding_window", kv_eviction_window=512)
    tokens_full, peak_full = peak()
    tokens_int8, peak_int8 = peak(kv_cache_dtype="int8")
    tokens_ev, peak_ev = peak(**ev)
    tokens_both, peak_both = peak(kv_cache_dtype="int8", **ev)
    assert tokens_int8 == tokens_both >= 2 * tokens_full - 16 and tokens_ev == tokens_full
    assert peak_int8 >= 1.8 * peak_full and peak_ev > 2 * peak_full
    assert peak_both >= 1.8 * peak_ev  # about 8x the unquantized, uncompressed peak


def _req(rid, num_prompt_tokens=10):
    return Request(request_id=rid, index=0, num_prompt_tokens=num_prompt_tokens,
                   sampling=SP(max_tokens=500), arrival_s=0.0)


@pytest.mark.parametrize("policy", ["sliding_window", "streaming_llm", "h2o"])
def test_swap_moves_only_kept_blocks_and_comes_back_within_the_budget(policy):
    """A request decoded far past the pool's size swaps out only its live blocks, and swaps
    back in with released entries still -1 (H2O: its compacted slots in order), needing only
    its budget's blocks."""
    ev = (KVEviction(policy, 12, heavy=4) if policy == "h2o"  # a 16-token budget
          else KVEviction(policy, 20, sinks=4))
    kv = PagedKVCache(8, 16, preemption_mode="swap", num_swap_blocks=8, eviction=ev)
    req = _req("a")
    assert kv.allocate(req, 10)
    for n in range(11, 301):  # decode: step n computes position n - 1
        req.num_computed = n - 1
        assert kv.allocate(req, n)
    req.num_computed = 300
    kv.take_block_ops()
    before = list(kv.block_table("a"))
    assert kv.preempt(req)
    out = kv.take_block_ops()
    live = -(-ev.num_slots(300) // 16) if ev.compacts else None
    if ev.compacts:  # the kept slots' blocks: the step's tail block was released first
        assert [g for _, g, _ in out] == before[:live] and len(before) > live
    else:
        assert [g for _, g, _ in out] == [b for b in before if b >= 0]
        assert before.count(-1) > 8  # more released entries than the pool has blocks
    assert {kind for kind, _, _ in out} == {"out"} and kv.pool.num_free_blocks() == 8
    assert kv.take_swapped_blocks() == (len(out), 0)
    kv.check()
    assert kv.allocate(req, 301)  # 301 tokens: 19 blocks without eviction, > the pool
    back = kv.take_block_ops()
    assert [h for _, h, _ in back] == [h for _, _, h in out]
    table = kv.block_table("a")
    assert [g for _, _, g in back] == [b for b in table if b >= 0][:len(out)]
    if ev.compacts:
        assert len(table) == -(-(ev.num_slots(300) + 1) // 16)
    else:
        assert [b < 0 for b in table[:len(before)]] == [b < 0 for b in before]
        assert len(table) == -(-301 // 16)
    assert kv.swap.num_swapped_in_blocks == kv.swap.num_swapped_out_blocks == len(out)
    kv.check()
    kv.free(req)
    kv.check()
    assert kv.pool.num_free_blocks() == 8


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
@pytest.mark.parametrize("policy,extra", POLICIES)
def test_swapped_equals_never_preempted(monkeypatch, policy, extra, kv_cache_dtype):
    """Swap preemption under a small pool gives the never-preempted tokens: the kept blocks
    (codes and scales) come back, and H2O's slot state stays with the sequence."""
    kw = dict(dtype="float64", max_model_len=128, kv_eviction=policy, kv_eviction_window=6,
              block_size=4, kv_cache_dtype=kv_cache_dtype, **extra)
    ref_llm = LLM(**kw)
    ref = _tokens(ref_llm, PROMPTS, 60)
    assert ref_llm.last_result.stats.num_preemptions == 0
    # pools (blocks of 4 tokens) where some victims are swapped out past their budget
    pool = {"sliding_window": 16, "streaming_llm": 12, "h2o": 14}[policy]
    llm = LLM(**kw, preemption_mode="swap", num_gpu_blocks_override=pool,
              enable_chunked_prefill=True, max_num_batched_tokens=16)
    managers, swaps = [], []
    make = engine_lanes.build_kv_manager

    def checked_manager(engine, num_blocks=None):
        kv = make(engine, num_blocks)
        preempt = kv.preempt

        def checked(req):
            swapped = preempt(req)
            swaps.append((swapped, req.num_computed))
            kv.check()
            return swapped

        kv.preempt = checked
        managers.append(kv)
        return kv

    monkeypatch.setattr(engine_lanes, "build_kv_manager", checked_manager)
    assert _tokens(llm, PROMPTS, 60) == ref
    (kv,) = managers
    assert swaps and all(swapped for swapped, _ in swaps)  # swapped, never recomputed
    # some victims had evicted positions (released blocks, H2O scores that chose evictions)
    assert max(n for _, n in swaps) > _eviction(policy, extra).budget
    assert kv.swap.num_swapped_out_blocks == kv.swap.num_swapped_in_blocks > 0
    kv.check()
    assert kv.pool.num_free_blocks() == kv.pool.num_blocks
    assert kv.swap.num_free_blocks == kv.swap.num_blocks
