"""Tokenizers: byte-level round trips and the tokenizer.json wrapper."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sim.core.errors import ConfigError
from sim.core.model_config import ModelConfig
from sim.model.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

TOK = ByteTokenizer()


@pytest.mark.parametrize("text", ["hello, world", "naïve café — ünïcödé", "日本語テキスト",
                                  "emoji 🙂👍🏽 flags 🇫🇷", "", "tab\tnew\nline\x00"])
def test_byte_round_trip(text: str) -> None:
    ids = TOK.encode(text)
    assert ids[0] == TOK.bos_token_id == 256
    assert ids[1:] == list(text.encode("utf-8"))
    assert TOK.decode(ids) == text
    assert TOK.encode(text, add_bos=False) == ids[1:]


@given(st.text())
def test_byte_round_trip_any_text(text: str) -> None:
    assert TOK.decode([*TOK.encode(text), TOK.eos_token_id]) == text


def test_specials_and_broken_utf8() -> None:
    assert TOK.vocab_size == 258 and TOK.eos_token_ids == (257,)
    ids = [256, *b"hi", 257]
    assert TOK.decode(ids, skip_special_tokens=False) == "<s>hi</s>"
    assert TOK.decode([*"🙂".encode()[:2], ord("a")]) == "\ufffda"
    assert TOK.decode([104, 300, 105]) == "h<|300|>i"
    with pytest.raises(ConfigError, match="non-negative"):
        TOK.decode([-1])


def _write_hf_tokenizer(folder: Path) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world", "the quick brown fox", "hello there"] * 5, trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": {"content": "</s>"}}))


def test_hf_tokenizer_wrapper(tmp_path: Path) -> None:
    _write_hf_tokenizer(tmp_path)
    config = ModelConfig(name="t", model_type="llama", n_layer=1, n_embd=8, n_head=2,
                         n_kv_head=2, d_head=4, n_inner=8, n_vocab=300,
                         max_position_embeddings=64, bos_token_id=5, eos_token_ids=(6, 1))
    tok = load_tokenizer(tmp_path, config)
    assert isinstance(tok, HFTokenizer)
    assert (tok.bos_token_id, tok.eos_token_id) == (0, 1)  # from tokenizer_config.json
    assert tok.eos_token_ids == (1, 6)
    ids = tok.encode("hello world 🙂")
    assert ids[0] == 0 and len(ids) < 1 + len("hello world 🙂".encode())  # merges happened
    assert tok.decode(ids) == "hello world 🙂"
    assert tok.decode([*ids, 1], skip_special_tokens=False).endswith("</s>")
    assert tok.encode("hello", add_bos=False)[0] != 0


def test_load_tokenizer_bytes_only_without_a_checkpoint_or_by_opt_in(tmp_path: Path) -> None:
    assert isinstance(load_tokenizer(None), ByteTokenizer)
    with pytest.raises(ConfigError, match=r"no tokenizer\.json.*--tokenizer byte"):
        load_tokenizer(tmp_path)  # a checkpoint folder without its tokenizer
    assert isinstance(load_tokenizer(tmp_path, tokenizer="byte"), ByteTokenizer)


def test_missing_tokenizers_package_is_explained(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "tokenizer.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ConfigError, match=r"pip install infersim\[tokenizers\]"):
        load_tokenizer(tmp_path)


def test_corrupt_tokenizer_json(tmp_path: Path) -> None:
    pytest.importorskip("tokenizers")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ConfigError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
