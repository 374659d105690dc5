"""Real-model safety: corrupt safetensors headers, non-finite weights, shapes that disagree with
config.json, and checkpoints without a tokenizer each get a ConfigError naming the file, the
tensor (where there is one) and the problem; never a raw traceback or a huge allocation."""

from __future__ import annotations

import json
import struct
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sim.core.errors import ConfigError
from sim.core.model_config import ModelConfig
from sim.engine.args import EngineArgs
from sim.model.checkpoint import SafetensorsFile
from sim.model.numpy_model import NumpyModel
from sim.model.proxy import load_functional_model
from sim.model.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer
from tests.checkpoints import write_checkpoint, write_safetensors

CONFIG = ModelConfig(name="t", model_type="llama", n_layer=1, n_embd=16, n_head=4, n_kv_head=2,
                     d_head=4, n_inner=24, n_vocab=300, max_position_embeddings=64)


def _state() -> dict[str, np.ndarray]:
    return dict(NumpyModel.random(CONFIG, seed=3, dtype="float64").state_dict())


def _raw_file(path: Path, header: dict[str, Any] | bytes, data: bytes) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _entry(dtype: str, shape: list[Any], offsets: list[Any]) -> dict[str, Any]:
    return {"w": {"dtype": dtype, "shape": shape, "data_offsets": offsets}}


# ---------------------------------------------------------------------------------- headers
@pytest.mark.parametrize("header,data,problem", [
    (_entry("F32", [-1], [0, 4]), bytes(4), r"tensor 'w'.*corrupt shape \[-1\]"),
    (_entry("F32", [2**62, 2**62], [0, 4]), bytes(4), r"tensor 'w'.*needs more bytes than"),
    (_entry("F32", [2**40], [0, 4]), bytes(4), r"tensor 'w'.*needs more bytes than"),
    (_entry("F32", [2**40], [0, 2**42]), bytes(4), r"tensor 'w'.*truncated file"),
    (_entry("F32", [4], [0, 16]), bytes(4), r"tensor 'w'.*truncated file"),
    (_entry("F32", [2], [0, 4]), bytes(8), r"tensor 'w'.*offsets 0\.\.4 hold 4 bytes"),
    (_entry("F32", [1], [4, 0]), bytes(4), r"tensor 'w'.*corrupt data_offsets \[4, 0\]"),
    (_entry("F32", [1.5], [0, 4]), bytes(4), r"tensor 'w'.*corrupt shape"),
    (_entry("F32", [True], [0, 4]), bytes(4), r"tensor 'w'.*corrupt shape"),
    (_entry("Q7", [1], [0, 1]), bytes(1), r"tensor 'w'.*unknown or unsupported dtype 'Q7'"),
    (_entry("F8_E4M3", [1], [0, 1]), bytes(1), r"tensor 'w'.*F8_E4M3 is not supported.*scales"),
    ({"w": {"shape": [1]}}, bytes(4), r"tensor 'w'.*needs 'dtype'"),
    ({"w": [1, 2]}, bytes(4), r"tensor 'w'.*corrupt header entry"),
    (b"{not json", bytes(8), r"not UTF-8 JSON"),
    (b"\xff\xfe{}", bytes(8), r"not UTF-8 JSON"),
    (b"[1, 2]", bytes(8), r"a JSON list, not an object"),
    # what only the library checks: a gap between tensors, bytes nobody owns
    (_entry("F32", [1], [4, 8]), bytes(8), r"corrupt safetensors file: .*invalid offset"),
    (_entry("F32", [1], [0, 4]), bytes(8), r"corrupt safetensors file: .*not fully covered"),
])
def test_corrupt_header_is_named(tmp_path: Path, header: Any, data: bytes, problem: str) -> None:
    path = _raw_file(tmp_path / "model.safetensors", header, data)
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError, match=problem) as info:
            SafetensorsFile(path)
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert str(path) in str(info.value)
    assert peak_bytes < 1 << 20  # refused before anything the header asks for is allocated


@pytest.mark.parametrize("content,problem", [
    (b"\x05\x00", r"truncated safetensors file \(2 bytes"),
    (struct.pack("<Q", 100) + b"{}", r"truncated file: the header claims 100 bytes"),
    (struct.pack("<Q", 2**60) + b"{}", r"corrupt header: the header claims"),
])
def test_truncated_or_huge_header_length(tmp_path: Path, content: bytes, problem: str) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=problem):
        SafetensorsFile(path)


def test_truncated_checkpoint_names_the_last_tensor(tmp_path: Path) -> None:
    folder = write_checkpoint(tmp_path, CONFIG, _state(), "F32")
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ConfigError, match=r"model\.safetensors: tensor '.*': truncated file"):
        NumpyModel.from_pretrained(folder)


def test_library_and_bf16_reads_agree(tmp_path: Path) -> None:
    """F32 through `safe_open`, BF16 through our exact widening: the same values back."""
    values = {"a": np.array([1.0, -2.0, 0.5, 3.0], np.float32), "b": np.arange(6.0).reshape(2, 3)}
    for dtype in ("F32", "BF16"):
        path = tmp_path / f"{dtype}.safetensors"
        write_safetensors(path, values, dtype)
        f = SafetensorsFile(path)
        assert f.keys() == ["a", "b"]
        for name, value in values.items():
            got = f.get(name)
            assert got.dtype == np.float32 and got.shape == value.shape
            np.testing.assert_array_equal(got, value)  # all exactly representable in bf16


# ---------------------------------------------------------------------------------- weights
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("name", ["model.layers.0.self_attn.k_proj.weight", "model.norm.weight"])
def test_non_finite_weights_are_refused(tmp_path: Path, bad: float, name: str) -> None:
    state = _state()
    state[name] = state[name].copy()
    state[name].reshape(-1)[3] = bad
    folder = write_checkpoint(tmp_path, CONFIG, state, "F32")
    with pytest.raises(ConfigError, match=rf"tensor '{name}' has 1 non-finite values") as info:
        NumpyModel.from_pretrained(folder)
    assert "model.safetensors" in str(info.value)


def test_overflow_into_the_load_dtype_is_refused(tmp_path: Path) -> None:
    state = _state()
    state["model.norm.weight"] = state["model.norm.weight"].copy()
    state["model.norm.weight"][0] = 1e39  # finite in F64, inf in float32
    folder = write_checkpoint(tmp_path, CONFIG, state, "F64")
    NumpyModel.from_pretrained(folder, dtype="float64")  # fits float64
    with pytest.raises(ConfigError, match=r"'model\.norm\.weight' has 1 non-finite.*overflowed"):
        NumpyModel.from_pretrained(folder, dtype="float32")


def test_random_and_in_memory_weights_are_checked_too() -> None:
    state = _state()
    state["model.embed_tokens.weight"] = np.full_like(state["model.embed_tokens.weight"], np.nan)
    with pytest.raises(ConfigError, match=r"'model\.embed_tokens\.weight' has 4800 non-finite"):
        NumpyModel.from_state_dict(CONFIG, state)


@pytest.mark.parametrize("name,shape,fields", [
    ("model.layers.0.self_attn.q_proj.weight", (12, 16),
     r"num_attention_heads=4 x head_dim=4, hidden_size=16"),
    ("model.layers.0.self_attn.v_proj.weight", (16, 16), r"num_key_value_heads=2 x head_dim=4"),
    ("model.layers.0.mlp.down_proj.weight", (16, 20), r"intermediate_size=24"),
    ("model.embed_tokens.weight", (299, 16), r"vocab_size=300"),
])
def test_shape_mismatch_names_both_shapes_and_the_fields(tmp_path: Path, name: str,
                                                         shape: tuple[int, ...], fields: str) -> None:
    state = _state()
    expected = state[name].shape
    state[name] = np.zeros(shape)
    folder = write_checkpoint(tmp_path, CONFIG, state, "F32")
    with pytest.raises(ConfigError) as info:
        NumpyModel.from_pretrained(folder)
    message = str(info.value)
    assert f"tensor {name!r} has shape {shape}, but config.json implies {expected}" in message
    assert __import__("re").search(fields, message), message


# ---------------------------------------------------------------------------------- tokenizer
def _hf_tokenizer(folder: Path, num_extra_tokens: int) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    extra = [f"<extra_{i}>" for i in range(num_extra_tokens)]
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<s>", "</s>", *extra],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world", "the quick brown fox jumps"] * 20, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))


def test_checkpoint_without_tokenizer_is_refused_unless_opted_in(tmp_path: Path) -> None:
    folder = write_checkpoint(tmp_path / "ckpt", CONFIG, _state(), "F32")
    with pytest.raises(ConfigError, match=r"no tokenizer\.json.*300-token vocabulary.*"
                                          r"--tokenizer byte"):
        load_functional_model(folder)
    _, tok = load_functional_model(folder, tokenizer="byte")
    assert isinstance(tok, ByteTokenizer)


def test_tokenizer_from_another_folder_and_a_foreign_one_refused(tmp_path: Path) -> None:
    folder = write_checkpoint(tmp_path / "ckpt", CONFIG, _state(), "F32")
    _hf_tokenizer(tmp_path / "tok", num_extra_tokens=0)
    for where in (tmp_path / "tok", tmp_path / "tok" / "tokenizer.json"):
        _, tok = load_functional_model(folder, tokenizer=str(where))
        assert isinstance(tok, HFTokenizer) and tok.vocab_size <= CONFIG.n_vocab
    with pytest.raises(ConfigError, match=r"tokenizer='.*nowhere'.*no tokenizer\.json"):
        load_functional_model(folder, tokenizer=str(tmp_path / "nowhere"))
    _hf_tokenizer(tmp_path / "big", num_extra_tokens=100)  # more tokens than the model's 300
    with pytest.raises(ConfigError, match=r"the tokenizer has \d+ tokens but the model's "
                                          r"vocabulary \(vocab_size\) is 300"):
        load_tokenizer(tmp_path / "big", CONFIG)


def test_engine_args_and_llm_carry_the_opt_in(tmp_path: Path) -> None:
    from sim.engine.llm import LLM

    folder = write_checkpoint(tmp_path / "ckpt", CONFIG, _state(), "F32")
    with pytest.raises(ConfigError, match=r"no tokenizer\.json"):
        LLM(model=str(folder))
    llm = LLM(model=str(folder), tokenizer="byte")
    assert isinstance(llm.get_tokenizer(), ByteTokenizer)
    with pytest.raises(ConfigError, match="tokenizer must be None, 'byte' or a path"):
        EngineArgs(tokenizer="")


def test_cli_flag_reaches_engine_args() -> None:
    from sim.cli.main import build_parser, engine_args_from

    ns = build_parser().parse_args(["simulate", "--tokenizer", "byte"])
    assert engine_args_from(ns).tokenizer == "byte"


def test_gguf_without_tokenizer_is_refused_unless_opted_in(tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    from sim.model.real_models import load_gguf_model
    from tests.test_gguf import f32_state, tiny_config, write_gguf

    c = tiny_config()
    path = write_gguf(tmp_path / "notok.gguf", c, f32_state(c), tokenizer=False)
    with pytest.raises(ConfigError, match=r"notok\.gguf: the GGUF metadata has no tokenizer"):
        load_gguf_model(path)
    _, tok = load_gguf_model(path, tokenizer="byte")
    assert isinstance(tok, ByteTokenizer)


def test_gguf_non_finite_weight_is_named(tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    from sim.model.real_models import load_gguf_model
    from tests.test_gguf import f32_state, tiny_config, write_gguf

    c = tiny_config()
    state = f32_state(c)
    state["model.layers.1.mlp.up_proj.weight"][2, 5] = np.nan
    path = write_gguf(tmp_path / "nan.gguf", c, state)
    with pytest.raises(ConfigError, match=r"nan\.gguf \(tensor blk\.1\.ffn_up\.weight\): tensor "
                                          r"'model\.layers\.1\.mlp\.up_proj\.weight' has 1 "
                                          r"non-finite values .*index \(2, 5\)"):
        load_gguf_model(path)
