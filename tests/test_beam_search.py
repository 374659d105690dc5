"""Beam search through the engine (`cache.beam_search`): forked, copy-on-write beams give the
same beams as the cacheless reference (every beam recomputed from scratch, float64) for every KV
layout, under preemption and beside other requests; width 1 is greedy decoding; the beams share
their blocks; a search that could never complete is rejected with a reason."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sim import LLM, SamplingParams
from sim.core.errors import ConfigError
from sim.model.beam_search import BeamSearchParams
from sim.model.reference import beam_search as reference_beam_search
from sim.model.reference import generate
from sim.model.sampling import log_softmax

RNG = np.random.default_rng(3)
PROMPTS = [{"prompt_token_ids": RNG.integers(1, 200, n).tolist()} for n in (7, 19, 33)]
MAX_MODEL_LEN = 64


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float64", max_model_len=MAX_MODEL_LEN)


def _expected(llm, prompts, width, max_tokens, stop=()):
    model, eos = llm.engine.functional_model, set(llm.engine.eos_token_ids) | set(stop)
    return [reference_beam_search(model, p["prompt_token_ids"], width, max_tokens, eos,
                                  max_model_len=llm.engine.max_model_len) for p in prompts]


def _assert_same(outs, expected):
    for out, ref in zip(outs, expected, strict=True):
        assert [s.tokens for s in out.sequences] == [b.tokens for b in ref]
        assert [s.finish_reason for s in out.sequences] == [b.finish_reason for b in ref]
        np.testing.assert_allclose([s.cum_logprob for s in out.sequences],
                                   [b.cum_logprob for b in ref], atol=1e-9)


@pytest.mark.parametrize("kwargs", [
    {"block_size": 1}, {"block_size": 4}, {"block_size": 16}, {"kv_cache": "contiguous"},
    {"kv_cache": "none"}, {"block_size": 4, "enable_prefix_caching": True},
    {"tensor_parallel_size": 2},  # per-GPU stores: forked beams recompute
], ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_engine_beams_equal_the_cacheless_reference(kwargs):
    llm = LLM(dtype="float64", max_model_len=MAX_MODEL_LEN, **kwargs)
    outs = llm.beam_search(PROMPTS, BeamSearchParams(beam_width=3, max_tokens=7))
    _assert_same(outs, _expected(llm, PROMPTS, 3, 7))


def test_finished_beams_stop_tokens_and_length_penalty(llm):
    # a stop token the search meets: the 2nd likeliest first token of the first prompt
    first = log_softmax(llm.engine.functional_model.forward(
        np.asarray(PROMPTS[0]["prompt_token_ids"]))[-1])
    stop = int(np.argsort(-first)[1])
    params = SamplingParams(n=3, use_beam_search=True, temperature=0.0, max_tokens=6,
                            stop_token_ids=[stop], length_penalty=0.5)
    outs = llm.generate(PROMPTS[:1], params)
    ref = reference_beam_search(llm.engine.functional_model, PROMPTS[0]["prompt_token_ids"], 3,
                                6, set(llm.engine.eos_token_ids) | {stop}, length_penalty=0.5)
    assert any(b.finish_reason == "stop" for b in ref)  # the test reaches a finished beam
    got = outs[0].outputs
    assert [c.token_ids for c in got] == [b.output_token_ids for b in ref]
    assert [c.finish_reason for c in got] == [b.finish_reason for b in ref]
    assert [c.index for c in got] == [0, 1, 2]


def test_width_one_is_greedy_and_logprobs_are_the_models(llm):
    greedy = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    beams = llm.beam_search(PROMPTS, BeamSearchParams(beam_width=1, max_tokens=6,
                                                      ignore_eos=True))
    model = llm.engine.functional_model
    for g, b, prompt in zip(greedy, beams, PROMPTS, strict=True):
        (seq,) = b.sequences
        assert seq.output_token_ids == g.outputs[0].token_ids
        n = len(prompt["prompt_token_ids"])
        lp = log_softmax(model.forward(np.asarray(seq.tokens))[:-1])  # [len - 1, n_vocab]
        assert seq.cum_logprob == pytest.approx(
            sum(lp[p - 1, seq.tokens[p]] for p in range(n, len(seq.tokens))), abs=1e-9)
    wide = llm.beam_search(PROMPTS, BeamSearchParams(beam_width=3, max_tokens=6,
                                                     ignore_eos=True))
    for narrow, out in zip(beams, wide, strict=True):
        assert len({tuple(s.tokens) for s in out.sequences}) == 3
        assert out.sequences[0].cum_logprob >= narrow.sequences[0].cum_logprob - 1e-12


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preempted_beams_beside_other_requests_give_the_same_answers(mode):
    # 33 blocks of 4 tokens cannot hold three 3-beam searches and two plain requests at once
    llm = LLM(dtype="float64", max_model_len=MAX_MODEL_LEN, block_size=4,
              num_gpu_blocks_override=33, preemption_mode=mode, swap_space=1, max_num_seqs=11)
    plain = [{"prompt_token_ids": RNG.integers(1, 200, n).tolist()} for n in (11, 23)]
    beam = SamplingParams(n=3, use_beam_search=True, temperature=0.0, max_tokens=10,
                          ignore_eos=True)
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    outs = llm.generate(PROMPTS + plain, [beam] * 3 + [greedy] * 2)
    assert llm.last_result.stats.num_preemptions > 0
    model = llm.engine.functional_model
    for out, prompt in zip(outs[:3], PROMPTS, strict=True):
        ref = reference_beam_search(model, prompt["prompt_token_ids"], 3, 10)
        assert [c.token_ids for c in out.outputs] == [b.output_token_ids for b in ref]
    for out, prompt in zip(outs[3:], plain, strict=True):
        assert out.outputs[0].token_ids == generate(model, prompt["prompt_token_ids"], 12)


def test_beams_share_blocks_respect_max_num_seqs_and_price_rounds():
    prompt = [{"prompt_token_ids": RNG.integers(1, 200, 48).tolist()}]
    params = BeamSearchParams(beam_width=4, max_tokens=8, ignore_eos=True)
    held = {}
    for kv in ("paged", "contiguous"):
        llm = LLM(dtype="float64", max_model_len=MAX_MODEL_LEN, block_size=4, max_num_seqs=4,
                  kv_cache=kv)
        result = llm.engine.run(
            [llm.engine.make_request("0", 0, 48, params.sampling_params(), 0.0,
                                     prompt[0]["prompt_token_ids"])], record_steps=True)
        cols = result.steps.columns()
        assert cols["num_seqs"].max() == 4  # the 4 beams decode together, never more
        # copy-on-write block copies are counted (paged forks share a partly filled last block)
        assert (result.stats.num_copied_blocks > 0) == (kv == "paged")
        held[kv] = (int(cols["kv_used_tokens"].max()), result.stats.num_tokens_computed,
                    result.requests[0])
    # paged: the 48-token prompt is held once (4 beams x 8 tokens on top, at most)
    assert held["paged"][0] <= 48 + 4 * 8
    assert held["contiguous"][0] >= 2 * 48  # each forked beam holds its own copy
    # paged computes the prompt once, then one token per beam per round
    assert held["paged"][1] == 48 + 4 * 7
    assert held["paged"][1] < held["contiguous"][1]
    req = held["paged"][2]
    assert len(req.token_times_s) == 8 and req.first_token_s == req.token_times_s[0]
    assert req.finished_s == req.token_times_s[-1]


def test_a_search_that_cannot_complete_is_rejected_with_a_reason():
    llm = LLM(dtype="float64", max_model_len=MAX_MODEL_LEN, max_num_seqs=2)
    (out,) = llm.generate(PROMPTS[:1], SamplingParams(n=3, use_beam_search=True,
                                                       temperature=0.0, max_tokens=4))
    assert "max_num_seqs" in out.reject_reason
    small = LLM(dtype="float64", max_model_len=MAX_MODEL_LEN, block_size=4,
                num_gpu_blocks_override=16)
    (out,) = small.generate(PROMPTS[:1], SamplingParams(n=4, use_beam_search=True,
                                                        temperature=0.0, max_tokens=40))
    assert "KV cache" in out.reject_reason
    with pytest.raises(ConfigError, match="beam search"):
        small.beam_search(PROMPTS[:1], BeamSearchParams(beam_width=4, max_tokens=40))


def test_bad_params_are_rejected():
    with pytest.raises(ConfigError, match="beam_width"):
        BeamSearchParams(beam_width=0, max_tokens=4)
    with pytest.raises(ConfigError, match="temperature=0"):
        SamplingParams(n=2, use_beam_search=True)
    with pytest.raises(ConfigError, match="min_tokens"):
        SamplingParams(n=2, use_beam_search=True, temperature=0.0, min_tokens=3)
    with pytest.raises(ConfigError, match="mode='functional'"):
        LLM(mode="timing").generate(
            "hi", SamplingParams(n=2, use_beam_search=True, temperature=0.0))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(width=st.integers(1, 4), max_tokens=st.integers(1, 6),
       block_size=st.sampled_from([1, 2, 4, 16]), lens=st.lists(st.integers(1, 20), min_size=1,
                                                               max_size=3))
def test_property_any_width_and_block_size_equals_reference(width, max_tokens, block_size, lens):
    llm = LLM(dtype="float64", max_model_len=32, block_size=block_size)
    rng = np.random.default_rng(sum(lens))
    prompts = [{"prompt_token_ids": rng.integers(1, 200, n).tolist()} for n in lens]
    outs = llm.beam_search(prompts, BeamSearchParams(beam_width=width, max_tokens=max_tokens))
    _assert_same(outs, _expected(llm, prompts, width, max_tokens))


def test_a_search_reserves_a_seat_per_beam_before_it_forks():
    # the search's prompt step runs beside one plain request only: its 3 beams need 3 of the 4
    # seats once they fork, so the other plain requests wait instead of overfilling the batch
    llm = LLM(dtype="float64", max_model_len=MAX_MODEL_LEN, max_num_seqs=4)
    plain = [llm.engine.make_request(str(i), i, 5, SamplingParams(temperature=0.0, max_tokens=6),
                                     0.0, [1, 2, 3, 4, 5]) for i in (1, 2, 3)]
    beam = llm.engine.make_request("0", 0, 7, BeamSearchParams(3, 6).sampling_params(), 0.0,
                                   PROMPTS[0]["prompt_token_ids"])
    result = llm.engine.run([beam, *plain], record_steps=True)
    cols = result.steps.columns()
    assert cols["num_seqs"].max() == 4
    assert cols["num_seqs"][0] == 2  # the search's prompt and one plain request
    assert all(r.status.value == "finished" for r in result.requests)


@pytest.mark.parametrize("kwargs", [{}, {"kv_cache": "contiguous", "enable_chunked_prefill": True}])
def test_beams_held_for_a_round_by_the_token_budget_give_the_same_beams(kwargs):
    # 6 beams, 4 tokens a step: a round completes over two steps, the early beams held
    prompts = [[5, 9, 13], [7, 1, 2, 8]]
    llm = LLM(dtype="float64", max_model_len=MAX_MODEL_LEN, max_num_batched_tokens=4, **kwargs)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(n=3, use_beam_search=True, temperature=0.0, max_tokens=6,
                                       ignore_eos=True))
    for out, prompt in zip(outs, prompts, strict=True):
        ref = reference_beam_search(llm.engine.functional_model, prompt, 3, 6)
        assert [c.token_ids for c in out.outputs] == [b.output_token_ids for b in ref]


@settings(max_examples=15, deadline=None)
@given(kv=st.sampled_from(["paged", "contiguous"]), chunked=st.booleans(),
       budget=st.sampled_from([8, 16, 64]), blocks=st.sampled_from([34, 48, 200]),
       mode=st.sampled_from(["recompute", "swap"]), seed=st.integers(0, 10**6))
def test_property_beams_beside_plain_requests_under_pressure(kv, chunked, budget, blocks, mode,
                                                             seed):
    rng = np.random.default_rng(seed)
    lens = rng.integers(2, 8 if not chunked else 30, size=4).tolist()
    prompts = [rng.integers(1, 200, n).tolist() for n in lens]
    llm = LLM(dtype="float64", max_model_len=48, block_size=4, kv_cache=kv,
              num_gpu_blocks_override=blocks, swap_space=1,
              preemption_mode=mode if kv == "paged" else "recompute",  # swap: paged only
              enable_chunked_prefill=chunked, max_num_batched_tokens=budget, max_num_seqs=12)
    beam = SamplingParams(n=3, use_beam_search=True, temperature=0.0, max_tokens=8,
                          ignore_eos=True)
    greedy = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], [beam, greedy, beam, beam])
    model = llm.engine.functional_model
    assert outs[1].reject_reason is None  # the plain request always fits: it must have run
    for i, (out, prompt) in enumerate(zip(outs, prompts, strict=True)):
        if out.reject_reason is not None:  # only up-front reasons, never a stall
            assert "stalled" not in out.reject_reason
            continue
        if i == 1:
            assert out.outputs[0].token_ids == generate(model, prompt, 10)
        else:
            ref = reference_beam_search(model, prompt, 3, 8)
            assert [c.token_ids for c in out.outputs] == [b.output_token_ids for b in ref]
