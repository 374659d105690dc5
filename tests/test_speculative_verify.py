"""Verification oracles: greedy keeps the target's arg-max path; rejection sampling reproduces
the target distribution exactly (closed form on a tiny vocabulary, enumerating every draft and
outcome) and empirically (seeded chi-square), composed with temperature / top-k / top-p."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from sim.core.errors import ConfigError
from sim.core.request import SamplingParams
from sim.model.sampling import sampling_probs
from speculative.verify import (
    accept_prob,
    greedy_verify,
    rejection_verify,
    residual_probs,
    verify,
)

V = 4  # tiny vocabulary


def _dist(rng: np.random.Generator, sparse: bool = False) -> np.ndarray:
    p = rng.dirichlet(np.ones(V))  # [V]
    if sparse:  # zeros in the support (as top-k / top-p produce)
        p[rng.integers(V)] = 0.0
        p /= p.sum()
    return p


def test_greedy_verify_keeps_the_argmax_prefix_and_adds_one_token():
    logits = np.eye(V)[[2, 1, 3, 0]]  # [4, V]: target arg-max 2, 1, 3, then 0
    assert greedy_verify([2, 1, 3], logits).token_ids == (2, 1, 3, 0)  # all kept + bonus
    out = greedy_verify([2, 0, 3], logits)
    assert out.token_ids == (2, 1) and out.num_accepted == 1  # correction at the mismatch
    assert greedy_verify([], logits[:1]).token_ids == (2,)
    with pytest.raises(ConfigError):
        greedy_verify([1, 2], logits)  # needs k + 1 rows


def test_the_first_emitted_token_is_distributed_as_p_in_closed_form():
    rng = np.random.default_rng(0)
    for trial in range(50):
        p, q = _dist(rng, sparse=trial % 2 == 0), _dist(rng, sparse=trial % 3 == 0)
        out = np.zeros(V)
        for x in range(V):  # the draft token, drawn from q
            if q[x] == 0:
                continue
            a = accept_prob(p, q, x)
            out[x] += q[x] * a
            out += q[x] * (1 - a) * residual_probs(p, q, x)
        np.testing.assert_allclose(out, p, atol=1e-12)
        # a deterministic draft token (n-gram lookup: q = one-hot) is exact too
        x = int(rng.integers(V))
        det = np.zeros(V)
        det[x] = accept_prob(p, None, x)
        det += (1 - det[x]) * residual_probs(p, None, x)
        np.testing.assert_allclose(det, p, atol=1e-12)


def _exact_two_token_law(p_of, q_of):
    """P(first two emitted tokens) of a k=2 step, enumerating drafts, accepts and residuals."""
    law = np.zeros((V, V))
    for x1, x2 in itertools.product(range(V), repeat=2):
        q1, q2 = q_of(()), q_of((x1,))
        w = q1[x1] * q2[x2]
        if w == 0:
            continue
        p1, p2, p3 = p_of(()), p_of((x1,)), p_of((x1, x2))
        a1 = accept_prob(p1, q1, x1)
        # rejected at 1: a residual token, then the next step's first token ~ p(. | y1)
        r1 = residual_probs(p1, q1, x1)
        for y1 in range(V):
            law[y1] += w * (1 - a1) * r1[y1] * p_of((y1,))
        a2 = accept_prob(p2, q2, x2)
        law[x1] += w * a1 * (1 - a2) * residual_probs(p2, q2, x2)
        law[x1, x2] += w * a1 * a2  # both kept (the bonus ~ p3 is the third token)
        assert np.isclose(p3.sum(), 1.0)
    return law


def test_two_token_output_law_is_the_targets_in_closed_form():
    rng = np.random.default_rng(1)
    table_p = {(): _dist(rng)} | {(a,): _dist(rng, True) for a in range(V)} | {
        (a, b): _dist(rng) for a in range(V) for b in range(V)}
    table_q = {(): _dist(rng)} | {(a,): _dist(rng) for a in range(V)}
    law = _exact_two_token_law(table_p.__getitem__, table_q.__getitem__)
    target = np.array([[table_p[()][a] * table_p[(a,)][b] for b in range(V)] for a in range(V)])
    np.testing.assert_allclose(law, target, atol=1e-12)


@pytest.mark.parametrize("deterministic", [False, True])
def test_rejection_sampling_passes_a_seeded_chi_square_test(deterministic):
    rng = np.random.default_rng(2)
    p = np.stack([_dist(rng) for _ in range(3)])  # [k + 1 = 3, V]
    q = np.stack([_dist(rng) for _ in range(2)])  # [k = 2, V]
    draws = np.random.default_rng(3)
    n = 20000
    first = np.zeros(V)
    second_after_accept = np.zeros(V)
    for _ in range(n):
        if deterministic:  # n-gram style: a fixed draft
            draft, probs = [1, 2], None
        else:
            draft = [int(draws.choice(V, p=q[0])), int(draws.choice(V, p=q[1]))]
            probs = q
        out = rejection_verify(draft, probs, p, draws)
        first[out.token_ids[0]] += 1
        if out.num_accepted >= 1:
            second_after_accept[out.token_ids[1]] += 1
    assert stats.chisquare(first, n * p[0]).pvalue > 1e-3
    # given the first draft was kept, the second emitted token follows p[1]
    m = second_after_accept.sum()
    assert stats.chisquare(second_after_accept, m * p[1]).pvalue > 1e-3


@settings(max_examples=25, deadline=None)
@given(st.floats(0.3, 2.0), st.sampled_from([-1, 2, 3]), st.floats(0.5, 1.0), st.integers(0, 99))
def test_verify_composes_with_temperature_top_k_top_p_exactly(temperature, top_k, top_p, seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(2, V)) * 2  # [k + 1 = 2, V]
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    p = sampling_probs(logits[0], params)  # [V]
    q = _dist(rng)
    # the exact law of the first token via the verify path's own functions
    out = np.zeros(V)
    for x in range(V):
        a = accept_prob(p, q, x)
        out[x] += q[x] * a
        out += q[x] * (1 - a) * residual_probs(p, q, x)
    np.testing.assert_allclose(out, p, atol=1e-12)
    # verify() never emits a token the target's filters exclude
    x = int(rng.choice(V, p=q))
    res = verify([x], q[None, :], logits, params, np.random.default_rng(seed))
    assert all(sampling_probs(logits[j], params)[t] > 0 for j, t in enumerate(res.token_ids))


def test_greedy_params_verify_greedily_without_randomness():
    logits = np.array([[0.0, 3.0, 1.0, 0.0], [5.0, 0.0, 0.0, 0.0]])  # [2, V]
    res = verify([1], None, logits, SamplingParams(temperature=0), None)
    assert res.token_ids == (1, 0)
    with pytest.raises(ConfigError):
        verify([1], None, logits, SamplingParams(temperature=1.0), None)
