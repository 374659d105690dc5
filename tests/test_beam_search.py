"""Beam search (`LLM.beam_search`): width 1 is greedy decoding, every beam's cumulative
log-probability is the reference model's, and (on these prompts) a wider beam finds a likelier
sequence than greedy."""

from __future__ import annotations

import numpy as np
import pytest

from sim import LLM, SamplingParams
from sim.beam_search import BeamSearchParams
from sim.errors import ConfigError
from sim.sampling import log_softmax

RNG = np.random.default_rng(3)
PROMPTS = [{"prompt_token_ids": RNG.integers(1, 200, n).tolist()} for n in (7, 19)]


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float64", max_model_len=64)


def _reference_logprob(llm, tokens, num_prompt):
    lp = log_softmax(llm.engine.functional_model.forward(np.asarray(tokens))[:-1])  # [n-1, V]
    return float(sum(lp[p - 1, tokens[p]] for p in range(num_prompt, len(tokens))))


def test_width_one_is_greedy_and_logprobs_are_the_models(llm):
    greedy = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    beams = llm.beam_search(PROMPTS, BeamSearchParams(beam_width=1, max_tokens=6,
                                                      ignore_eos=True))
    for g, b in zip(greedy, beams, strict=True):
        (seq,) = b.sequences
        assert seq.output_token_ids == g.outputs[0].token_ids
    wide = llm.beam_search(PROMPTS, BeamSearchParams(beam_width=3, max_tokens=6,
                                                     ignore_eos=True))
    for narrow, out, prompt in zip(beams, wide, PROMPTS, strict=True):
        n = len(prompt["prompt_token_ids"])
        assert len(out.sequences) == 3
        assert len({tuple(s.tokens) for s in out.sequences}) == 3
        scores = [s.score(1.0) for s in out.sequences]
        assert scores == sorted(scores, reverse=True)
        for s in out.sequences:
            assert s.cum_logprob == pytest.approx(_reference_logprob(llm, s.tokens, n), abs=1e-9)
        assert out.sequences[0].cum_logprob >= narrow.sequences[0].cum_logprob - 1e-12


def test_bad_params_are_rejected():
    with pytest.raises(ConfigError, match="beam_width"):
        BeamSearchParams(beam_width=0, max_tokens=4)
