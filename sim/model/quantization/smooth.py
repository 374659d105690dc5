"""SmoothQuant scale migration: move activation outliers into the weights before W8A8.

For a GEMM `y = x W^T` with input channels j, `y = (x / s) (W s)^T` for any positive `s_j`.
Choosing `s_j = max|x_j|^alpha / max|W_:,j|^(1 - alpha)` (alpha = 0.5) flattens the per-channel
activation range so per-token int8 loses less, at the price of a slightly harder weight. The
division by `s` is folded into the operation that produces `x`, so inference pays nothing:

- QKV and MLP gate/up inputs: the preceding RMSNorm weight is divided by `s` (in an MoE layer the
  router, shared expert and shared-expert gate take the same input, so their columns scale too);
- MLP down input (`silu(gate) * up`): the up-projection rows (and bias) are divided by `s`;
- attention output (O input): the V rows (and bias) of each KV head are divided by `s`, one
  factor per (KV head, channel) taken over the query heads that read that head (GQA).

In exact arithmetic the smoothed model equals the original; in float it differs by rounding.
MoE routed experts are not smoothed on their down projection (per-expert inputs are not captured).

References: Xiao et al. 2023, "SmoothQuant: Accurate and Efficient Post-Training Quantization
for Large Language Models" (Eq. 4, folding into LayerNorm and the previous linear layer).
"""

from __future__ import annotations

import numpy as np

from sim.core.model_config import ModelConfig
from sim.model.weights import DenseMLPWeights, LayerWeights, MoEWeights


def smoothing_scales(act_absmax: np.ndarray, weight_absmax: np.ndarray, alpha: float
                     ) -> np.ndarray:
    """`s_j = a_j^alpha / w_j^(1 - alpha)`, 1 where a channel is never active or all-zero."""
    a = np.asarray(act_absmax, dtype=np.float64)  # [k]
    w = np.asarray(weight_absmax, dtype=np.float64)  # [k]
    ok = (a > 0) & (w > 0)
    s = np.where(ok, np.maximum(a, 1e-12) ** alpha / np.maximum(w, 1e-12) ** (1 - alpha), 1.0)
    return np.where(np.isfinite(s) & (s > 0), s, 1.0)  # [k]


def _absmax_cols(*mats: np.ndarray) -> np.ndarray:
    """Per input channel (last axis) max |w| over all rows of all `mats`."""
    return np.max(np.stack([np.max(np.abs(m.reshape(-1, m.shape[-1])), axis=0) for m in mats]),
                  axis=0)  # [k]


def smooth_layer(layer: LayerWeights, acts: dict[tuple[int, str], np.ndarray], i: int,
                 config: ModelConfig, alpha: float) -> None:
    """Fold SmoothQuant scales into `layer` in place (its arrays must be float64 copies)."""
    c = config
    x_max = {name: np.max(np.abs(acts[(i, name)]), axis=0)  # [k]
             for name in ("qkv", "o", "gate_up", "down", "router") if (i, name) in acts}
    # QKV input: fold into the attention norm
    if "qkv" in x_max:
        s = smoothing_scales(x_max["qkv"], _absmax_cols(layer.w_qkv), alpha)  # [n_embd]
        layer.attn_norm /= s
        layer.w_qkv *= s
    # O input: fold into V (per KV head channel, max over the query heads of its group)
    if "o" in x_max:
        d, group = c.d_head, c.n_head // c.n_kv_head
        q_dim = c.n_head * d
        a = x_max["o"].reshape(c.n_kv_head, group, d).max(axis=1)  # [n_kv, d]
        wmax = np.abs(layer.w_o).max(axis=0).reshape(c.n_kv_head, group, d).max(axis=1)
        s_kv = smoothing_scales(a.ravel(), wmax.ravel(), alpha)  # [n_kv * d]
        v_rows = slice(q_dim + c.n_kv_head * d, q_dim + 2 * c.n_kv_head * d)
        layer.w_qkv[v_rows] /= s_kv[:, None]
        if layer.b_qkv is not None:
            layer.b_qkv[v_rows] /= s_kv
        s_o = np.repeat(s_kv.reshape(c.n_kv_head, 1, d), group, axis=1).ravel()  # [q_dim]
        layer.w_o *= s_o
    mlp = layer.mlp
    if isinstance(mlp, DenseMLPWeights):
        if "gate_up" in x_max:
            s = smoothing_scales(x_max["gate_up"], _absmax_cols(mlp.w_gate_up), alpha)
            layer.mlp_norm /= s
            mlp.w_gate_up *= s
        _smooth_down(mlp, x_max.get("down"), alpha)
    elif isinstance(mlp, MoEWeights) and "router" in x_max:
        mats = [mlp.w_gate_up] + ([mlp.shared.w_gate_up] if mlp.shared is not None else [])
        s = smoothing_scales(x_max["router"], _absmax_cols(*mats), alpha)  # [n_embd]
        layer.mlp_norm /= s
        mlp.w_gate_up *= s
        mlp.w_router *= s  # the router is not quantized: scaling keeps its logits exact
        if mlp.shared is not None:
            mlp.shared.w_gate_up *= s
            _smooth_down(mlp.shared, x_max.get("down"), alpha)
        if mlp.w_shared_gate is not None:
            mlp.w_shared_gate *= s


def _smooth_down(mlp: DenseMLPWeights, x_max: np.ndarray | None, alpha: float) -> None:
    if x_max is None:
        return
    n_inner = mlp.w_down.shape[1]
    s = smoothing_scales(x_max, _absmax_cols(mlp.w_down), alpha)  # [n_inner]
    mlp.w_gate_up[n_inner:] /= s[:, None]  # up rows: silu(gate) * up / s
    if mlp.b_gate_up is not None:
        mlp.b_gate_up[n_inner:] /= s
    mlp.w_down *= s
