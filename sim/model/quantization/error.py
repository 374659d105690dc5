"""What a quantization method costs in answer quality, per layer and end to end.

- **Per layer**: both models read the same text; at every projection (QKV, O, MLP gate/up,
  down) the relative error `||y_q - y|| / ||y||` of the quantized model's output (its own
  activations, quantized as the method does, times its weights) against the unquantized one's.
  Errors made upstream reach later layers, so this shows how error accumulates with depth.
- **End to end** (`sim.model.quality`): next-token KL, top-1 agreement, max logit error, and the
  perplexity of both models on the project's evaluation text (meaningful for a real checkpoint,
  e.g. SmolLM2-135M; for a seeded random proxy only KL / top-1 / logit error mean anything).

References: Frantar et al. 2023 (GPTQ: layer-wise output error as the objective); Dettmers et
al. 2022 (LLM.int8(): per-layer error growth); the KL / top-1 metrics of `sim.model.quality`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sim.core.quantization import QuantSpec
from sim.model import quality
from sim.model.numpy_model import NumpyModel
from sim.model.quantization.apply import quantize_model
from sim.model.quantization.calibration import capture_linear_inputs
from sim.model.quantization.formats import ACT_QUANTIZERS
from sim.model.weights import MoEWeights

PROJECTIONS = ("qkv", "o", "gate_up", "down")


def _weights(model: NumpyModel, i: int, name: str) -> np.ndarray | None:
    layer = model.weights.layers[i]
    mlp: Any = layer.mlp
    if name in ("gate_up", "down") and isinstance(mlp, MoEWeights):  # its shared expert
        mlp = mlp.shared
        if mlp is None:
            return None
    return {"qkv": layer.w_qkv, "o": layer.w_o, "gate_up": getattr(mlp, "w_gate_up", None),
            "down": getattr(mlp, "w_down", None)}[name]


def layer_errors(reference: NumpyModel, quantized: NumpyModel,
                 token_ids: Sequence[int] | np.ndarray) -> dict[tuple[int, str], float]:
    """`{(layer, projection): relative output error}` on one text (see module doc)."""
    ids = [list(np.asarray(token_ids).tolist())]
    x_ref = capture_linear_inputs(reference, ids)
    x_q = capture_linear_inputs(quantized, ids)
    act = getattr(getattr(quantized, "quantization", None), "act_format", None)
    out = {}
    for (i, name), x in x_ref.items():
        if name not in PROJECTIONS or (i, name) not in x_q:
            continue
        w, wq = _weights(reference, i, name), _weights(quantized, i, name)
        if w is None or wq is None:
            continue
        xq = x_q[(i, name)].astype(np.float64)  # [n, k]
        if act is not None:
            xq = ACT_QUANTIZERS[act](xq)  # [n, k]
        y = x.astype(np.float64) @ np.asarray(w, dtype=np.float64).T  # [n, out]
        yq = xq @ np.asarray(wq, dtype=np.float64).T  # [n, out]
        out[(i, name)] = float(np.linalg.norm(yq - y)) / max(float(np.linalg.norm(y)), 1e-30)
    return out


@dataclass(frozen=True)
class QuantizationError:
    """A method's quality cost against the unquantized model on one text."""

    method: str
    quality: quality.QualityReport
    max_logit_error: float
    rel_logit_error: float  # ||logits_q - logits|| / ||logits||
    per_layer: dict[tuple[int, str], float] = field(hash=False)

    def as_dict(self) -> dict[str, Any]:
        return {"method": self.method, **self.quality.as_dict(),
                "max_logit_error": self.max_logit_error, "rel_logit_error": self.rel_logit_error,
                "per_layer": {f"{i}.{name}": e for (i, name), e in self.per_layer.items()}}


def quantization_error(model: NumpyModel, spec: QuantSpec, token_ids: Sequence[int] | np.ndarray,
                       quantized: NumpyModel | None = None, tokenizer: Any = None,
                       per_layer: bool = True) -> QuantizationError:
    """Quantize `model` with `spec` (unless `quantized` is given) and measure it on `token_ids`
    with cacheless forward passes of both."""
    q = quantized if quantized is not None else quantize_model(model, spec, tokenizer=tokenizer)
    ids = np.asarray(token_ids, dtype=np.int64)  # [n]
    ref_logits = model.forward(ids).astype(np.float64)  # [n, n_vocab]
    q_logits = q.forward(ids).astype(np.float64)  # [n, n_vocab]
    diff = q_logits - ref_logits  # [n, n_vocab]
    return QuantizationError(
        method=spec.describe(), quality=quality.compare(ref_logits, q_logits, ids),
        max_logit_error=float(np.abs(diff).max()),
        rel_logit_error=float(np.linalg.norm(diff) / np.linalg.norm(ref_logits)),
        per_layer=layer_errors(model, q, ids) if per_layer else {})
