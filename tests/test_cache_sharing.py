"""Parallel sampling (`SamplingParams(n=k)`) sharing the prompt's KV blocks with copy-on-write.

Oracles (float64): each sample equals an independent `n=1` run with seed `seed + i`; greedy
samples equal the greedy output; paged (shared) == contiguous (unshared) tokens; the prompt is
computed once plus one token per extra sample; every block is free at the end.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from cache.paged import PagedKVCache
from cache.parallel_sampling import sample_params
from sim import LLM, SamplingParams
from sim.core.errors import ConfigError, InfersimError
from sim.core.request import Request
from sim.core.step import BlockOp
from sim.engine.args import EngineArgs
from sim.engine.engine import Engine

RNG = np.random.default_rng(3)
PROMPTS = [{"prompt_token_ids": RNG.integers(1, 200, n).tolist()} for n in (29, 16, 7)]
SAMPLED = SamplingParams(n=3, temperature=0.9, top_p=0.95, seed=11, max_tokens=10,
                         ignore_eos=True)


def generate(params: SamplingParams, prompts=PROMPTS, **kwargs):
    llm = LLM(dtype="float64", max_num_seqs=16, max_model_len=96, **kwargs)
    return llm.generate(prompts, params), llm


def test_sample_params_follow_vllm_seeds():
    assert sample_params(SAMPLED, 2) == dataclasses.replace(SAMPLED, n=1, seed=13)
    assert sample_params(SamplingParams(n=4), 3).seed is None
    with pytest.raises(ConfigError):
        SamplingParams(n=0)


@pytest.mark.parametrize("block_size", [4, 16])
def test_each_sample_equals_an_independent_run_with_its_seed(block_size):
    outs, llm = generate(SAMPLED, block_size=block_size)
    for prompt, out in zip(PROMPTS, outs, strict=True):
        assert [c.index for c in out.outputs] == [0, 1, 2]
        for i, completion in enumerate(out.outputs):
            alone, _ = generate(sample_params(SAMPLED, i), [prompt], block_size=block_size)
            assert completion.token_ids == alone[0].outputs[0].token_ids
        assert len({tuple(c.token_ids) for c in out.outputs}) == 3  # really different samples
    # the prompt is computed once, plus its last token again for each extra sample
    stats = llm.last_result.stats
    num_prompt = sum(len(p["prompt_token_ids"]) for p in PROMPTS)
    assert stats.num_tokens_computed == num_prompt + 2 * 3 + 9 * 3 * 3


def test_unseeded_samples_differ_and_repeat_bit_identically():
    params = dataclasses.replace(SAMPLED, seed=None)
    first = [[c.token_ids for c in o.outputs] for o in generate(params)[0]]
    again = [[c.token_ids for c in o.outputs] for o in generate(params)[0]]
    assert first == again
    assert all(len({tuple(t) for t in sample}) == 3 for sample in first)
    # sample 0 is the n=1 stream of the same request
    single = generate(dataclasses.replace(params, n=1))[0]
    assert [s[0] for s in first] == [o.outputs[0].token_ids for o in single]


def test_greedy_samples_equal_greedy_and_contiguous_equals_paged():
    greedy = SamplingParams(n=2, temperature=0.0, max_tokens=8, ignore_eos=True)
    paged, _ = generate(greedy, block_size=4)
    contiguous, llm = generate(greedy, kv_cache="contiguous")
    one, _ = generate(dataclasses.replace(greedy, n=1))
    for p, c, o in zip(paged, contiguous, one, strict=True):
        assert [x.token_ids for x in p.outputs] == [x.token_ids for x in c.outputs]
        assert p.outputs[0].token_ids == p.outputs[1].token_ids == o.outputs[0].token_ids
    num_prompt = sum(len(p["prompt_token_ids"]) for p in PROMPTS)  # unshared: twice
    assert llm.last_result.stats.num_tokens_computed == 2 * num_prompt + 2 * 3 * 7


def test_samples_survive_preemption_and_every_block_is_freed():
    base, _ = generate(SAMPLED, block_size=4)
    for mode in ("recompute", "swap"):
        outs, llm = generate(SAMPLED, block_size=4, num_gpu_blocks_override=24,
                             preemption_mode=mode)
        assert llm.last_result.stats.num_preemptions > 0
        assert ([[c.token_ids for c in o.outputs] for o in outs]
                == [[c.token_ids for c in o.outputs] for o in base])


def test_one_token_samples_share_a_finished_leaders_prompt():
    outs, _ = generate(dataclasses.replace(SAMPLED, max_tokens=1))
    assert all(len(o.outputs) == 3 and all(len(c.token_ids) == 1 for c in o.outputs)
               for o in outs)


def test_a_rejected_request_rejects_all_its_samples():
    llm = LLM(max_model_len=32)
    out = llm.generate([{"prompt_token_ids": list(range(1, 40))}], SAMPLED)[0]
    assert len(out.outputs) == 3
    assert all(c.finish_reason == "rejected" for c in out.outputs)


def test_timing_mode_samples_share_blocks_and_free_them():
    engine = Engine(EngineArgs(mode="timing", block_size=4, max_model_len=96,
                               num_gpu_blocks_override=64))
    reqs = [engine.make_request(str(i), i, 30, SAMPLED, 0.0) for i in range(4)]
    result = engine.run(reqs, record_steps=True)
    assert len(result.requests) == 12
    assert all(r.num_output_tokens == 10 for r in result.requests)
    assert result.stats.num_tokens_computed == 4 * (30 + 2) + 12 * 9
    held = result.steps.columns()["kv_used_tokens"]
    assert held.max() <= 4 * (30 + 3 * 10)  # the prompt is held once per request


def request(rid: str, n: int) -> Request:
    return Request(request_id=rid, index=0, num_prompt_tokens=n, sampling=SamplingParams(),
                   arrival_s=0.0, prompt_token_ids=list(range(n)))


def test_fork_of_a_partial_block_copies_it_on_write():
    kv = PagedKVCache(8, 4)
    parent, child = request("p", 10), request("c", 10)
    assert kv.allocate(parent, 10)
    kv.fork(parent, child, 9)  # blocks 0, 1 full, block 2 holds position 8 only
    assert kv.block_table("c") == kv.block_table("p")
    assert kv.num_used_tokens() == 10
    assert kv.allocate(child, 10)  # writes position 9 into the shared block 2: copied
    _, work = kv.take_step_kv(())
    assert work.ops == (BlockOp("copy", kv.block_table("p")[2], kv.block_table("c")[2]),)
    assert work.num_copied_blocks == 1
    assert kv.block_table("c")[:2] == kv.block_table("p")[:2]
    kv.check()
    with pytest.raises(InfersimError):
        kv.fork(parent, request("x", 10), 11)
    kv.free(parent)
    kv.free(child)
    kv.check()
    assert kv.num_reserved_tokens() == 0


@pytest.mark.parametrize("kwargs", [{"scheduler": "static"},
                                    {"enable_prefix_caching": True, "block_size": 4}])
def test_samples_are_the_same_under_other_schedulers_and_prefix_caching(kwargs):
    base, _ = generate(SAMPLED)
    outs, _ = generate(SAMPLED, **kwargs)
    assert ([[c.token_ids for c in o.outputs] for o in outs]
            == [[c.token_ids for c in o.outputs] for o in base])
