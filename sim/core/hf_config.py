"""Reading a Hugging Face `config.json` into a `ModelConfig`.

transformers hard-codes some family traits in its modeling files rather than in config.json
(Qwen2's q/k/v bias, Mixtral's and Qwen2-MoE's expert fields, Mistral's sliding window); this
module knows them, and checks every field's type before `ModelConfig` checks the shape. Both
spellings are read: transformers 4 (`rope_theta`, `rope_scaling`, `torch_dtype`) and
transformers 5 (`rope_parameters`, `dtype`).
"""

from __future__ import annotations

import math
from typing import Any

from sim.core.errors import ConfigError
from sim.core.model_config import SUPPORTED_MODEL_TYPES, ModelConfig


def _require(cfg: dict[str, Any], key: str, kind: type = int) -> Any:
    if key not in cfg or cfg[key] is None:
        raise ConfigError(f"config.json has no {key!r} (needed for a {cfg.get('model_type')} model)")
    value = cfg[key]
    if kind is int and (not isinstance(value, int) or isinstance(value, bool)):
        raise ConfigError(f"config.json field {key!r} must be an integer, got {value!r}")
    if kind is float and not isinstance(value, int | float):
        raise ConfigError(f"config.json field {key!r} must be a number, got {value!r}")
    return value


def _optional(cfg: dict[str, Any], key: str, kind: type, default: Any) -> Any:
    """`cfg[key]` checked to be of `kind` (int: no bools, floats or strings; float: any real
    number; bool), or `default` when absent or null."""
    value = cfg.get(key)
    if value is None:
        return default
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config.json field {key!r} must be true or false, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"config.json field {key!r} must be a number, got {value!r}")
    if kind is int:
        if not isinstance(value, int):
            raise ConfigError(f"config.json field {key!r} must be an integer, got {value!r}")
        return value
    if not math.isfinite(value):
        raise ConfigError(f"config.json field {key!r} must be a finite number, got {value!r}")
    return float(value)


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
    if not (math.isfinite(theta) and theta > 0):
        raise ConfigError(f"config.json rope_theta must be a finite number > 0 (e.g. 10000.0 "
                          f"or 500000.0), got {theta!r}")
    return float(theta), scaling or None


def _token_id(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"config.json {key} must be a token id (an integer >= 0) or a list "
                          f"of them, got {value!r}")
    return value


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, list | tuple):
        return tuple(_token_id(v, "eos_token_id") for v in value)
    return (_token_id(value, "eos_token_id"),)


def _layer_list(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if not isinstance(value, list | tuple) or any(
            isinstance(i, bool) or not isinstance(i, int) for i in value):
        raise ConfigError(f"config.json mlp_only_layers must be a list of layer indices, got "
                          f"{str(value)[:80]}")
    return tuple(value)


def model_config_from_hf(cfg: dict[str, Any], name: str) -> ModelConfig:
    """A `ModelConfig` from the dict of a Hugging Face `config.json` (transformers 4 or 5
    spelling); a missing, mistyped or unsupported field raises `ConfigError` naming it."""
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
        "bos_token_id": (None if cfg.get("bos_token_id") is None
                         else _token_id(cfg["bos_token_id"], "bos_token_id")),
        "eos_token_ids": _eos_ids(cfg.get("eos_token_id")),
    }
    if common["n_head"] <= 0:
        raise ConfigError(f"config.json num_attention_heads must be >= 1, got "
                          f"{common['n_head']}")
    dims_divide = common["n_embd"] % common["n_head"] == 0
    if model_type == "opt":
        if not dims_divide:
            raise ConfigError(
                f"config.json hidden_size ({common['n_embd']}) must be a multiple of "
                f"num_attention_heads ({common['n_head']}): OPT splits the hidden size over its "
                "heads")
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
    # absent or null: MHA (transformers' default); 0 is no head count at all, not MHA
    n_kv_head = _optional(cfg, "num_key_value_heads", int, common["n_head"])
    if n_kv_head < 1:
        raise ConfigError(f"config.json num_key_value_heads must be >= 1 (omit it for MHA), "
                          f"got {n_kv_head}")
    d_head = _optional(cfg, "head_dim", int, None)
    if d_head is None:  # transformers' default: hidden_size // num_attention_heads
        if not dims_divide:
            raise ConfigError(
                f"config.json hidden_size ({common['n_embd']}) is not a multiple of "
                f"num_attention_heads ({common['n_head']}) and there is no head_dim; give "
                "head_dim or fix the head count")
        d_head = common["n_embd"] // common["n_head"]
    elif d_head < 1:
        raise ConfigError(f"config.json head_dim must be >= 1, got {d_head}")
    theta, scaling = _rope(cfg)
    is_qwen = model_type in ("qwen2", "qwen2_moe")
    attention_bias = bool(cfg.get("attention_bias", False))
    sliding_window = _optional(cfg, "sliding_window", int, None)
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
            "shared_expert_n_inner": _optional(cfg, "shared_expert_intermediate_size", int, 0),
            "norm_topk_prob": bool(cfg.get("norm_topk_prob", False)),
            "decoder_sparse_step": _optional(cfg, "decoder_sparse_step", int, 1) or 1,
            "mlp_only_layers": _layer_list(cfg.get("mlp_only_layers")),
        }
    hidden_act = str(cfg.get("hidden_act", "silu"))
    if hidden_act != "silu":
        raise ConfigError(f"config.json hidden_act {hidden_act!r} is not supported (only 'silu')")
    return ModelConfig(
        **common,
        n_kv_head=int(n_kv_head),
        d_head=int(d_head),
        n_inner=_optional(cfg, "intermediate_size", int, 0),
        rms_norm_eps=_optional(cfg, "rms_norm_eps", float, 1e-6),
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
