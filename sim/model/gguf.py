"""Reading llama.cpp GGUF files: metadata into a `ModelConfig`, tensors into the NumPy model.

A `.gguf` file holds key/value metadata (`llama.block_count`, `tokenizer.ggml.tokens`, ...) and
named tensors in llama.cpp's names (`blk.3.attn_q.weight`) and formats (F32, F16, BF16, Q8_0,
Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K: `sim.model.gguf_quants`). `GGUFFile`
parses it with the `gguf` package and presents the tensors under transformers' checkpoint names
as a `TensorSource`, so the same `build_weights` that reads safetensors builds the model. Two
things llama.cpp's converter does are undone here: the q/k projection rows of the `llama`
architecture are permuted so that llama.cpp can rotate adjacent pairs (transformers'
`rotate_half` rotates halves), and Llama 3.1 frequency scaling is stored as a `rope_freqs`
tensor (divisors of the inverse frequencies).

Supported architectures: `llama` (dense, and MoE as Mixtral), `qwen2`, `qwen2moe`. Quantized
weights are dequantized to the model's dtype at load time; the timing side prices the shape in
bfloat16 (float32/float16 for unquantized files): weight quantization belongs to its own issue.

References: the GGUF specification (ggml-org/ggml `docs/gguf.md`); llama.cpp
`convert_hf_to_gguf.py` (`LlamaModel.permute`, tensor name map) and `gguf-py` (constants,
`GGUFReader`); Hugging Face transformers `modeling_gguf_pytorch_utils.py` (the reverse map).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np

from sim.core.errors import ConfigError
from sim.core.model_config import ModelConfig
from sim.model.gguf_quants import dequantize

ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen2moe": "qwen2_moe"}
INSTALL_HINT = "pip install 'infersim[real]' (or: pip install gguf)"

# llama.cpp per-layer tensor name -> transformers name (after "model.layers.{i}.")
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    **{f"attn_{x}.{p}": f"self_attn.{x}_proj.{p}" for x in "qkv" for p in ("weight", "bias")},
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_output.bias": "self_attn.o_proj.bias",
    **{f"ffn_{x}.{p}": f"mlp.{x}_proj.{p}" for x in ("gate", "up", "down")
       for p in ("weight", "bias")},
    **{f"ffn_{x}_shexp.weight": f"mlp.shared_expert.{x}_proj.weight" for x in ("gate", "up", "down")},
    "ffn_gate_inp_shexp.weight": "mlp.shared_expert_gate.weight",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
                 "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}


def _gguf_module() -> Any:
    try:
        import gguf
    except ImportError as exc:
        raise ConfigError(f"reading .gguf files needs the 'gguf' package: {INSTALL_HINT}") from exc
    return gguf


@functools.lru_cache(maxsize=4)
def _reader(path: str, mtime_ns: int, size: int) -> Any:
    """A parsed GGUF file (parsing 50k-token vocabularies takes ~2 s: done once per file)."""
    try:
        return _gguf_module().GGUFReader(path)
    except ConfigError:
        raise
    except Exception as exc:  # gguf raises ValueError / struct errors on corrupt files
        raise ConfigError(f"{path}: not a readable GGUF file: {exc}") from exc


def _decimal(value: float) -> float:
    """A float32 metadata value as the decimal it was written from (1e-5, not 9.99999975e-06):
    the shortest repr that round-trips through float32."""
    return float(str(np.float32(value)))


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: within each head the rows were reordered from
    (half, i) to (i, half) so that rotating adjacent pairs equals rotating halves."""
    rows = w.shape[0]
    d_head = rows // n_head
    return (w.reshape(n_head, d_head // 2, 2, *w.shape[1:]).swapaxes(1, 2)
            .reshape(w.shape))  # [n_head * d_head, ...]


class GGUFFile:
    """One `.gguf` file: metadata, config, and a `TensorSource` in transformers' names."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise ConfigError(f"{self.path}: no such GGUF file")
        stat = self.path.stat()
        self.reader = _reader(str(self.path.resolve()), stat.st_mtime_ns, stat.st_size)
        self.tensors = {t.name: t for t in self.reader.tensors}
        arch = self.get("general.architecture")
        if arch not in ARCHITECTURES:
            raise ConfigError(f"{self.path}: GGUF architecture {arch!r} is not supported by the "
                              f"NumPy model; supported: {', '.join(ARCHITECTURES)}")
        self.arch: str = arch
        self._names = self._name_map()

    # ------------------------------------------------------------------ metadata
    def get(self, key: str, default: Any = None) -> Any:
        """The value of metadata `key` (strings, numbers, lists), or `default`."""
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def _arch(self, key: str, default: Any = None) -> Any:
        return self.get(f"{self.arch}.{key}", default)

    def _need(self, key: str) -> Any:
        value = self._arch(key)
        if value is None:
            raise ConfigError(f"{self.path}: GGUF metadata has no {self.arch}.{key}")
        return value

    def model_config(self, name: str | None = None) -> ModelConfig:
        """The model's shape from the metadata (and tensor shapes where metadata is silent)."""
        n_head = int(self._need("attention.head_count"))
        n_embd = int(self._need("embedding_length"))
        n_expert = int(self._arch("expert_count", 0) or 0)
        model_type = ARCHITECTURES[self.arch]
        if model_type == "llama" and n_expert:
            model_type = "mixtral"
        moe: dict[str, Any] = {}
        if n_expert:
            moe = {"n_expert": n_expert, "n_expert_per_tok": int(self._need("expert_used_count")),
                   "moe_n_inner": int(self._arch("expert_feed_forward_length", 0)
                                      or self._need("feed_forward_length")),
                   "norm_topk_prob": model_type == "mixtral"}
            if model_type == "qwen2_moe":
                moe["shared_expert_n_inner"] = int(
                    self._arch("expert_shared_feed_forward_length", 0) or 0)
        embd = self.tensors.get("token_embd.weight")
        n_vocab = self._arch("vocab_size") or (len(self.get("tokenizer.ggml.tokens") or [])
                                               or (int(embd.shape[1]) if embd is not None else 0))
        eos = [self.get(k) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")]
        file_type = self.get("general.file_type")
        return ModelConfig(
            name=name or self.path.name,
            model_type=model_type,
            n_layer=int(self._need("block_count")),
            n_embd=n_embd,
            n_head=n_head,
            n_kv_head=int(self._arch("attention.head_count_kv", n_head) or n_head),
            d_head=int(self._arch("attention.key_length", 0) or n_embd // n_head),
            n_inner=0 if n_expert and model_type == "mixtral" else int(
                self._arch("feed_forward_length", 0) or 0),
            n_vocab=int(n_vocab),
            max_position_embeddings=int(self._arch("context_length", 2048)),
            rms_norm_eps=_decimal(self._arch("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=_decimal(self._arch("rope.freq_base", 10000.0)),
            rope_scaling=self._rope_scaling(),
            tie_word_embeddings="output.weight" not in self.tensors,
            qkv_bias="blk.0.attn_q.bias" in self.tensors,
            o_bias="blk.0.attn_output.bias" in self.tensors,
            mlp_bias="blk.0.ffn_up.bias" in self.tensors,
            dtype={0: "float32", 1: "float16"}.get(file_type, "bfloat16"),
            bos_token_id=self.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=tuple(dict.fromkeys(int(e) for e in eos if e is not None)),
            **moe,
        )

    def _rope_scaling(self) -> dict[str, Any] | None:
        kind = self._arch("rope.scaling.type", "none")
        if kind in ("none", None):
            return None
        if kind == "linear":
            return {"rope_type": "linear", "factor": float(self._need("rope.scaling.factor"))}
        raise ConfigError(f"{self.path}: rope scaling {kind!r} is not supported (linear only; "
                          "Llama 3.1 scaling arrives as a rope_freqs tensor and is supported)")

    def rope_freq_divisors(self) -> np.ndarray | None:
        """Llama 3.1-style per-frequency divisors `[d_head // 2]` (`rope_freqs.weight`), if any."""
        if "rope_freqs.weight" not in self.tensors:
            return None
        return self._dequantized("rope_freqs.weight")

    # ------------------------------------------------------------------ tensors (TensorSource)
    def _name_map(self) -> dict[str, tuple[str, str]]:
        """transformers name -> (GGUF name, how to transform it)."""
        out: dict[str, tuple[str, str]] = {}
        for gname in self.tensors:
            if gname in _GLOBAL_NAMES:
                out[_GLOBAL_NAMES[gname]] = (gname, "")
                continue
            parts = gname.split(".", 2)
            if parts[0] != "blk" or len(parts) < 3:
                continue
            i, rest = parts[1], parts[2]
            moe_prefix = "block_sparse_moe" if self.arch == "llama" else "mlp"
            if rest == "ffn_gate_inp.weight":
                out[f"model.layers.{i}.{moe_prefix}.gate.weight"] = (gname, "")
            elif rest == "ffn_gate_exps.weight":
                out[f"model.layers.{i}.{moe_prefix}.experts.gate_up_proj"] = (gname, "gate_up")
            elif rest == "ffn_down_exps.weight":
                out[f"model.layers.{i}.{moe_prefix}.experts.down_proj"] = (gname, "")
            elif rest in _LAYER_NAMES:
                hf = _LAYER_NAMES[rest]
                how = "row_q" if rest.startswith("attn_q") else "row_k" if rest.startswith(
                    "attn_k") else "row_vec" if rest == "ffn_gate_inp_shexp.weight" else ""
                out[f"model.layers.{i}.{hf}"] = (gname, how)
        return out

    def names(self) -> list[str]:
        return list(self._names)

    def has(self, name: str) -> bool:
        return name in self._names

    def where(self, name: str | None = None) -> str:
        if name is not None and name in self._names:
            return f"{self.path} (tensor {self._names[name][0]})"
        return str(self.path)

    def _dequantized(self, gname: str) -> np.ndarray:
        t = self.tensors[gname]
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))  # GGUF lists ne0 (fastest) first
        raw = np.ascontiguousarray(t.data).reshape(-1).view(np.uint8)  # [n_bytes]
        return dequantize(raw, t.tensor_type.name, shape)  # shape

    def tensor(self, name: str) -> np.ndarray:
        """The float32 tensor named `name` (transformers' name), in transformers' layout."""
        if name not in self._names:
            raise ConfigError(f"{self.path}: no tensor for {name!r} in this GGUF file")
        gname, how = self._names[name]
        w = self._dequantized(gname)
        if how in ("row_q", "row_k") and self.arch == "llama":
            n_head = int(self._need("attention.head_count"))
            heads = n_head if how == "row_q" else int(self._arch("attention.head_count_kv", n_head))
            w = unpermute_rows(w, heads)
        elif how == "gate_up":  # [E, I, H] gate and [E, I, H] up -> fused [E, 2 I, H]
            up = self._dequantized(gname.replace("ffn_gate_exps", "ffn_up_exps"))
            w = np.concatenate([w, up], axis=1)  # [E, 2 I, H]
        elif how == "row_vec":
            w = w.reshape(1, -1)  # [1, n_embd]
        return w


class GGUFTensorSource:
    """`GGUFFile`'s tensors as a `TensorSource` (has / get / where) in transformers' names."""

    config_origin = "the GGUF metadata"

    def __init__(self, gguf_file: GGUFFile) -> None:
        self.file = gguf_file

    def has(self, name: str) -> bool:
        return self.file.has(name)

    def get(self, name: str) -> np.ndarray:
        return self.file.tensor(name)

    def where(self, name: str | None = None) -> str:
        return self.file.where(name)


def read_gguf_config(path: str | Path, name: str | None = None) -> ModelConfig:
    """The `ModelConfig` of a `.gguf` file (what `resolve_model` returns for a GGUF path)."""
    return GGUFFile(path).model_config(name)
