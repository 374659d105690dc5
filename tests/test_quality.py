"""The quality harness: perplexity, next-token KL and top-1 agreement, and teacher forcing
through the KV store (checked against the cacheless forward pass on a tiny float64 model)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.core.errors import ConfigError
from sim.model.numpy_model import NumpyModel
from sim.model.proxy import tiny_proxy_config
from sim.model.quality import (
    compare,
    eval_text,
    eval_token_ids,
    next_token_kl,
    perplexity,
    reference_logits,
    teacher_forced_logits,
    token_nll,
    top1_agreement,
)
from sim.model.tokenizer import ByteTokenizer
from sim.model.zoo import resolve_model


@pytest.fixture(scope="module")
def tiny():
    config = tiny_proxy_config(resolve_model("meta-llama/Llama-2-7b-hf"))
    return NumpyModel.random(config, seed=3, dtype="float64")


def test_eval_text_ships_with_the_package():
    text = eval_text()
    assert len(text.split()) > 400 and "def count_words" in text
    ids = eval_token_ids(ByteTokenizer(), max_tokens=100)
    assert len(ids) == 100 and ids[0] == ByteTokenizer.bos_token_id


def test_uniform_logits_have_vocabulary_perplexity():
    logits = np.zeros((5, 7))  # [n, n_vocab]
    assert perplexity(logits, [0, 1, 2, 3, 4]) == pytest.approx(7.0)
    nll = token_nll(np.log(np.eye(3)[[1, 2, 0]] + 1e-300), [0, 1, 2])  # certain and right
    np.testing.assert_allclose(nll, 0.0, atol=1e-12)


def test_kl_and_top1_of_identical_and_shifted_logits():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((6, 11))  # [n, n_vocab]
    np.testing.assert_allclose(next_token_kl(a, a), 0.0, atol=1e-12)
    np.testing.assert_allclose(next_token_kl(a, a + 5.0), 0.0, atol=1e-12)  # softmax shift
    assert top1_agreement(a, a) == 1.0
    assert top1_agreement(a, -a) == 0.0
    # KL of two-outcome distributions in closed form
    p, q = np.log([[0.25, 0.75]]), np.log([[0.5, 0.5]])
    expect = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert next_token_kl(p, q)[0] == pytest.approx(expect)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(0.0, 3.0))
def test_kl_is_non_negative_and_grows_with_noise(seed, scale):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((4, 9))  # [n, n_vocab]
    noise = rng.standard_normal((4, 9))  # [n, n_vocab]
    kl_small = next_token_kl(a, a + 0.1 * scale * noise)
    assert np.all(kl_small >= 0)
    report = compare(a, a + scale * noise, [0, 1, 2, 3])
    assert report.mean_kl >= 0 and 0 <= report.top1_agreement <= 1


def test_teacher_forcing_through_the_kv_store_matches_the_cacheless_pass(tiny):
    ids = np.random.default_rng(1).integers(0, tiny.config.n_vocab, 40)  # [40]
    ref = reference_logits(tiny, ids)
    for chunk_size in (None, 1, 7):
        got = teacher_forced_logits(tiny, ids, chunk_size=chunk_size)
        np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-10)
    report = compare(ref, teacher_forced_logits(tiny, ids, chunk_size=5), ids)
    assert report.top1_agreement == 1.0 and report.mean_kl < 1e-12
    assert report.perplexity == pytest.approx(report.reference_perplexity)
    assert "top-1 agreement" in report.format_table()
    assert report.as_dict()["num_tokens"] == 40


def test_a_lossy_candidate_costs_quality(tiny):
    ids = np.random.default_rng(2).integers(0, tiny.config.n_vocab, 30)  # [30]
    ref = reference_logits(tiny, ids)
    noisy = ref + np.random.default_rng(3).standard_normal(ref.shape) * 2.0  # [30, n_vocab]
    report = compare(ref, noisy, ids)
    assert report.mean_kl > 0.1 and report.top1_agreement < 1.0


def test_bad_inputs_are_clear_errors(tiny):
    with pytest.raises(ConfigError, match="logit shapes differ"):
        next_token_kl(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(ConfigError, match=">= 2 tokens"):
        perplexity(np.zeros((1, 3)), [0])
    with pytest.raises(ConfigError, match="chunk_size"):
        teacher_forced_logits(tiny, [1, 2, 3], chunk_size=-1)
