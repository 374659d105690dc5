"""Model shapes: `ModelConfig`, read from a Hugging Face `config.json`.

Covers the Llama family as transformers defines it: Llama 2/3 (GQA, llama3 RoPE scaling),
Mistral (sliding-window attention), Qwen2 (q/k/v bias), Mixtral (top-k MoE) and Qwen2-MoE
(top-k MoE plus a gated shared expert). OPT is understood as a shape (for pricing and memory)
only. Both config spellings are read: transformers 4 (`rope_theta`, `rope_scaling`,
`torch_dtype`) and transformers 5 (`rope_parameters`, `dtype`).

Parameter counts follow the module lists of transformers' modeling files, so
`num_params()` of `meta-llama/Llama-2-7b-hf` is 6,738,415,616 as its safetensors index says.

References: Touvron et al. 2023 (Llama 2); Jiang et al. 2023 (Mistral 7B), 2024 (Mixtral);
Qwen Team 2024 (Qwen1.5-MoE); Zhang et al. 2022 (OPT); Hugging Face transformers configs.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sim.core.dtypes import canonical_dtype, dtype_bytes
from sim.core.errors import ConfigError

# model_type -> family traits that transformers hard-codes in the modeling file (not in config.json)
LLAMA_LIKE = ("llama", "mistral", "qwen2", "mixtral", "qwen2_moe")
SUPPORTED_MODEL_TYPES = (*LLAMA_LIKE, "opt")


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a decoder-only transformer, with GPT-2-code dimension names.

    `n_inner` is the dense MLP width; `moe_n_inner` the width of one routed expert and
    `shared_expert_n_inner` that of Qwen-MoE's always-on shared expert (0 = none).
    """

    name: str
    model_type: str
    n_layer: int
    n_embd: int
    n_head: int
    n_kv_head: int
    d_head: int
    n_inner: int
    n_vocab: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = field(default=None, hash=False)
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    # mixture of experts (n_expert == 0: dense)
    n_expert: int = 0
    n_expert_per_tok: int = 0
    moe_n_inner: int = 0
    shared_expert_n_inner: int = 0
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    # traits of non-Llama shapes (OPT), used for pricing and memory only
    gated_mlp: bool = True
    hidden_act: str = "silu"
    norm_kind: str = "rmsnorm"
    learned_pos_embd: bool = False
    dtype: str = "bfloat16"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        where = f"model config {self.name!r}"
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{where}: model_type {self.model_type!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        for key in ("n_layer", "n_embd", "n_head", "n_kv_head", "d_head", "n_vocab",
                    "max_position_embeddings"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{where}: {key} must be a positive integer, got {value!r}")
        if self.n_head % self.n_kv_head:
            raise ConfigError(
                f"{where}: n_head ({self.n_head}) must be a multiple of n_kv_head "
                f"({self.n_kv_head}) for grouped-query attention"
            )
        if self.rms_norm_eps <= 0 or self.rope_theta <= 0:
            raise ConfigError(f"{where}: rms_norm_eps and rope_theta must be positive")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"{where}: sliding_window must be positive or null")
        if self.n_expert:
            if not 0 < self.n_expert_per_tok <= self.n_expert:
                raise ConfigError(
                    f"{where}: n_expert_per_tok must be in 1..n_expert ({self.n_expert}), "
                    f"got {self.n_expert_per_tok}"
                )
            if self.moe_n_inner <= 0:
                raise ConfigError(f"{where}: an MoE model needs a positive moe_n_inner")
        elif self.n_inner <= 0:
            raise ConfigError(f"{where}: n_inner must be positive for a dense model")
        object.__setattr__(self, "dtype", canonical_dtype(self.dtype))

    # ------------------------------------------------------------------ shape facts
    @property
    def is_moe(self) -> bool:
        return self.n_expert > 0

    @property
    def is_llama_like(self) -> bool:
        """True when the NumPy model can run this shape (the Llama family)."""
        return self.model_type in LLAMA_LIKE

    @property
    def n_q_per_kv(self) -> int:
        """Query heads per KV head (1 = MHA, n_head = MQA)."""
        return self.n_head // self.n_kv_head

    def is_moe_layer(self, layer: int) -> bool:
        """Whether layer `layer` has routed experts (Qwen2-MoE's sparse-step rule)."""
        return (
            self.is_moe
            and layer not in self.mlp_only_layers
            and (layer + 1) % self.decoder_sparse_step == 0
        )

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.n_layer))

    # ------------------------------------------------------------------ parameter counts
    def attn_params_per_layer(self) -> int:
        q_dim, kv_dim = self.n_head * self.d_head, self.n_kv_head * self.d_head
        weights = self.n_embd * (q_dim + 2 * kv_dim) + q_dim * self.n_embd
        biases = (q_dim + 2 * kv_dim) * self.qkv_bias + self.n_embd * self.o_bias
        return weights + biases

    def dense_mlp_params(self, n_inner: int) -> int:
        n_mat = 3 if self.gated_mlp else 2
        biases = (n_inner * (n_mat - 1) + self.n_embd) * self.mlp_bias
        return n_mat * self.n_embd * n_inner + biases

    def moe_params_per_layer(self, active_only: bool = False) -> int:
        """Router + experts (+ shared expert and its sigmoid gate) of one MoE layer."""
        n_routed = self.n_expert_per_tok if active_only else self.n_expert
        total = self.n_embd * self.n_expert + n_routed * self.dense_mlp_params(self.moe_n_inner)
        if self.shared_expert_n_inner:
            total += self.dense_mlp_params(self.shared_expert_n_inner) + self.n_embd
        return total

    def norm_params(self) -> int:
        return self.n_embd * (2 if self.norm_kind == "layernorm" else 1)

    def num_params(self, active_only: bool = False) -> int:
        """Parameter count; `active_only` counts only the experts one token uses (MoE)."""
        per_layer_common = self.attn_params_per_layer() + 2 * self.norm_params()
        total = self.n_layer * per_layer_common
        for layer in range(self.n_layer):
            if self.is_moe_layer(layer):
                total += self.moe_params_per_layer(active_only)
            else:
                total += self.dense_mlp_params(self.n_inner)
        total += self.n_vocab * self.n_embd  # token embedding
        if self.learned_pos_embd:
            total += (self.max_position_embeddings + 2) * self.n_embd  # OPT's offset of 2
        total += self.norm_params()  # final norm
        if not self.tie_word_embeddings:
            total += self.n_vocab * self.n_embd  # lm_head
        return total

    def weight_bytes(self, dtype: str | None = None) -> float:
        """Bytes of all weights stored in `dtype` (default: the checkpoint dtype)."""
        return self.num_params() * dtype_bytes(dtype or self.dtype)

    def kv_bytes_per_token(self, dtype: str | None = None) -> float:
        """KV-cache bytes one token occupies: 2 (K and V) x layers x KV heads x head dim x bytes."""
        return 2 * self.n_layer * self.n_kv_head * self.d_head * dtype_bytes(dtype or self.dtype)

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ Hugging Face config.json
    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], name: str = "") -> ModelConfig:
        """Build from the dict of a Hugging Face `config.json` (transformers 4 or 5 spelling)."""
        return _from_hf_config(cfg, name or str(cfg.get("_name_or_path", "") or "model"))

    @classmethod
    def from_json_file(cls, path: str | Path) -> ModelConfig:
        """Read a `config.json`; malformed files raise `ConfigError` naming the file."""
        path = Path(path)
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read a JSON model config: {exc}") from exc
        if not isinstance(cfg, dict):
            raise ConfigError(f"{path}: a model config must be a JSON object")
        try:
            return _from_hf_config(cfg, path.parent.name or str(path))
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from exc


def _require(cfg: dict[str, Any], key: str, kind: type = int) -> Any:
    if key not in cfg or cfg[key] is None:
        raise ConfigError(f"config.json has no {key!r} (needed for a {cfg.get('model_type')} model)")
    value = cfg[key]
    if kind is int and (not isinstance(value, int) or isinstance(value, bool)):
        raise ConfigError(f"config.json field {key!r} must be an integer, got {value!r}")
    if kind is float and not isinstance(value, int | float):
        raise ConfigError(f"config.json field {key!r} must be a number, got {value!r}")
    return value


def _rope(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """RoPE base and scaling from either spelling: tf4 `rope_theta` + `rope_scaling`, tf5
    `rope_parameters` (holding `rope_theta` and `rope_type`)."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and params:
        theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = cfg.get("rope_theta", 10000.0)
        scaling = dict(cfg["rope_scaling"]) if isinstance(cfg.get("rope_scaling"), dict) else {}
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    if scaling.get("rope_type", "default") == "default":
        scaling = {}
    if not isinstance(theta, int | float) or isinstance(theta, bool):
        raise ConfigError(f"config.json rope_theta must be a number, got {theta!r}")
    return float(theta), scaling or None


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _from_hf_config(cfg: dict[str, Any], name: str) -> ModelConfig:
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"config.json model_type {model_type!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16"
    common: dict[str, Any] = {
        "name": name,
        "model_type": model_type,
        "n_layer": _require(cfg, "num_hidden_layers"),
        "n_embd": _require(cfg, "hidden_size"),
        "n_head": _require(cfg, "num_attention_heads"),
        "n_vocab": _require(cfg, "vocab_size"),
        "max_position_embeddings": _require(cfg, "max_position_embeddings"),
        "dtype": str(dtype),
        "bos_token_id": cfg.get("bos_token_id"),
        "eos_token_ids": _eos_ids(cfg.get("eos_token_id")),
    }
    if model_type == "opt":
        return ModelConfig(
            **common,
            n_kv_head=common["n_head"],
            d_head=common["n_embd"] // common["n_head"],
            n_inner=_require(cfg, "ffn_dim"),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
            qkv_bias=bool(cfg.get("enable_bias", True)),
            o_bias=bool(cfg.get("enable_bias", True)),
            mlp_bias=bool(cfg.get("enable_bias", True)),
            gated_mlp=False,
            hidden_act=str(cfg.get("activation_function", "relu")),
            norm_kind="layernorm",
            learned_pos_embd=True,
        )
    n_kv_head = cfg.get("num_key_value_heads") or common["n_head"]
    d_head = cfg.get("head_dim") or common["n_embd"] // common["n_head"]
    theta, scaling = _rope(cfg)
    is_qwen = model_type in ("qwen2", "qwen2_moe")
    attention_bias = bool(cfg.get("attention_bias", False))
    sliding_window = cfg.get("sliding_window")
    if is_qwen and not cfg.get("use_sliding_window", False):
        sliding_window = None  # Qwen2 carries a window size but only uses it when asked
    if model_type == "llama":
        sliding_window = None  # transformers' Llama ignores the field
    moe: dict[str, Any] = {}
    if model_type == "mixtral":
        moe = {
            "n_expert": _require(cfg, "num_local_experts"),
            "n_expert_per_tok": _require(cfg, "num_experts_per_tok"),
            "moe_n_inner": _require(cfg, "intermediate_size"),
            "norm_topk_prob": True,  # MixtralSparseMoeBlock always renormalises the top-k
        }
    elif model_type == "qwen2_moe":
        moe = {
            "n_expert": _require(cfg, "num_experts"),
            "n_expert_per_tok": _require(cfg, "num_experts_per_tok"),
            "moe_n_inner": _require(cfg, "moe_intermediate_size"),
            "shared_expert_n_inner": int(cfg.get("shared_expert_intermediate_size") or 0),
            "norm_topk_prob": bool(cfg.get("norm_topk_prob", False)),
            "decoder_sparse_step": int(cfg.get("decoder_sparse_step", 1) or 1),
            "mlp_only_layers": tuple(int(i) for i in cfg.get("mlp_only_layers") or ()),
        }
    hidden_act = str(cfg.get("hidden_act", "silu"))
    if hidden_act != "silu":
        raise ConfigError(f"config.json hidden_act {hidden_act!r} is not supported (only 'silu')")
    return ModelConfig(
        **common,
        n_kv_head=int(n_kv_head),
        d_head=int(d_head),
        n_inner=int(cfg.get("intermediate_size") or 0),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=bool(cfg.get("qkv_bias", True)) if is_qwen else attention_bias,
        o_bias=False if is_qwen else attention_bias,
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        sliding_window=int(sliding_window) if sliding_window else None,
        hidden_act=hidden_act,
        **moe,
    )
