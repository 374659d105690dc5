"""Calibration activations: the inputs each linear layer sees when the model reads some text.

`capture_linear_inputs(model, sequences)` runs the unquantized functional model's cacheless
`forward` over calibration sequences with every projection weight temporarily viewed as a
`_Recorder` array, which records the left operand of each matmul it takes part in. Nothing in the
model changes: the recorder is a view of the same numbers, and `forward` is the reference pass.
Keys are `(layer, name)` with name in `qkv`, `o`, `gate_up`, `down` (dense MLP or MoE shared
expert) and `router` (an MoE layer's input, which its experts share).

The default calibration set is a short passage of plain English written for this purpose (kept
apart from the perplexity text `sim/data/eval_text.txt`), encoded by the run's tokenizer, or seeded
random tokens when there is none. GPTQ and SmoothQuant use a few hundred sequences of real text;
a few hundred tokens are enough for the scale models here.

References: Frantar et al. 2023 (GPTQ calibration on C4 segments); Xiao et al. 2023 (SmoothQuant
per-channel activation maxima from calibration samples).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from sim.model.numpy_model import NumpyModel
from sim.model.quantization.formats import ACT_QUANTIZERS
from sim.model.weights import DenseMLPWeights, LayerWeights, ModelWeights, MoEWeights

CALIBRATION_TEXT = (
    "A river starts as rain on a hillside. The water gathers in small channels, the channels "
    "join into streams, and the streams meet in a valley where the land is flat enough for a "
    "town. People built mills there because the current could turn a wheel, and later they "
    "built bridges, warehouses and a railway station. Every spring the river rose and every "
    "autumn it fell, and the town kept records of both: the highest flood, the driest summer, "
    "the year the ice stopped the ferry for six weeks. A teacher once asked her class to read "
    "those records and draw the river's level as a line across a page. The children noticed "
    "that the line was never quite the same two years in a row, but that it always came back. "
    "Engineers measure the same thing with sensors today. They compare the flow with the rain "
    "that fell upstream, estimate how long the water takes to arrive, and warn the farms along "
    "the banks when a storm is coming. The numbers are different, but the question is the one "
    "the millers asked: how much water, how fast, and for how long? In the evening the station "
    "master closes the ticket office, the last train leaves for the coast, and the river keeps "
    "running under the bridge, carrying leaves, sand and the reflection of the street lamps. "
    "Tomorrow the market opens at seven. There will be bread, apples, cheese from the hills, "
    "and fish that came up from the harbour before sunrise. "
)
DEFAULT_SEQ_LEN = 128
DEFAULT_NUM_RANDOM_SEQS = 4


class _Recorder(np.ndarray):
    """A weight view that appends the other operand of every matmul to `sink[key]` (before any
    activation quantization of a quantized weight, which it then applies, `act_format`)."""

    key: Any = None
    sink: dict[Any, list[np.ndarray]] | None = None
    act_format: str | None = None

    def __array_finalize__(self, obj: Any) -> None:
        self.key = getattr(obj, "key", None)
        self.sink = getattr(obj, "sink", None)
        self.act_format = getattr(obj, "act_format", None)

    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Any:
        plain = [i.view(np.ndarray) if isinstance(i, np.ndarray) else i for i in inputs]
        if (ufunc is np.matmul and method == "__call__" and len(inputs) == 2
                and isinstance(inputs[1], _Recorder) and self.sink is not None):
            self.sink.setdefault(inputs[1].key, []).append(np.array(plain[0]))
            if inputs[1].act_format is not None:
                plain[0] = ACT_QUANTIZERS[inputs[1].act_format](plain[0]).astype(plain[0].dtype)
        if "out" in kwargs:
            kwargs["out"] = tuple(o.view(np.ndarray) if isinstance(o, np.ndarray) else o
                                  for o in kwargs["out"])
        return getattr(ufunc, method)(*plain, **kwargs)


def _rec(w: np.ndarray, key: Any, sink: dict[Any, list[np.ndarray]]) -> np.ndarray:
    view = w.view(_Recorder)
    view.key, view.sink = key, sink
    return view


def _recording_layer(i: int, layer: LayerWeights, sink: dict[Any, list[np.ndarray]]
                     ) -> LayerWeights:
    mlp = layer.mlp
    new_mlp: DenseMLPWeights | MoEWeights
    if isinstance(mlp, MoEWeights):
        shared = mlp.shared
        if shared is not None:
            shared = replace(shared, w_down=_rec(shared.w_down, (i, "down"), sink))
        new_mlp = replace(mlp, w_router=_rec(mlp.w_router, (i, "router"), sink), shared=shared)
    else:
        new_mlp = replace(mlp, w_gate_up=_rec(mlp.w_gate_up, (i, "gate_up"), sink),
                          w_down=_rec(mlp.w_down, (i, "down"), sink))
    return replace(layer, w_qkv=_rec(layer.w_qkv, (i, "qkv"), sink),
                   w_o=_rec(layer.w_o, (i, "o"), sink), mlp=new_mlp)


def capture_linear_inputs(model: NumpyModel, sequences: Sequence[Sequence[int]]
                          ) -> dict[tuple[int, str], np.ndarray]:
    """`{(layer, name): inputs [n_tokens, k]}` over all `sequences` (see module doc)."""
    sink: dict[Any, list[np.ndarray]] = {}
    w = model.weights
    layers = [_recording_layer(i, layer, sink) for i, layer in enumerate(w.layers)]
    recording = NumpyModel(model.config, ModelWeights(w.embed, layers, w.final_norm, w.lm_head),
                           model.dtype.name, model.layer_windows)
    for seq in sequences:
        recording.forward(np.asarray(seq, dtype=np.int64))
    return {key: np.concatenate(parts) for key, parts in sink.items()}  # [n_tok, k] each


def calibration_sequences(model: NumpyModel, tokenizer: Any = None, seed: int = 0,
                          seq_len: int = DEFAULT_SEQ_LEN) -> list[list[int]]:
    """The default calibration set: `CALIBRATION_TEXT` cut into `seq_len`-token pieces by
    `tokenizer`, or seeded random token ids when there is no tokenizer."""
    n_vocab = model.config.n_vocab
    if tokenizer is not None:
        ids = [t for t in tokenizer.encode(CALIBRATION_TEXT) if 0 <= t < n_vocab]
        if len(ids) >= 8:
            return [ids[i: i + seq_len] for i in range(0, len(ids), seq_len)
                    if len(ids[i: i + seq_len]) >= 8]
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(7,)))
    return [rng.integers(0, n_vocab, size=seq_len).tolist()
            for _ in range(DEFAULT_NUM_RANDOM_SEQS)]
