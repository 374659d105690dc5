"""The layer math of the Llama family, in NumPy, as Hugging Face transformers defines it.

RMSNorm, rotary position embeddings (RoPE, in transformers' *rotate_half* layout, with `linear`
and Llama 3.1 `llama3` frequency scaling), grouped-query causal attention with an optional
Mistral sliding window, the SwiGLU MLP, and top-k mixture-of-experts routing (Mixtral, and
Qwen2-MoE with its gated shared expert). Every function computes in the dtype of its inputs
(float32 or float64): no hidden up- or down-casts.

Mask semantics follow transformers' `masking_utils`: a query at position p sees key position j
when `j <= p` and, with a sliding window W, `j > p - W` (the W most recent positions, itself
included).

References: Zhang & Sennrich 2019 (RMSNorm); Su et al. 2021 (RoFormer / RoPE); Shazeer 2020
(GLU variants, SwiGLU); Ainslie et al. 2023 (GQA); Jiang et al. 2023 (Mistral 7B, sliding
window); Jiang et al. 2024 (Mixtral); Qwen Team 2024 (Qwen1.5-MoE); Meta 2024 (Llama 3.1 RoPE
scaling); Hugging Face transformers `modeling_llama.py`, `modeling_rope_utils.py`,
`masking_utils.py`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.special import expit

from sim.core.errors import ConfigError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """`x / sqrt(mean(x^2) + eps) * weight` over the last axis."""
    variance = np.mean(x * x, axis=-1, keepdims=True)  # [..., 1]
    inv_rms = 1.0 / np.sqrt(variance + x.dtype.type(eps))  # [..., 1]
    return weight * (x * inv_rms)  # [..., n_embd]


def sigmoid(x: np.ndarray) -> np.ndarray:
    """`1 / (1 + exp(-x))` (numerically stable)."""
    return expit(x)


def silu(x: np.ndarray) -> np.ndarray:
    """`x * sigmoid(x)` (numerically stable for large |x|)."""
    return x * expit(x)


# ---------------------------------------------------------------------------------- RoPE
def rope_inv_freq(d_head: int, rope_theta: float, rope_scaling: dict[str, Any] | None,
                  dtype: np.dtype | type) -> np.ndarray:
    """Inverse frequencies `[d_head // 2]`, optionally scaled, computed in `dtype`."""
    dt = np.dtype(dtype)
    if d_head % 2:
        raise ConfigError(f"RoPE needs an even head dimension, got d_head={d_head}")
    exponents = np.arange(0, d_head, 2).astype(dt) / dt.type(d_head)  # [d_head // 2]
    inv_freq = dt.type(1.0) / (dt.type(rope_theta) ** exponents)  # [d_head // 2]
    scaling = dict(rope_scaling or {})
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"rope_scaling type {rope_type!r} is not supported by the NumPy model; supported: "
            f"{', '.join(SUPPORTED_ROPE_TYPES)} (remove rope_scaling or use a supported type)")
    if scaling.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError("rope_scaling partial_rotary_factor != 1 is not supported")
    factor = _rope_param(scaling, "factor")
    if rope_type == "linear":
        return inv_freq / dt.type(factor)  # [d_head // 2]
    # llama3: long wavelengths divided by `factor`, short ones kept, a smooth blend between.
    low_freq_factor = _rope_param(scaling, "low_freq_factor")
    high_freq_factor = _rope_param(scaling, "high_freq_factor")
    old_context_len = _rope_param(scaling, "original_max_position_embeddings")
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = dt.type(2 * math.pi) / inv_freq  # [d_head // 2]
    long_wave = wavelen > low_freq_wavelen  # [d_head // 2]
    scaled = np.where(long_wave, inv_freq / dt.type(factor), inv_freq)  # [d_head // 2]
    smooth = ((dt.type(old_context_len) / wavelen - dt.type(low_freq_factor))
              / dt.type(high_freq_factor - low_freq_factor))  # [d_head // 2]
    smoothed = (1 - smooth) * scaled / dt.type(factor) + smooth * scaled  # [d_head // 2]
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(dt)  # [d_head // 2]


def _rope_param(scaling: dict[str, Any], key: str) -> float:
    value = scaling.get(key)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ConfigError(f"rope_scaling of type {scaling.get('rope_type')!r} needs a numeric "
                          f"{key!r}, got {value!r}")
    return float(value)


def rope_cos_sin(inv_freq: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin `[n, d_head]` at integer `positions` `[n]` (angles repeated twice)."""
    freqs = positions.astype(inv_freq.dtype)[:, None] * inv_freq[None, :]  # [n, d_head // 2]
    emb = np.concatenate([freqs, freqs], axis=-1)  # [n, d_head]
    return np.cos(emb), np.sin(emb)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate `x` `[n, n_heads, d_head]` by cos/sin `[n, d_head]` (transformers' rotate_half)."""
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)  # [n, n_heads, d_head]
    return x * cos[:, None, :] + rotated * sin[:, None, :]  # [n, n_heads, d_head]


# ---------------------------------------------------------------------------------- attention
def attention_mask(q_pos: np.ndarray, num_keys: int | np.ndarray,
                   sliding_window: int | None) -> np.ndarray:
    """Boolean `[n_q, n_k]` (True = may attend): keys 0..num_keys-1, causal, sliding window."""
    k_pos = np.arange(int(np.max(num_keys)))  # [n_k]
    allowed = k_pos[None, :] <= q_pos[:, None]  # [n_q, n_k]
    if sliding_window is not None:
        allowed &= k_pos[None, :] > q_pos[:, None] - sliding_window
    return allowed


def _softmax_masked(scores: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    scores = np.where(allowed, scores, -np.inf)  # [..., n_q, n_k]
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    return scores


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, q_pos: np.ndarray,
              sliding_window: int | None = None, mask: np.ndarray | None = None) -> np.ndarray:
    """Causal grouped-query attention of one sequence.

    `q` `[n_q, n_head, d_head]` at absolute positions `q_pos` `[n_q]`; `k`, `v`
    `[n_k, n_kv_head, d_head]` for key positions `0..n_k-1`. Query head h uses KV head
    `h // (n_head // n_kv_head)` (transformers' `repeat_kv`). Returns `[n_q, n_head * d_head]`.
    """
    n_q, n_head, d_head = q.shape
    n_k, n_kv_head, _ = k.shape
    group = n_head // n_kv_head
    qh = q.reshape(n_q, n_kv_head, group, d_head).transpose(1, 2, 0, 3)  # [n_kv, g, n_q, d]
    kh = k.transpose(1, 2, 0)[:, None]  # [n_kv, 1, d, n_k]
    vh = v.transpose(1, 0, 2)[:, None]  # [n_kv, 1, n_k, d]
    scores = (qh @ kh) * q.dtype.type(1.0 / math.sqrt(d_head))  # [n_kv, g, n_q, n_k]
    # `mask` `[n_q, n_k]` (a token tree's attention mask) replaces the causal one
    allowed = attention_mask(q_pos, n_k, sliding_window) if mask is None else mask
    probs = _softmax_masked(scores, allowed)  # [n_kv, g, n_q, n_k]
    out = probs @ vh  # [n_kv, g, n_q, d]
    return out.transpose(2, 0, 1, 3).reshape(n_q, n_head * d_head)  # [n_q, n_head * d]


def decode_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, q_pos: np.ndarray,
                     sliding_window: int | None = None) -> np.ndarray:
    """One query token per sequence, many sequences at once, keys padded to a common length.

    `q` `[n_seq, n_head, d_head]` at positions `q_pos` `[n_seq]`; `k`, `v`
    `[n_seq, max_len, n_kv_head, d_head]` where sequence s has valid keys `0..q_pos[s]` (the
    padding beyond is masked out). Returns `[n_seq, n_head * d_head]`.
    """
    n_seq, n_head, d_head = q.shape
    _, max_len, n_kv_head, _ = k.shape
    group = n_head // n_kv_head
    qh = q.reshape(n_seq, n_kv_head, group, d_head)  # [n_seq, n_kv, g, d]
    kh = k.transpose(0, 2, 3, 1)  # [n_seq, n_kv, d, max_len]
    vh = v.transpose(0, 2, 1, 3)  # [n_seq, n_kv, max_len, d]
    scores = (qh @ kh) * q.dtype.type(1.0 / math.sqrt(d_head))  # [n_seq, n_kv, g, max_len]
    allowed = attention_mask(q_pos, max_len, sliding_window)[:, None, None, :]  # [n_seq,1,1,len]
    probs = _softmax_masked(scores, allowed)  # [n_seq, n_kv, g, max_len]
    out = probs @ vh  # [n_seq, n_kv, g, d]
    return out.reshape(n_seq, n_head * d_head)  # [n_seq, n_head * d]


# ---------------------------------------------------------------------------------- MLPs
def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """`x @ weight.T + bias` with a PyTorch-layout weight `[out, in]`."""
    y = x @ weight.T  # [n, out]
    if bias is not None:
        y += bias
    return y


def swiglu_mlp(x: np.ndarray, w_gate_up: np.ndarray, w_down: np.ndarray,
               b_gate_up: np.ndarray | None = None, b_down: np.ndarray | None = None) -> np.ndarray:
    """`down(silu(gate(x)) * up(x))`; `w_gate_up` `[2 * n_inner, n_embd]` stacks gate then up."""
    gate_up = linear(x, w_gate_up, b_gate_up)  # [n, 2 * n_inner]
    n_inner = gate_up.shape[-1] // 2
    hidden = silu(gate_up[:, :n_inner]) * gate_up[:, n_inner:]  # [n, n_inner]
    return linear(hidden, w_down, b_down)  # [n, n_embd]


def route_top_k(router_logits: np.ndarray, top_k: int,
                renormalize: bool) -> tuple[np.ndarray, np.ndarray]:
    """Softmax over all experts, keep the `top_k` largest (ties: lower expert index first),
    optionally renormalise them to sum 1. Returns (weights `[n, k]`, expert ids `[n, k]`)."""
    shifted = router_logits - router_logits.max(axis=-1, keepdims=True)  # [n, n_expert]
    probs = np.exp(shifted)  # [n, n_expert]
    probs /= probs.sum(axis=-1, keepdims=True)
    expert_ids = np.argsort(-probs, axis=-1, kind="stable")[:, :top_k]  # [n, k]
    weights = np.take_along_axis(probs, expert_ids, axis=-1)  # [n, k]
    if renormalize:
        weights /= weights.sum(axis=-1, keepdims=True)
    return weights, expert_ids


def moe_experts(x: np.ndarray, w_gate_up: np.ndarray, w_down: np.ndarray,
                weights: np.ndarray, expert_ids: np.ndarray) -> np.ndarray:
    """Sum over each token's chosen experts of `weight * swiglu_e(x)`.

    `w_gate_up` `[n_expert, 2 * moe_n_inner, n_embd]`, `w_down` `[n_expert, n_embd, moe_n_inner]`
    (the stacked layout transformers 5 uses in memory). Each expert runs once on all its tokens;
    experts are added in ascending id order, as transformers does.
    """
    out = np.zeros_like(x)  # [n, n_embd]
    for expert in np.unique(expert_ids):
        tok, slot = np.nonzero(expert_ids == expert)  # [n_routed] x2
        y = swiglu_mlp(x[tok], w_gate_up[expert], w_down[expert])  # [n_routed, n_embd]
        out[tok] += y * weights[tok, slot][:, None]  # a token picks an expert at most once
    return out
