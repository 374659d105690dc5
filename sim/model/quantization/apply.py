"""A quantized functional model: the same `NumpyModel`, with emulated quantized weights.

`quantize_model(model, spec)` returns a new `NumpyModel` whose projection weights (QKV, O, MLP
gate/up and down, MoE experts and shared expert) are the exact dequantized values of the method's
integer or fp8 codes (dequantize-then-matmul emulation: every stored value is what the format
holds; the matmul then accumulates in the model's float dtype, as the GPU accumulates in fp32 /
int32). Embedding, LM head, norms and the MoE router are shared with `model` unchanged.

Methods that quantize activations (w8a8, fp8 with fp8 tensor cores) mark their weights as
`ActQuantWeight` views: a matmul with such a weight first rounds the other operand per token
(per row of `x` in `x @ W.T`) with a dynamic scale, to int8 or fp8 e4m3. Per-token scales keep
every sequence's numbers independent of what else is in the batch, so batch invariance and the
KV-cached == cacheless oracle still hold for the quantized model. `tag_activation_quant` re-marks
the weights of a model whose arrays were copied (a tensor-parallel `ShardedModel`): a row-parallel
rank quantizes its own slice of each token, as a real tensor-parallel W8A8 kernel does.

References: Nagel et al. 2021 ("A White Paper on Neural Network Quantization": simulated
quantization); Xiao et al. 2023 (SmoothQuant); Frantar et al. 2023 (GPTQ); vLLM
`vllm/model_executor/layers/quantization/` (per-token dynamic activation scales).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from sim.core.errors import ConfigError
from sim.core.quantization import SMOOTHQUANT_ALPHA, QuantSpec
from sim.model.numpy_model import NumpyModel
from sim.model.quantization.calibration import calibration_sequences, capture_linear_inputs
from sim.model.quantization.formats import ACT_QUANTIZERS, fake_quant_fp8_rows, fake_quant_int
from sim.model.quantization.gptq import gptq_quantize
from sim.model.quantization.smooth import smooth_layer
from sim.model.weights import DenseMLPWeights, LayerWeights, ModelWeights, MoEWeights


class ActQuantWeight(np.ndarray):
    """A weight whose matmuls quantize the other operand per token (`act_format`)."""

    act_format: str | None = None

    def __array_finalize__(self, obj: Any) -> None:
        self.act_format = getattr(obj, "act_format", None)

    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Any:
        plain = [i.view(np.ndarray) if isinstance(i, np.ndarray) else i for i in inputs]
        if ufunc is np.matmul and method == "__call__" and len(plain) == 2 and self.act_format:
            quant = ACT_QUANTIZERS[self.act_format]
            if isinstance(inputs[1], ActQuantWeight) and not isinstance(inputs[0], ActQuantWeight):
                plain[0] = quant(plain[0]).astype(plain[0].dtype)  # [..., n, k]: per row
            elif isinstance(inputs[0], ActQuantWeight) and not isinstance(inputs[1],
                                                                          ActQuantWeight):
                x = np.swapaxes(plain[1], -1, -2)  # [..., m, k]: per column of the right side
                plain[1] = np.swapaxes(quant(x).astype(x.dtype), -1, -2)  # [..., k, m]
        if "out" in kwargs:
            kwargs["out"] = tuple(o.view(np.ndarray) if isinstance(o, np.ndarray) else o
                                  for o in kwargs["out"])
        return getattr(ufunc, method)(*plain, **kwargs)


def act_quant_view(w: np.ndarray, act_format: str | None) -> np.ndarray:
    """`w` marked to quantize matmul activations as `act_format` (plain `w` for None)."""
    if act_format is None:
        return w
    if act_format not in ACT_QUANTIZERS:
        raise ConfigError(f"unknown activation format {act_format!r}; use one of "
                          f"{', '.join(ACT_QUANTIZERS)}")
    view = np.asarray(w).view(ActQuantWeight)
    view.act_format = act_format
    return view


def quantize_weight(w: np.ndarray, spec: QuantSpec, x: np.ndarray | None = None) -> np.ndarray:
    """The dequantized float64 values of `w [..., out, in]` under `spec` (`x [n, in]`: GPTQ
    calibration inputs; without them GPTQ falls back to round-to-nearest)."""
    w = np.asarray(w, dtype=np.float64)  # [..., out, in]
    if spec.weight_format == "fp8_e4m3":
        return fake_quant_fp8_rows(w)  # per output channel
    group = -1 if spec.per_channel else spec.group_size
    if spec.method == "gptq" and x is not None and w.ndim == 2:
        return gptq_quantize(w, x, spec.bits, group, spec.symmetric)
    return fake_quant_int(w, spec.bits, group, spec.symmetric)


def _f64(a: np.ndarray | None) -> Any:
    return None if a is None else np.array(a, dtype=np.float64)  # a.shape (a copy)


def _copy_layer(layer: LayerWeights) -> LayerWeights:
    mlp = layer.mlp
    new_mlp: DenseMLPWeights | MoEWeights
    if isinstance(mlp, MoEWeights):
        shared = mlp.shared
        new_mlp = MoEWeights(
            _f64(mlp.w_router), _f64(mlp.w_gate_up), _f64(mlp.w_down),
            None if shared is None else DenseMLPWeights(
                _f64(shared.w_gate_up), _f64(shared.w_down), _f64(shared.b_gate_up),
                _f64(shared.b_down)),
            _f64(mlp.w_shared_gate))
    else:
        new_mlp = DenseMLPWeights(_f64(mlp.w_gate_up), _f64(mlp.w_down), _f64(mlp.b_gate_up),
                                  _f64(mlp.b_down))
    return LayerWeights(_f64(layer.attn_norm), _f64(layer.w_qkv), _f64(layer.w_o),
                        _f64(layer.mlp_norm), new_mlp, _f64(layer.b_qkv), _f64(layer.b_o))


def _finish_layer(i: int, layer: LayerWeights, spec: QuantSpec, acts: dict[Any, np.ndarray],
                  dtype: np.dtype) -> LayerWeights:
    """Quantize the projections of float64 `layer`; every array cast to the model dtype."""
    act = spec.act_format

    def q(w: np.ndarray, key: str | None) -> np.ndarray:
        x = acts.get((i, key)) if key else None
        return act_quant_view(quantize_weight(w, spec, x).astype(dtype), act)

    def cast(a: np.ndarray | None) -> Any:
        return None if a is None else a.astype(dtype)

    def dense(m: DenseMLPWeights, in_key: str) -> DenseMLPWeights:
        return DenseMLPWeights(q(m.w_gate_up, in_key), q(m.w_down, "down"), cast(m.b_gate_up),
                               cast(m.b_down))

    mlp = layer.mlp
    new_mlp: DenseMLPWeights | MoEWeights
    if isinstance(mlp, MoEWeights):
        new_mlp = MoEWeights(cast(mlp.w_router), q(mlp.w_gate_up, None), q(mlp.w_down, None),
                             None if mlp.shared is None else dense(mlp.shared, "router"),
                             cast(mlp.w_shared_gate))
    else:
        new_mlp = dense(mlp, "gate_up")
    return LayerWeights(cast(layer.attn_norm), q(layer.w_qkv, "qkv"), q(layer.w_o, "o"),
                        cast(layer.mlp_norm), new_mlp, cast(layer.b_qkv), cast(layer.b_o))


def quantize_model(model: NumpyModel, spec: QuantSpec,
                   calibration: Sequence[Sequence[int]] | None = None,
                   tokenizer: Any = None, seed: int = 0) -> NumpyModel:
    """A new `NumpyModel` with `spec`'s quantized weights (see module doc). Calibrated methods
    (gptq, w8a8) run `model` on `calibration` token sequences (default:
    `calibration.calibration_sequences(model, tokenizer, seed)`). `spec` should already be
    resolved for the target device (`QuantSpec.resolve`)."""
    acts: dict[Any, np.ndarray] = {}
    if spec.calibrated:
        seqs = calibration if calibration is not None else calibration_sequences(
            model, tokenizer, seed)
        acts = capture_linear_inputs(model, seqs)
    layers = [_copy_layer(layer) for layer in model.weights.layers]
    if spec.method == "w8a8":
        for i, layer in enumerate(layers):
            smooth_layer(layer, acts, i, model.config, SMOOTHQUANT_ALPHA)
    dt = model.dtype
    new_layers = [_finish_layer(i, layer, spec, acts, dt) for i, layer in enumerate(layers)]
    w = model.weights
    quantized = NumpyModel(model.config, ModelWeights(w.embed, new_layers, w.final_norm,
                                                      w.lm_head),
                           dt.name, model.layer_windows)
    quantized.quantization = spec  # type: ignore[attr-defined]
    return quantized


def tag_activation_quant(model: Any, act_format: str | None) -> None:
    """Mark, in place, every projection weight of `model` and of its tensor-parallel shards
    (`model.shards`: rank layers with `w_qkv`, `w_o`, `mlp`, `experts`) to quantize activations."""
    if act_format is None:
        return

    def mark(obj: Any, names: tuple[str, ...]) -> None:
        for name in names:
            value = getattr(obj, name, None)
            if isinstance(value, np.ndarray):
                setattr(obj, name, act_quant_view(value, act_format))

    holders = list(model.weights.layers)
    for ranks in getattr(model, "shards", []):
        holders.extend(ranks)
    for holder in holders:
        mark(holder, ("w_qkv", "w_o"))
        for part in (getattr(holder, "mlp", None), getattr(holder, "experts", None)):
            if part is None:
                continue
            mark(part, ("w_gate_up", "w_down"))
            shared = getattr(part, "shared", None)
            if shared is not None:
                mark(shared, ("w_gate_up", "w_down"))

