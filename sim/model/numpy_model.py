"""The functional model: a Llama-family transformer in NumPy, with and without a KV store.

`NumpyModel.forward(token_ids)` is the cacheless reference: one sequence, full causal pass.
`NumpyModel.forward_step(chunks, kv)` is one engine step in vLLM's flattened-token layout: the new
tokens of every scheduled sequence are concatenated so each projection is one GEMM for the whole
step; attention runs per sequence over the K/V it reads back from a `KVStore` (decode tokens of
all sequences are batched into one padded attention call). A chunk may be a whole prompt, part
of one (chunked prefill), one decode token, or several draft tokens (speculative verification).

All math runs in the dtype the model was built with (float32 or float64). The forward pass is
transformers' Llama/Mistral/Qwen2/Mixtral/Qwen2-MoE forward (see `sim.model.layers`).

References: Touvron et al. 2023 (Llama); Kwon et al. 2023 (vLLM, flattened token batches);
Agrawal et al. 2024 (Sarathi-Serve, chunked prefill); Hugging Face transformers
`LlamaForCausalLM`; Jay Mody's picoGPT (a cacheless NumPy forward as the reference).
"""

from __future__ import annotations

import json
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sim.core.errors import ConfigError
from sim.core.model_config import ModelConfig
from sim.core.protocols import KVStore
from sim.model import layers as L
from sim.model.checkpoint import CheckpointReader
from sim.model.paged_store import PagedKVStore
from sim.model.weights import (
    DictSource,
    LayerWeights,
    ModelWeights,
    MoEWeights,
    build_weights,
    random_state_dict,
    to_state_dict,
)

MODEL_DTYPES = ("float32", "float64")


@dataclass(frozen=True, slots=True)
class SeqChunk:
    """New tokens of one sequence in one step, at positions `start_pos..start_pos+n_new-1`.

    `start_pos` is how many tokens of this sequence are already in the KV store;
    `num_logits` asks for the logits of the last `num_logits` new tokens (0 mid-prompt).
    A token tree (`speculative.tree`) also gives `positions` `[n_new]` (RoPE positions, default
    `start_pos..`) and `attn_mask` `[n_new, start_pos + n_new]` over the KV slots (default causal).
    """

    seq_id: Hashable
    token_ids: np.ndarray  # [n_new]
    start_pos: int
    num_logits: int = 1
    positions: np.ndarray | None = None  # [n_new]
    attn_mask: np.ndarray | None = None  # [n_new, start_pos + n_new]


def _model_dtype(dtype: str | np.dtype) -> np.dtype:
    dt = np.dtype(str(dtype).removeprefix("torch."))
    if dt.name not in MODEL_DTYPES:
        raise ConfigError(f"the NumPy model runs in {' or '.join(MODEL_DTYPES)}, got {dtype!r}")
    return dt


class NumpyModel:
    """A Llama-family model with its weights, ready to run `forward` / `forward_step`."""

    def __init__(self, config: ModelConfig, weights: ModelWeights, dtype: str = "float32",
                 layer_windows: Sequence[int | None] | None = None) -> None:
        if not config.is_llama_like:
            raise ConfigError(f"model {config.name!r} ({config.model_type}) is not a Llama-family "
                              "model; the NumPy model cannot run it (use its tiny proxy)")
        self.config = config
        self.dtype = _model_dtype(dtype)
        self.weights = weights
        # the sliding window of each layer (Qwen2 may apply it to some layers only)
        windows = (tuple(layer_windows) if layer_windows is not None
                   else default_layer_windows(config))
        if len(windows) != config.n_layer:
            raise ConfigError(f"layer_windows needs {config.n_layer} entries, got {len(windows)}")
        self.layer_windows: tuple[int | None, ...] = windows
        self.inv_freq = L.rope_inv_freq(config.d_head, config.rope_theta, config.rope_scaling,
                                        self.dtype)  # [d_head // 2]
        self._scratch_buf = np.empty(0, dtype=self.dtype)  # padded K/V for batched decode

    @property
    def inv_freq(self) -> np.ndarray:
        """RoPE inverse frequencies `[d_head // 2]` (settable: clears the cos/sin table)."""
        return self._inv_freq

    @inv_freq.setter
    def inv_freq(self, value: np.ndarray) -> None:
        self._inv_freq = np.asarray(value, dtype=self.dtype)  # [d_head // 2]
        self._cos = np.empty((0, self.config.d_head), dtype=self.dtype)  # [n_pos, d_head]
        self._sin = np.empty((0, self.config.d_head), dtype=self.dtype)  # [n_pos, d_head]

    # ------------------------------------------------------------------ construction
    @classmethod
    def random(cls, config: ModelConfig, seed: int = 0, dtype: str = "float32") -> NumpyModel:
        """Seeded random weights for exactly `config` (the same seed gives the same values in
        float32 and float64, up to rounding)."""
        state = random_state_dict(config, np.random.default_rng(seed))
        dt = _model_dtype(dtype)
        source = DictSource(state, f"random weights (seed {seed})")
        return cls(config, build_weights(config, source, dt), dt.name)

    @classmethod
    def from_state_dict(cls, config: ModelConfig, tensors: dict[str, np.ndarray],
                        dtype: str = "float32") -> NumpyModel:
        dt = _model_dtype(dtype)
        return cls(config, build_weights(config, DictSource(tensors), dt), dt.name)

    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype: str = "float32") -> NumpyModel:
        """Load a Hugging Face folder: `config.json` + `model.safetensors` (or sharded)."""
        folder = Path(folder)
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise ConfigError(f"{folder}: no config.json; a checkpoint folder needs config.json "
                              "and safetensors weights")
        config = ModelConfig.from_json_file(config_path)
        if not config.is_llama_like:
            raise ConfigError(f"{config_path}: model_type {config.model_type!r} cannot be run by "
                              "the NumPy model (Llama family only); pass its name to get a proxy")
        raw = json.loads(config_path.read_text(encoding="utf-8"))
        reader = CheckpointReader(folder)
        dt = _model_dtype(dtype)
        return cls(config, build_weights(config, reader, dt), dt.name,
                   _layer_windows(config, raw))

    def state_dict(self) -> dict[str, np.ndarray]:
        """transformers checkpoint names -> arrays (views; per-expert MoE layout)."""
        return to_state_dict(self.config, self.weights)

    # ------------------------------------------------------------------ forward passes
    def forward(self, token_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Logits `[n, n_vocab]` of a full causal pass over one sequence; no cache at all."""
        ids = self._check_ids(token_ids)  # [n]
        positions = np.arange(ids.shape[0])  # [n]

        def attend(layer: int, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
            return L.attention(q, k, v, positions, self.layer_windows[layer])

        x = self._run_layers(ids, positions, attend)  # [n, n_embd]
        return self._logits(x)

    def forward_step(self, chunks: Sequence[SeqChunk], kv: KVStore) -> np.ndarray:
        """One engine step: logits `[sum(num_logits), n_vocab]`, rows in chunk order.

        Writes every chunk's new K/V into `kv` (which must hold positions `0..start_pos-1`).
        """
        if not chunks:
            return np.empty((0, self.config.n_vocab), dtype=self.dtype)  # [0, n_vocab]
        ids_list, pos_list, rows = [], [], []
        offset = 0
        for chunk in chunks:
            ids = np.asarray(chunk.token_ids)  # [n_new]
            n_new = ids.shape[0] if ids.ndim == 1 else 0
            if n_new == 0:
                raise ConfigError(f"SeqChunk {chunk.seq_id!r}: token_ids must be a non-empty "
                                  f"1-D array, got shape {ids.shape}")
            if chunk.start_pos < 0 or not 0 <= chunk.num_logits <= n_new:
                raise ConfigError(f"SeqChunk {chunk.seq_id!r}: need start_pos >= 0 and 0 <= "
                                  f"num_logits <= {n_new}, got {chunk.start_pos}, "
                                  f"{chunk.num_logits}")
            ids_list.append(ids)
            pos_list.append(np.arange(chunk.start_pos, chunk.start_pos + n_new)  # [n_new]
                            if chunk.positions is None else np.asarray(chunk.positions))
            rows.append(np.arange(offset + n_new - chunk.num_logits, offset + n_new))  # [k]
            offset += n_new
        if len({chunk.seq_id for chunk in chunks}) != len(chunks):
            raise ConfigError("forward_step: a sequence appears in two chunks of one step; "
                              "merge its new tokens into one SeqChunk")
        ids = self._check_ids(np.concatenate(ids_list))  # [n_tok]
        positions = np.concatenate(pos_list)  # [n_tok]
        starts = np.cumsum([0] + [len(i) for i in ids_list])  # [n_chunk + 1]
        decode = [j for j, c in enumerate(chunks) if len(ids_list[j]) == 1 and c.attn_mask is None]
        others = [j for j, c in enumerate(chunks)
                  if len(ids_list[j]) != 1 or c.attn_mask is not None]
        decode_rows = starts[decode]  # [n_decode]
        decode_pos = positions[decode_rows]  # [n_decode]

        def attend(layer: int, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
            window = self.layer_windows[layer]
            for j, chunk in enumerate(chunks):
                kv.write(chunk.seq_id, layer, chunk.start_pos, k[starts[j]: starts[j + 1]],
                         v[starts[j]: starts[j + 1]])
            out = np.empty((q.shape[0], q.shape[1] * q.shape[2]), dtype=q.dtype)  # [n_tok, q_dim]
            for j in others:
                lo, hi = starts[j], starts[j + 1]
                k_seq, v_seq = kv.read(chunks[j].seq_id, layer, chunks[j].start_pos + hi - lo)
                tree = chunks[j].attn_mask
                if tree is not None and window is not None:
                    raise ConfigError("a token-tree chunk (attn_mask) cannot be combined with "
                                      "a sliding window; use a model without sliding_window")
                out[lo:hi] = L.attention(q[lo:hi], k_seq, v_seq, positions[lo:hi], window, tree)
            if decode:
                out[decode_rows] = self._decode_attention(
                    layer, [chunks[j] for j in decode], q[decode_rows], decode_pos, kv, window)
            return out

        x = self._run_layers(ids, positions, attend)  # [n_tok, n_embd]
        return self._logits(x[np.concatenate(rows)])  # [sum(num_logits), n_vocab]

    # ------------------------------------------------------------------ internals
    def _decode_attention(self, layer: int, chunks: list[SeqChunk], q: np.ndarray,
                          q_pos: np.ndarray, kv: KVStore, window: int | None) -> np.ndarray:
        """Batched attention for sequences with one new token each (keys padded, masked)."""
        c = self.config
        lengths = (q_pos + 1).tolist()  # keys 0..q_pos visible, before the window
        firsts = [0] * len(lengths) if window is None else [max(n - window, 0) for n in lengths]
        sizes = [n - f for n, f in zip(lengths, firsts, strict=True)]
        max_len = max(sizes)
        pad = self._scratch((2, len(chunks), max_len, c.n_kv_head, c.d_head))
        k_pad, v_pad = pad[0], pad[1]  # [n_seq, max_len, n_kv, d_head] x2
        if isinstance(kv, PagedKVStore):  # a paged store fills the padded batch in one gather
            kv.gather_padded([chunk.seq_id for chunk in chunks], layer, firsts, sizes, pad)
        else:
            for s, chunk in enumerate(chunks):
                k_seq, v_seq = kv.read(chunk.seq_id, layer, lengths[s])  # [len, n_kv, d] x2
                n, first = sizes[s], firsts[s]
                k_pad[s, :n] = k_seq[first:]
                v_pad[s, :n] = v_seq[first:]
                if n < max_len:  # masked keys get probability 0, but 0 * garbage may be NaN
                    pad[:, s, n:] = 0
        # keys were shifted left by `first`: query s now sits at position size - 1, no window
        q_pos_shifted = np.asarray(sizes) - 1  # [n_seq]
        return L.decode_attention(q, k_pad, v_pad, q_pos_shifted, None)  # [n_seq, q_dim]

    def _scratch(self, shape: tuple[int, ...]) -> np.ndarray:
        """A reused buffer (no page faults for a fresh allocation every layer)."""
        size = int(np.prod(shape))
        if self._scratch_buf.size < size:
            grown = max(size, 2 * self._scratch_buf.size)
            self._scratch_buf = np.empty(grown, dtype=self.dtype)  # [grown]
        return self._scratch_buf[:size].reshape(shape)  # shape

    def _run_layers(self, ids: np.ndarray, positions: np.ndarray, attend: Any) -> np.ndarray:
        c = self.config
        cos, sin = self._rope(positions)  # [n_tok, d_head] x2
        x = self.weights.embed[ids]  # [n_tok, n_embd]
        q_dim, kv_dim = c.n_head * c.d_head, c.n_kv_head * c.d_head
        for i, layer in enumerate(self.weights.layers):
            h = L.rms_norm(x, layer.attn_norm, c.rms_norm_eps)  # [n_tok, n_embd]
            qkv = L.linear(h, layer.w_qkv, layer.b_qkv)  # [n_tok, q_dim + 2 kv_dim]
            n_tok = qkv.shape[0]
            q = qkv[:, :q_dim].reshape(n_tok, c.n_head, c.d_head)  # [n_tok, n_head, d_head]
            k = qkv[:, q_dim: q_dim + kv_dim].reshape(n_tok, c.n_kv_head, c.d_head)  # [n_tok,
            v = qkv[:, q_dim + kv_dim:].reshape(n_tok, c.n_kv_head, c.d_head)  # n_kv, d_head]
            q = L.apply_rope(q, cos, sin)  # [n_tok, n_head, d_head]
            k = L.apply_rope(k, cos, sin)  # [n_tok, n_kv_head, d_head]
            attn = attend(i, q, k, v)  # [n_tok, n_head * d_head]
            x = x + L.linear(attn, layer.w_o, layer.b_o)  # [n_tok, n_embd]
            h = L.rms_norm(x, layer.mlp_norm, c.rms_norm_eps)  # [n_tok, n_embd]
            x = x + self._mlp(layer, h)  # [n_tok, n_embd]
        return x

    def _mlp(self, layer: LayerWeights, h: np.ndarray) -> np.ndarray:
        mlp = layer.mlp
        if not isinstance(mlp, MoEWeights):
            return L.swiglu_mlp(h, mlp.w_gate_up, mlp.w_down, mlp.b_gate_up, mlp.b_down)
        c = self.config
        router_logits = L.linear(h, mlp.w_router)  # [n_tok, n_expert]
        weights, expert_ids = L.route_top_k(router_logits, c.n_expert_per_tok, c.norm_topk_prob)
        out = L.moe_experts(h, mlp.w_gate_up, mlp.w_down, weights, expert_ids)  # [n_tok, n_embd]
        if mlp.shared is not None and mlp.w_shared_gate is not None:
            shared = L.swiglu_mlp(h, mlp.shared.w_gate_up, mlp.shared.w_down)  # [n_tok, n_embd]
            out = out + L.sigmoid(L.linear(h, mlp.w_shared_gate)) * shared
        return out

    def _logits(self, x: np.ndarray) -> np.ndarray:
        h = L.rms_norm(x, self.weights.final_norm, self.config.rms_norm_eps)  # [n, n_embd]
        return L.linear(h, self.weights.lm_head)  # [n, n_vocab]

    def _rope(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """cos/sin rows for `positions`, from a table grown on demand (each row depends only on
        its own position, so the table size never changes a value)."""
        need = int(positions.max()) + 1 if positions.size else 0
        if need > self._cos.shape[0]:
            size = max(need, 2 * self._cos.shape[0], 256)
            self._cos, self._sin = L.rope_cos_sin(self.inv_freq, np.arange(size))  # [size, d]
        return self._cos[positions], self._sin[positions]  # [n_tok, d_head] x2

    def _check_ids(self, token_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        ids = np.asarray(token_ids)  # [n]
        if ids.ndim != 1 or ids.shape[0] == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise ConfigError(f"token_ids must be a non-empty 1-D sequence of ints, got shape "
                              f"{ids.shape} dtype {ids.dtype}")
        if ids.min() < 0 or ids.max() >= self.config.n_vocab:
            raise ConfigError(f"token ids must be in 0..{self.config.n_vocab - 1}, got "
                              f"{int(ids.min())}..{int(ids.max())}")
        return ids


def default_layer_windows(config: ModelConfig) -> tuple[int | None, ...]:
    """The sliding window of each layer: Mistral/Mixtral/Qwen2 slide in every layer when the
    config has a window; Llama never does (transformers' Llama ignores `sliding_window`)."""
    window = None if config.model_type == "llama" else config.sliding_window
    return (window,) * config.n_layer


def _layer_windows(config: ModelConfig, raw: dict[str, Any]) -> tuple[int | None, ...]:
    """Per-layer sliding windows from `config.json`: Qwen2 and Qwen2-MoE honour `layer_types`
    or, without it, their `max_window_layers` rules (transformers' config classes)."""
    window = config.sliding_window
    if window is None or config.model_type not in ("qwen2", "qwen2_moe"):
        return default_layer_windows(config)
    types = raw.get("layer_types")
    if isinstance(types, list) and len(types) == config.n_layer:
        return tuple(window if t == "sliding_attention" else None for t in types)
    first = int(raw.get("max_window_layers", 28))
    if config.model_type == "qwen2":
        return tuple(window if i >= first else None for i in range(config.n_layer))
    return tuple(window if (i + 1) % 2 and i < first else None for i in range(config.n_layer))
