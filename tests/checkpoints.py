"""Test helper: tiny Hugging Face-style checkpoint folders (config.json + safetensors).

`write_checkpoint(folder, config, tensors)` writes what `save_pretrained` would: a transformers
`config.json` for `config` and the tensors as `model.safetensors`, or as shards plus
`model.safetensors.index.json`. F64/F32/F16 go through `safetensors.numpy`; BF16 (which NumPy
lacks) through a small writer of the same format, rounding to nearest even as PyTorch does.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from sim.core.model_config import ModelConfig

NUMPY_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16}


def hf_config_dict(config: ModelConfig) -> dict[str, Any]:
    """The transformers `config.json` fields that describe `config`."""
    c = config
    cfg: dict[str, Any] = {
        "model_type": c.model_type, "hidden_size": c.n_embd, "intermediate_size": c.n_inner,
        "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head,
        "num_key_value_heads": c.n_kv_head, "head_dim": c.d_head, "vocab_size": c.n_vocab,
        "max_position_embeddings": c.max_position_embeddings, "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta, "rope_scaling": c.rope_scaling,
        "tie_word_embeddings": c.tie_word_embeddings, "hidden_act": "silu",
        "attention_bias": c.qkv_bias, "mlp_bias": c.mlp_bias, "torch_dtype": c.dtype,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": list(c.eos_token_ids) if len(c.eos_token_ids) > 1 else (
            c.eos_token_ids[0] if c.eos_token_ids else None),
    }
    if c.model_type in ("mistral", "mixtral"):
        cfg["sliding_window"] = c.sliding_window
    if c.model_type in ("qwen2", "qwen2_moe"):
        cfg["use_sliding_window"] = c.sliding_window is not None
        cfg["sliding_window"] = c.sliding_window
        cfg["max_window_layers"] = 0
        cfg["layer_types"] = ["sliding_attention" if c.sliding_window else "full_attention"
                              ] * c.n_layer
    if c.model_type == "mixtral":
        cfg.update(num_local_experts=c.n_expert, num_experts_per_tok=c.n_expert_per_tok,
                   intermediate_size=c.moe_n_inner)
    if c.model_type == "qwen2_moe":
        cfg.update(num_experts=c.n_expert, num_experts_per_tok=c.n_expert_per_tok,
                   moe_intermediate_size=c.moe_n_inner,
                   shared_expert_intermediate_size=c.shared_expert_n_inner,
                   norm_topk_prob=c.norm_topk_prob, decoder_sparse_step=c.decoder_sparse_step,
                   mlp_only_layers=list(c.mlp_only_layers))
    return cfg


def float_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round float32 values to bfloat16 (nearest, ties to even), as uint16 bit patterns."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], dtype: str = "F32") -> None:
    """Write one safetensors file with every tensor stored as `dtype` (F64/F32/F16/BF16)."""
    if dtype in NUMPY_DTYPES:
        save_file({k: np.ascontiguousarray(v, dtype=NUMPY_DTYPES[dtype])
                   for k, v in tensors.items()}, str(path))
        return
    assert dtype == "BF16", dtype
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    blobs, offset = [], 0
    for name, value in tensors.items():
        blob = float_to_bf16_bits(value).tobytes()
        header[name] = {"dtype": "BF16", "shape": list(np.shape(value)),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    raw = json.dumps(header).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # pad the header to 8 bytes, as safetensors does
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


def write_checkpoint(folder: str | Path, config: ModelConfig | dict[str, Any],
                     tensors: dict[str, np.ndarray], dtype: str = "F32",
                     num_shards: int = 1) -> Path:
    """A checkpoint folder: config.json + model.safetensors (or `num_shards` shards + index)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = config if isinstance(config, dict) else hf_config_dict(config)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    if num_shards == 1:
        write_safetensors(folder / "model.safetensors", tensors, dtype)
        return folder
    names = list(tensors)
    weight_map = {}
    for shard, part in enumerate(np.array_split(np.arange(len(names)), num_shards)):
        filename = f"model-{shard + 1:05d}-of-{num_shards:05d}.safetensors"
        write_safetensors(folder / filename, {names[i]: tensors[names[i]] for i in part}, dtype)
        weight_map.update({names[i]: filename for i in part})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index), encoding="utf-8")
    return folder
