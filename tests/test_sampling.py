"""Sampling: greedy, filters, exact distribution (chi-square), determinism, logprobs."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from sim.core.request import SamplingParams
from sim.model.sampling import log_softmax, sample_token, sampling_probs, token_logprobs


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def test_greedy_is_first_argmax():
    logits = np.array([0.1, 3.0, 3.0, -1.0])
    assert sample_token(logits, SamplingParams(temperature=0), None) == 1
    assert sampling_probs(logits, SamplingParams(temperature=0)).tolist() == [0, 1, 0, 0]


def test_temperature_only_is_scaled_softmax():
    logits = np.array([1.0, 2.0, 0.5, -0.3])
    probs = sampling_probs(logits, SamplingParams(temperature=0.7))
    np.testing.assert_allclose(probs, softmax(logits / 0.7), rtol=1e-12)


def test_top_k_keeps_k_largest():
    logits = np.array([1.0, 4.0, 3.0, 2.0, 0.0])
    probs = sampling_probs(logits, SamplingParams(temperature=1.0, top_k=2))
    expected = np.zeros(5)
    expected[[1, 2]] = softmax(np.array([4.0, 3.0]))
    np.testing.assert_allclose(probs, expected, rtol=1e-12)


def test_top_p_smallest_set_reaching_p():
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.75 keeps the first two (0.5 < 0.75 <= 0.8)
    p = np.array([0.5, 0.3, 0.15, 0.05])
    probs = sampling_probs(np.log(p), SamplingParams(temperature=1.0, top_p=0.75))
    np.testing.assert_allclose(probs, [0.5 / 0.8, 0.3 / 0.8, 0, 0], rtol=1e-12)
    # top_p below the top token's mass keeps only the top token
    probs = sampling_probs(np.log(p), SamplingParams(temperature=1.0, top_p=0.1))
    np.testing.assert_allclose(probs, [1, 0, 0, 0])


@given(
    logits=st.lists(st.floats(-5, 5), min_size=2, max_size=12),
    temperature=st.floats(0.05, 3.0),
    top_k=st.integers(-1, 12),
    top_p=st.floats(0.05, 1.0),
)
@settings(max_examples=200, deadline=None)
def test_probs_are_a_distribution(logits, temperature, top_k, top_p):
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    probs = sampling_probs(np.array(logits), params)
    assert probs.min() >= 0
    assert probs.sum() == pytest.approx(1.0)
    assert probs[int(np.argmax(logits))] > 0  # the most likely token always survives
    if top_k > 0:
        assert np.count_nonzero(probs) <= top_k


def test_samples_follow_the_distribution_chi_square():
    rng = np.random.default_rng(1234)
    logits = np.array([2.0, 1.0, 0.5, 0.0, -1.0, 1.5])
    params = SamplingParams(temperature=0.8, top_k=5, top_p=0.95)
    expected = sampling_probs(logits, params)
    n = 20_000
    counts = np.bincount([sample_token(logits, params, rng) for _ in range(n)], minlength=6)
    support = expected > 0
    assert counts[~support].sum() == 0
    _, p_value = stats.chisquare(counts[support], expected[support] * n)
    assert p_value > 1e-3


def test_same_generator_state_same_token():
    logits = np.linspace(-1, 1, 50)
    params = SamplingParams(temperature=1.0)
    a = [sample_token(logits, params, np.random.default_rng(7)) for _ in range(3)]
    assert len(set(a)) == 1


def test_logprobs_rank_and_values():
    logits = np.array([0.0, 2.0, 1.0])
    lp, entries = token_logprobs(logits, 0, num_top=1)
    ref = log_softmax(logits)
    assert lp == pytest.approx(ref[0])
    assert set(entries) == {1, 0}  # the top-1 token plus the sampled one
    assert entries[1].rank == 1 and entries[0].rank == 3


def test_bad_params_raise_clear_errors():
    for kwargs in ({"temperature": -1}, {"top_p": 0}, {"top_k": -2}, {"max_tokens": 0}):
        with pytest.raises(ValueError):
            SamplingParams(**kwargs)
