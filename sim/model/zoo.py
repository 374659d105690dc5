"""Built-in model shapes, by Hugging Face id, and name resolution.

Each entry is the relevant part of the model's published `config.json` (no weights are ever
downloaded): the shapes are what the cost model prices and the memory plan sizes. Anywhere a
model name is accepted, a local folder holding a `config.json` works too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sim.core.errors import suggest
from sim.core.model_config import ModelConfig

_LLAMA2 = {"model_type": "llama", "vocab_size": 32000, "max_position_embeddings": 4096,
           "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "torch_dtype": "float16",
           "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False}
_LLAMA3 = {"model_type": "llama", "vocab_size": 128256, "max_position_embeddings": 8192,
           "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "torch_dtype": "bfloat16",
           "bos_token_id": 128000, "eos_token_id": 128001, "num_key_value_heads": 8}


def _shape(base: dict[str, Any], hidden: int, inter: int, layers: int, heads: int,
           kv_heads: int | None = None, **extra: Any) -> dict[str, Any]:
    cfg = {**base, "hidden_size": hidden, "intermediate_size": inter,
           "num_hidden_layers": layers, "num_attention_heads": heads, **extra}
    cfg["num_key_value_heads"] = kv_heads or cfg.get("num_key_value_heads") or heads
    return cfg


# Values from each model's config.json on the Hugging Face Hub.
BUILTIN_HF_CONFIGS: dict[str, dict[str, Any]] = {
    "meta-llama/Llama-2-7b-hf": _shape(_LLAMA2, 4096, 11008, 32, 32),
    "meta-llama/Llama-2-13b-hf": _shape(_LLAMA2, 5120, 13824, 40, 40),
    "meta-llama/Llama-2-70b-hf": _shape(_LLAMA2, 8192, 28672, 80, 64, 8),
    "meta-llama/Meta-Llama-3-8B": _shape(_LLAMA3, 4096, 14336, 32, 32),
    "meta-llama/Meta-Llama-3-70B": _shape(_LLAMA3, 8192, 28672, 80, 64),
    "mistralai/Mistral-7B-v0.1": _shape(
        {**_LLAMA2, "model_type": "mistral", "max_position_embeddings": 32768,
         "torch_dtype": "bfloat16", "sliding_window": 4096},
        4096, 14336, 32, 32, 8),
    "mistralai/Mixtral-8x7B-v0.1": _shape(
        {**_LLAMA2, "model_type": "mixtral", "max_position_embeddings": 32768,
         "torch_dtype": "bfloat16", "rope_theta": 1e6, "sliding_window": None,
         "num_local_experts": 8, "num_experts_per_tok": 2},
        4096, 14336, 32, 32, 8),
    "Qwen/Qwen1.5-MoE-A2.7B": _shape(
        {"model_type": "qwen2_moe", "vocab_size": 151936, "max_position_embeddings": 8192,
         "rms_norm_eps": 1e-6, "rope_theta": 1e6, "torch_dtype": "bfloat16",
         "bos_token_id": 151643, "eos_token_id": 151643, "tie_word_embeddings": False,
         "num_experts": 60, "num_experts_per_tok": 4, "moe_intermediate_size": 1408,
         "shared_expert_intermediate_size": 5632, "norm_topk_prob": False,
         "decoder_sparse_step": 1},
        2048, 5632, 24, 16),
    "Qwen/Qwen2-0.5B": _shape(
        {"model_type": "qwen2", "vocab_size": 151936, "max_position_embeddings": 131072,
         "rms_norm_eps": 1e-6, "rope_theta": 1e6, "torch_dtype": "bfloat16",
         "bos_token_id": 151643, "eos_token_id": 151643, "tie_word_embeddings": True},
        896, 4864, 24, 14, 2),
    "facebook/opt-13b": {
        "model_type": "opt", "hidden_size": 5120, "ffn_dim": 20480, "num_hidden_layers": 40,
        "num_attention_heads": 40, "vocab_size": 50272, "max_position_embeddings": 2048,
        "torch_dtype": "float16", "bos_token_id": 2, "eos_token_id": 2,
        "activation_function": "relu", "enable_bias": True, "tie_word_embeddings": True},
    "JackFram/llama-68m": _shape(
        {**_LLAMA2, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
         "torch_dtype": "float32", "bos_token_id": 0, "eos_token_id": 2},
        768, 3072, 2, 12),
    "TinyLlama/TinyLlama-1.1B-Chat-v1.0": _shape(
        {**_LLAMA2, "max_position_embeddings": 2048, "torch_dtype": "bfloat16"},
        2048, 5632, 22, 32, 4),
    "HuggingFaceTB/SmolLM2-135M-Instruct": _shape(
        {"model_type": "llama", "vocab_size": 49152, "max_position_embeddings": 8192,
         "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "torch_dtype": "bfloat16",
         "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": True},
        576, 1536, 30, 9, 3),
}

# Chat and base variants share a shape.
ALIASES: dict[str, str] = {
    "meta-llama/Llama-2-7b-chat-hf": "meta-llama/Llama-2-7b-hf",
    "meta-llama/Llama-2-13b-chat-hf": "meta-llama/Llama-2-13b-hf",
    "meta-llama/Llama-2-70b-chat-hf": "meta-llama/Llama-2-70b-hf",
    "meta-llama/Meta-Llama-3-8B-Instruct": "meta-llama/Meta-Llama-3-8B",
    "meta-llama/Meta-Llama-3-70B-Instruct": "meta-llama/Meta-Llama-3-70B",
    "mistralai/Mistral-7B-Instruct-v0.1": "mistralai/Mistral-7B-v0.1",
    "mistralai/Mixtral-8x7B-Instruct-v0.1": "mistralai/Mixtral-8x7B-v0.1",
    "HuggingFaceTB/SmolLM2-135M": "HuggingFaceTB/SmolLM2-135M-Instruct",
}

DEFAULT_MODEL = "meta-llama/Llama-2-7b-hf"


def builtin_names() -> list[str]:
    """Every name `resolve_model` accepts without a folder (ids and aliases)."""
    return sorted([*BUILTIN_HF_CONFIGS, *ALIASES])


def resolve_model(name_or_path: str | Path) -> ModelConfig:
    """The `ModelConfig` for a built-in Hugging Face id or a local folder with `config.json`.

    Unknown names raise `UnknownNameError` with the closest built-in names.
    """
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return ModelConfig.from_json_file(path / "config.json")
    if path.suffix == ".json" and path.is_file():
        return ModelConfig.from_json_file(path)
    if path.suffix == ".gguf" and path.is_file():  # llama.cpp file: shape from its metadata
        from sim.model.gguf import read_gguf_config

        return read_gguf_config(path)
    key = ALIASES.get(text, text)
    if key not in BUILTIN_HF_CONFIGS:
        lowered = {n.lower(): n for n in builtin_names()}
        if text.lower() in lowered:
            key = ALIASES.get(lowered[text.lower()], lowered[text.lower()])
        else:
            raise suggest(text, builtin_names(), "model (a built-in Hugging Face id or a local "
                          "folder with config.json)")
    return ModelConfig.from_hf_config(BUILTIN_HF_CONFIGS[key], name=text)
