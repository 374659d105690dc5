"""sim.model.layers against small hand-written formulas (loops, one element at a time)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.core.errors import ConfigError
from sim.model import layers as L

RNG = np.random.default_rng(0)


def test_rms_norm_matches_formula() -> None:
    x, w = RNG.standard_normal((3, 8)), RNG.standard_normal(8)
    got = L.rms_norm(x, w, 1e-5)
    for i in range(3):
        rms = math.sqrt(sum(v * v for v in x[i]) / 8 + 1e-5)
        for j in range(8):
            assert got[i, j] == pytest.approx(x[i, j] / rms * w[j], rel=1e-12)


def test_rms_norm_keeps_float32() -> None:
    x = RNG.standard_normal((2, 4)).astype(np.float32)
    assert L.rms_norm(x, np.ones(4, np.float32), 1e-6).dtype == np.float32


def test_rope_rotates_pairs_i_and_i_plus_half() -> None:
    d_head, n_heads = 8, 2
    inv_freq = L.rope_inv_freq(d_head, 10000.0, None, np.float64)
    np.testing.assert_allclose(inv_freq, [10000.0 ** (-i / d_head) for i in range(0, 8, 2)])
    positions = np.array([0, 3, 17])
    x = RNG.standard_normal((3, n_heads, d_head))
    cos, sin = L.rope_cos_sin(inv_freq, positions)
    got = L.apply_rope(x, cos, sin)
    for t, pos in enumerate(positions):
        for h in range(n_heads):
            for i in range(d_head // 2):
                angle = pos * inv_freq[i]
                a, b = x[t, h, i], x[t, h, i + d_head // 2]
                assert got[t, h, i] == pytest.approx(a * math.cos(angle) - b * math.sin(angle))
                assert got[t, h, i + 4] == pytest.approx(b * math.cos(angle) + a * math.sin(angle))


def test_rope_preserves_norm_and_relative_positions() -> None:
    inv_freq = L.rope_inv_freq(16, 500.0, None, np.float64)
    q, k = RNG.standard_normal((1, 1, 16)), RNG.standard_normal((1, 1, 16))

    def dot_at(pq: int, pk: int) -> float:
        cq, sq = L.rope_cos_sin(inv_freq, np.array([pq]))
        ck, sk = L.rope_cos_sin(inv_freq, np.array([pk]))
        return float((L.apply_rope(q, cq, sq) * L.apply_rope(k, ck, sk)).sum())

    assert dot_at(7, 3) == pytest.approx(dot_at(24, 20))
    c, s = L.rope_cos_sin(inv_freq, np.array([11]))
    assert np.linalg.norm(L.apply_rope(q, c, s)) == pytest.approx(np.linalg.norm(q))


def test_rope_linear_and_llama3_scaling() -> None:
    base = L.rope_inv_freq(16, 10000.0, None, np.float64)
    linear = L.rope_inv_freq(16, 10000.0, {"rope_type": "linear", "factor": 4.0}, np.float64)
    np.testing.assert_allclose(linear, base / 4)
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    got = L.rope_inv_freq(16, 10000.0, scaling, np.float64)
    for f, g in zip(base, got, strict=True):
        wavelen = 2 * math.pi / f
        if wavelen < 32 / 4:  # high frequency: kept
            assert g == pytest.approx(f)
        elif wavelen > 32 / 1:  # low frequency: divided by the factor
            assert g == pytest.approx(f / 8)
        else:  # in between: linear blend in 1/wavelength
            smooth = (32 / wavelen - 1) / (4 - 1)
            assert g == pytest.approx((1 - smooth) * f / 8 + smooth * f)
    assert {g == pytest.approx(f) for f, g in zip(base, got, strict=True)} == {True, False}


@pytest.mark.parametrize("scaling", [{"rope_type": "yarn", "factor": 2.0},
                                     {"rope_type": "linear"}])
def test_rope_unsupported_scaling_is_a_config_error(scaling: dict) -> None:
    with pytest.raises(ConfigError, match="rope"):
        L.rope_inv_freq(16, 10000.0, scaling, np.float64)


def _naive_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, q_pos: np.ndarray,
                     window: int | None) -> np.ndarray:
    n_q, n_head, d = q.shape
    group = n_head // k.shape[1]
    out = np.zeros((n_q, n_head, d))
    for t in range(n_q):
        for h in range(n_head):
            keys = [j for j in range(k.shape[0]) if j <= q_pos[t]
                    and (window is None or q_pos[t] - j < window)]
            scores = np.array([q[t, h] @ k[j, h // group] / math.sqrt(d) for j in keys])
            p = np.exp(scores - scores.max())
            p /= p.sum()
            out[t, h] = sum(pj * v[j, h // group] for pj, j in zip(p, keys, strict=True))
    return out.reshape(n_q, n_head * d)


@pytest.mark.parametrize("n_kv_head", [1, 2, 4])
@pytest.mark.parametrize("window", [None, 1, 3])
def test_attention_gqa_and_window_match_naive(n_kv_head: int, window: int | None) -> None:
    n_k, n_head, d = 9, 4, 6
    q = RNG.standard_normal((4, n_head, d))
    k, v = RNG.standard_normal((2, n_k, n_kv_head, d))
    q_pos = np.array([5, 6, 7, 8])  # a chunk after 5 cached tokens
    got = L.attention(q, k, v, q_pos, window)
    np.testing.assert_allclose(got, _naive_attention(q, k, v, q_pos, window), atol=1e-12)


@pytest.mark.parametrize("window", [None, 2])
def test_decode_attention_matches_per_sequence(window: int | None) -> None:
    n_kv, d, lengths = 2, 4, [3, 7, 1]
    q = RNG.standard_normal((3, 4, d))
    k_pad, v_pad = RNG.standard_normal((2, 3, 7, n_kv, d))
    q_pos = np.array(lengths) - 1
    got = L.decode_attention(q, k_pad, v_pad, q_pos, window)
    for s, n in enumerate(lengths):
        one = L.attention(q[s:s + 1], k_pad[s, :n], v_pad[s, :n], q_pos[s:s + 1], window)
        np.testing.assert_allclose(got[s:s + 1], one, atol=1e-12)


def test_swiglu_matches_formula() -> None:
    x = RNG.standard_normal((2, 4))
    gate, up, down = RNG.standard_normal((3, 4)), RNG.standard_normal((3, 4)), RNG.standard_normal(
        (4, 3))
    got = L.swiglu_mlp(x, np.concatenate([gate, up]), down)
    hidden = (x @ gate.T) / (1 + np.exp(-(x @ gate.T))) * (x @ up.T)
    np.testing.assert_allclose(got, hidden @ down.T, atol=1e-12)


@given(st.integers(1, 6), st.integers(0, 10_000), st.booleans())
@settings(max_examples=30, deadline=None)
def test_route_top_k_matches_sorting(top_k: int, seed: int, renormalize: bool) -> None:
    logits = np.random.default_rng(seed).standard_normal((3, 6))
    weights, ids = L.route_top_k(logits, top_k, renormalize)
    for t in range(3):
        p = np.exp(logits[t]) / np.exp(logits[t]).sum()
        order = [int(e) for e in sorted(range(6), key=lambda e: -float(p[e]))][:top_k]
        assert list(ids[t]) == order
        expected = p[order] / (p[order].sum() if renormalize else 1.0)
        np.testing.assert_allclose(weights[t], expected, rtol=1e-12)


def test_moe_experts_match_per_token_loop() -> None:
    n_tok, n_embd, n_exp, inner = 5, 4, 3, 6
    x = RNG.standard_normal((n_tok, n_embd))
    w_gate_up = RNG.standard_normal((n_exp, 2 * inner, n_embd))
    w_down = RNG.standard_normal((n_exp, n_embd, inner))
    weights, ids = L.route_top_k(RNG.standard_normal((n_tok, n_exp)), 2, True)
    got = L.moe_experts(x, w_gate_up, w_down, weights, ids)
    for t in range(n_tok):
        want = sum(weights[t, j] * L.swiglu_mlp(x[t:t + 1], w_gate_up[e], w_down[e])[0]
                   for j, e in enumerate(ids[t]))
        np.testing.assert_allclose(got[t], want, atol=1e-12)
