"""Checkpoint folders: round trips (single file, sharded, F16/BF16, MoE layouts) and errors."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file

from sim.core.errors import ConfigError
from sim.core.model_config import ModelConfig
from sim.model.checkpoint import CheckpointReader, bf16_to_float32
from sim.model.numpy_model import NumpyModel
from sim.model.proxy import load_functional_model
from tests.checkpoints import float_to_bf16_bits, write_checkpoint, write_safetensors

BASE: dict[str, Any] = dict(name="t", n_layer=2, n_embd=16, n_head=4, n_kv_head=2, d_head=4, n_inner=24,
            n_vocab=40, max_position_embeddings=128)
LLAMA = ModelConfig(model_type="llama", qkv_bias=True, o_bias=True, mlp_bias=True, **BASE)
MIXTRAL = ModelConfig(model_type="mixtral", n_expert=3, n_expert_per_tok=2, moe_n_inner=8,
                      sliding_window=5, **BASE)
QWEN_MOE = ModelConfig(model_type="qwen2_moe", n_expert=3, n_expert_per_tok=2, moe_n_inner=8,
                       shared_expert_n_inner=12, qkv_bias=True, decoder_sparse_step=2, **BASE)
IDS = np.arange(12) % 40


def _model(config: ModelConfig) -> NumpyModel:
    return NumpyModel.random(config, seed=5, dtype="float64")


@pytest.mark.parametrize("config", [LLAMA, MIXTRAL, QWEN_MOE], ids=lambda c: c.model_type)
@pytest.mark.parametrize("num_shards", [1, 3])
def test_round_trip_float32(config: ModelConfig, num_shards: int, tmp_path: Path) -> None:
    model = _model(config)
    write_checkpoint(tmp_path, config, model.state_dict(), "F32", num_shards)
    loaded = NumpyModel.from_pretrained(tmp_path, dtype="float64")
    assert loaded.config.model_type == config.model_type
    assert loaded.layer_windows == model.layer_windows
    rounded = {k: v.astype(np.float32) for k, v in model.state_dict().items()}
    expected = NumpyModel.from_state_dict(config, rounded, "float64").forward(IDS)
    np.testing.assert_array_equal(loaded.forward(IDS), expected)


@pytest.mark.parametrize("dtype", ["F16", "BF16", "F64"])
def test_round_trip_half_precisions(dtype: str, tmp_path: Path) -> None:
    model = _model(LLAMA)
    write_checkpoint(tmp_path, LLAMA, model.state_dict(), dtype, num_shards=2)
    state = model.state_dict()
    if dtype == "F16":
        rounded = {k: v.astype(np.float16) for k, v in state.items()}
    elif dtype == "BF16":
        rounded = {k: bf16_to_float32(float_to_bf16_bits(v)) for k, v in state.items()}
    else:
        rounded = state
    loaded = NumpyModel.from_pretrained(tmp_path, dtype="float64")
    expected = NumpyModel.from_state_dict(LLAMA, rounded, "float64")
    np.testing.assert_array_equal(loaded.forward(IDS), expected.forward(IDS))
    if dtype != "F64":  # the rounding is real, not a no-op
        assert not np.array_equal(loaded.forward(IDS), model.forward(IDS))


def test_bf16_widening_is_exact() -> None:
    bits = np.array([0x3F80, 0xC000, 0x7F80, 0x0000, 0x3EAB], dtype=np.uint16)
    np.testing.assert_array_equal(bf16_to_float32(bits)[:4], [1.0, -2.0, np.inf, 0.0])
    x = np.float32(1 / 3)
    assert bf16_to_float32(float_to_bf16_bits(np.array([x])))[0] == pytest.approx(x, rel=4e-3)


def test_our_writer_and_safetensors_agree(tmp_path: Path) -> None:
    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.float32)}
    write_safetensors(tmp_path / "x.safetensors", tensors, "F32")
    for k, v in load_file(str(tmp_path / "x.safetensors")).items():
        np.testing.assert_array_equal(v, tensors[k])


def test_fused_moe_layout(tmp_path: Path) -> None:
    """transformers 5's in-memory names: `mlp.experts.gate_up_proj` [E, 2I, H], `down_proj`."""
    model = _model(MIXTRAL)
    state = {k: v for k, v in model.state_dict().items() if "block_sparse_moe" not in k}
    for i, layer in enumerate(model.weights.layers):
        state[f"model.layers.{i}.mlp.gate.weight"] = layer.mlp.w_router  # type: ignore[union-attr]
        state[f"model.layers.{i}.mlp.experts.gate_up_proj"] = layer.mlp.w_gate_up
        state[f"model.layers.{i}.mlp.experts.down_proj"] = layer.mlp.w_down
    write_checkpoint(tmp_path, MIXTRAL, state, "F64")
    loaded = NumpyModel.from_pretrained(tmp_path, dtype="float64")
    np.testing.assert_array_equal(loaded.forward(IDS), model.forward(IDS))


def test_load_functional_model_reads_a_folder(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, LLAMA, _model(LLAMA).state_dict(), "F32")
    with pytest.raises(ConfigError, match=r"no tokenizer\.json.*40-token.*tokenizer='byte'"):
        load_functional_model(tmp_path, dtype="float64")  # no tokenizer.json in the folder
    model, tok = load_functional_model(tmp_path, dtype="float64", tokenizer="byte")
    assert model.config.n_vocab == 40 and model.dtype == np.float64
    assert type(tok).__name__ == "ByteTokenizer"  # the explicit opt-in


# ---------------------------------------------------------------------------------- errors
@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return write_checkpoint(tmp_path, LLAMA, _model(LLAMA).state_dict(), "F32")


def test_missing_config_json(folder: Path) -> None:
    (folder / "config.json").unlink()
    with pytest.raises(ConfigError, match="no config.json"):
        NumpyModel.from_pretrained(folder)


def test_missing_weights(folder: Path) -> None:
    (folder / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="no model.safetensors"):
        NumpyModel.from_pretrained(folder)


def test_missing_tensor_is_named(folder: Path) -> None:
    state = _model(LLAMA).state_dict()
    del state["model.layers.1.mlp.up_proj.bias"]
    write_safetensors(folder / "model.safetensors", state)
    with pytest.raises(ConfigError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.bias'"):
        NumpyModel.from_pretrained(folder)


def test_wrong_shape_is_named(folder: Path) -> None:
    state = dict(_model(LLAMA).state_dict())
    state["model.norm.weight"] = np.ones(17)
    write_safetensors(folder / "model.safetensors", state)
    with pytest.raises(ConfigError, match=r"model\.safetensors: tensor 'model\.norm\.weight' has "
                                          r"shape \(17,\)"):
        NumpyModel.from_pretrained(folder)


def test_truncated_file(folder: Path) -> None:
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ConfigError, match="truncated"):
        NumpyModel.from_pretrained(folder)
    path.write_bytes(b"\x05\x00")
    with pytest.raises(ConfigError, match="truncated"):
        NumpyModel.from_pretrained(folder)


@pytest.mark.parametrize("header", [b"{not json", b"[1, 2]",
                                    b'{"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}',
                                    b'{"x": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 1]}}',
                                    b'{"x": {"shape": [1]}}'])
def test_corrupt_header(folder: Path, header: bytes) -> None:
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(64))
    with pytest.raises(ConfigError, match=r"model\.safetensors"):
        NumpyModel.from_pretrained(folder)


def test_huge_header_length(folder: Path) -> None:
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", 2**60) + b"{}")
    with pytest.raises(ConfigError, match="corrupt"):
        NumpyModel.from_pretrained(folder)


def test_index_errors(tmp_path: Path) -> None:
    folder = write_checkpoint(tmp_path, LLAMA, _model(LLAMA).state_dict(), "F32", num_shards=2)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.extra.weight"] = "model-00002-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(ConfigError, match="'model.extra.weight' is listed"):
        CheckpointReader(folder)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ConfigError, match="shard not found"):
        CheckpointReader(folder)
    index_path.write_text("{}")
    with pytest.raises(ConfigError, match="weight_map"):
        CheckpointReader(folder)


def test_opt_weights_are_refused(folder: Path) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type="opt", ffn_dim=24)
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="Llama family"):
        NumpyModel.from_pretrained(folder)
