"""Proposers and the closed-form analysis.

Oracles: the draft model's KV-cached greedy drafts equal a cacheless `generate` of the same
draft network, also after its context diverged from what it drafted (rollback); a zero-noise
proxy is the target; the formulas match their definitions and adaptive k picks the optimum.
"""

from __future__ import annotations

import numpy as np
import pytest

from sim.core.errors import ConfigError
from sim.core.request import Request, SamplingParams
from sim.model.numpy_model import NumpyModel
from sim.model.proxy import tiny_proxy_config
from sim.model.reference import generate
from sim.model.zoo import resolve_model
from speculative.acceptance import truncated_model
from speculative.analysis import (
    AdaptiveK,
    acceptance_from_counts,
    expected_tokens_per_step,
    optimal_k,
    walltime_improvement,
)
from speculative.proposers import DraftModelProposer, NgramProposer, noisy_model


@pytest.fixture(scope="module")
def target():
    config = tiny_proxy_config(resolve_model("meta-llama/Llama-2-7b-hf"), n_layer=3)
    return NumpyModel.random(config, seed=2, dtype="float64")


def _req(ids: list[int], rid: str = "a", greedy: bool = True) -> Request:
    params = SamplingParams(temperature=0 if greedy else 1.0, max_tokens=50)
    rng = None if greedy else np.random.default_rng(0)
    return Request(rid, 0, len(ids), params, 0.0, rng=rng, prompt_token_ids=list(ids))


def test_ngram_proposer_copies_from_the_context():
    prop = NgramProposer(1, 3)
    assert prop.propose(_req([1, 2, 3, 9, 1, 2]), 2).token_ids == (3, 9)
    assert prop.propose(_req([4, 5, 6]), 3).token_ids == ()
    assert prop.propose(_req([1, 2, 1]), 0).probs is None


def test_draft_model_drafts_are_its_greedy_continuation_with_rollback(target):
    draft = noisy_model(target, 0.3, seed=1)
    prop = DraftModelProposer(draft, target.config.n_vocab)
    prompt = [5, 9, 14, 2, 7]
    req = _req(prompt)
    d1 = prop.propose(req, 4).token_ids
    assert list(d1) == generate(draft, prompt, 4)
    # the target accepted 1 draft and corrected the next: the draft must roll back its KV
    req.output_token_ids += [d1[0], (d1[1] + 1) % 50]
    req.num_output_tokens = 2
    ctx = req.token_ids_slice(0, req.num_tokens)
    assert list(prop.propose(req, 3).token_ids) == generate(draft, ctx, 3)
    prop.release(req)
    assert not prop.store.has("a")


def test_sampled_drafts_report_their_distributions(target):
    prop = DraftModelProposer(truncated_model(target, 1), target.config.n_vocab)
    out = prop.propose(_req([3, 4, 5], greedy=False), 3)
    assert out.probs is not None and out.probs.shape == (3, target.config.n_vocab)
    assert all(out.probs[i, t] > 0 for i, t in enumerate(out.token_ids))
    np.testing.assert_allclose(out.probs.sum(axis=1), 1.0)


def test_controlled_proxies(target):
    same = noisy_model(target, 0.0)
    ids = [1, 2, 3, 4]
    np.testing.assert_array_equal(same.forward(ids), target.forward(ids))
    a, b = noisy_model(target, 0.1, seed=3), noisy_model(target, 0.1, seed=3)
    np.testing.assert_array_equal(a.forward(ids), b.forward(ids))
    assert not np.array_equal(a.forward(ids), target.forward(ids))
    other = NumpyModel.random(tiny_proxy_config(resolve_model("meta-llama/Llama-2-7b-hf")))
    with pytest.raises(ConfigError, match="vocabulary"):
        DraftModelProposer(other, target.config.n_vocab + 1)


def test_formulas():
    assert expected_tokens_per_step(0.0, 4) == 1.0
    assert expected_tokens_per_step(1.0, 4) == 5.0
    a, k = 0.7, 3
    assert np.isclose(expected_tokens_per_step(a, k), sum(a**i for i in range(k + 1)))
    assert np.isclose(walltime_improvement(a, k, 0.1), expected_tokens_per_step(a, k) / 1.3)
    assert optimal_k(0.9, 0.05) > optimal_k(0.5, 0.05) >= 1
    assert optimal_k(0.2, 1.0) == 0  # a draft as slow as the target never pays
    assert acceptance_from_counts(np.array([2, 0, 4]), np.array([4, 4, 4])) == 6 / 8
    with pytest.raises(ConfigError):
        expected_tokens_per_step(1.5, 2)


def test_adaptive_k_converges_to_the_optimum():
    rng = np.random.default_rng(0)
    for a in (0.3, 0.9):
        policy = AdaptiveK(c=0.05, k_max=10)
        for _ in range(400):
            k = policy.k()
            hits = rng.random(k) < a
            policy.observe(int(k if hits.all() else np.argmin(hits)), k)
        assert abs(policy.acceptance - a) < 0.1
        assert abs(policy.k() - optimal_k(a, 0.05, 10, 1)) <= 1
