"""GGUF loading: tiny files written the way llama.cpp's converter writes them load back into the
same model (exact logits for F32 storage), for llama (tied and untied, q/k rows permuted),
qwen2 (biases, no permutation), Mixtral-style MoE (stacked experts), quantized tensors, Llama 3.1
`rope_freqs`; and the GGUF tokenizers (byte-level BPE and SentencePiece) rebuilt from metadata.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="GGUF tests need the 'gguf' package: pip install "
                           "'infersim[real]'")

from sim.core.errors import ConfigError  # noqa: E402
from sim.core.model_config import ModelConfig  # noqa: E402
from sim.model.gguf import GGUFFile, unpermute_rows  # noqa: E402
from sim.model.numpy_model import NumpyModel  # noqa: E402
from sim.model.real_models import load_gguf_model  # noqa: E402
from sim.model.weights import random_state_dict  # noqa: E402
from sim.model.zoo import resolve_model  # noqa: E402

Q = gguf.GGMLQuantizationType
N_VOCAB = 260


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (byte-level BPE vocabularies are spelled in it)."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(keep, chars, strict=True)}


def byte_vocab() -> tuple[list[str], list[str], list[int]]:
    byte_chars = bytes_to_unicode()
    tokens = [byte_chars[b] for b in range(256)] + ["Ġt", "he", "Ġthe", "<|endoftext|>"]
    return tokens, ["Ġ t", "h e", "Ġt he"], [1] * 259 + [3]


def tiny_config(model_type: str = "llama", **kw: Any) -> ModelConfig:
    base: dict[str, Any] = dict(name="tiny", model_type=model_type, n_layer=2, n_embd=32, n_head=4,
                                n_kv_head=2, d_head=8, n_inner=48, n_vocab=N_VOCAB,
                                max_position_embeddings=128, rms_norm_eps=1e-5,
                                rope_theta=10000.0)
    return ModelConfig(**{**base, **kw})


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's `permute` (the operation `unpermute_rows` undoes)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2)
            .reshape(w.shape))


def gguf_tensors(c: ModelConfig, state: dict[str, np.ndarray], arch: str) -> dict[str, np.ndarray]:
    """HF state dict -> llama.cpp names and layouts."""
    out = {"token_embd.weight": state["model.embed_tokens.weight"],
           "output_norm.weight": state["model.norm.weight"]}
    if "lm_head.weight" in state:
        out["output.weight"] = state["lm_head.weight"]
    for i in range(c.n_layer):
        p, b = f"model.layers.{i}", f"blk.{i}"
        out[f"{b}.attn_norm.weight"] = state[f"{p}.input_layernorm.weight"]
        out[f"{b}.ffn_norm.weight"] = state[f"{p}.post_attention_layernorm.weight"]
        for x in "qkv":
            for kind in ("weight", "bias"):
                name = f"{p}.self_attn.{x}_proj.{kind}"
                if name in state:
                    w = state[name]
                    if arch == "llama" and x in "qk":
                        w = llama_cpp_permute(w, c.n_head if x == "q" else c.n_kv_head)
                    out[f"{b}.attn_{x}.{kind}"] = w
        out[f"{b}.attn_output.weight"] = state[f"{p}.self_attn.o_proj.weight"]
        if c.is_moe:
            m = f"{p}.block_sparse_moe"
            out[f"{b}.ffn_gate_inp.weight"] = state[f"{m}.gate.weight"]
            for gname, hf in (("gate", "w1"), ("up", "w3"), ("down", "w2")):
                out[f"{b}.ffn_{gname}_exps.weight"] = np.stack(
                    [state[f"{m}.experts.{e}.{hf}.weight"] for e in range(c.n_expert)])
        else:
            for x in ("gate", "up", "down"):
                out[f"{b}.ffn_{x}.weight"] = state[f"{p}.mlp.{x}_proj.weight"]
    return out


def write_gguf(path: Path, c: ModelConfig, state: dict[str, np.ndarray], arch: str = "llama",
               quant: dict[str, Any] | None = None, rope_freqs: np.ndarray | None = None,
               tokenizer: bool = True) -> Path:
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in (("block_count", c.n_layer), ("context_length", c.max_position_embeddings),
                       ("embedding_length", c.n_embd),
                       ("feed_forward_length", c.n_inner or c.moe_n_inner),
                       ("attention.head_count", c.n_head),
                       ("attention.head_count_kv", c.n_kv_head)):
        w.add_uint32(f"{arch}.{key}", value)
    w.add_float32(f"{arch}.rope.freq_base", c.rope_theta)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", c.rms_norm_eps)
    if c.is_moe:
        w.add_uint32(f"{arch}.expert_count", c.n_expert)
        w.add_uint32(f"{arch}.expert_used_count", c.n_expert_per_tok)
    if tokenizer:
        tokens, merges, types = byte_vocab()
        w.add_tokenizer_model("gpt2")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_eos_token_id(N_VOCAB - 1)
        w.add_bos_token_id(N_VOCAB - 1)
        w.add_chat_template("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}"
                            "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    for name, arr in gguf_tensors(c, state, arch).items():
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        qtype = (quant or {}).get(name.split(".")[-2], None) if arr.ndim == 2 else None
        if qtype is None:
            w.add_tensor(name, arr)
        else:
            w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def f32_state(c: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    state = random_state_dict(c, np.random.default_rng(seed))
    return {k: v.astype(np.float32) for k, v in state.items()}


def ids(seed: int = 1, n: int = 12) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, N_VOCAB, n)  # [n]


@pytest.mark.parametrize("arch,config", [
    ("llama", tiny_config()),
    ("llama", tiny_config(tie_word_embeddings=True)),
    ("llama", tiny_config(n_kv_head=1)),
    ("qwen2", tiny_config("qwen2", qkv_bias=True)),
    ("llama", tiny_config("mixtral", n_inner=0, n_expert=4, n_expert_per_tok=2, moe_n_inner=16)),
])
def test_f32_file_loads_the_same_model(tmp_path, arch, config):
    state = f32_state(config)
    path = write_gguf(tmp_path / "m.gguf", config, state, arch)
    loaded, _ = load_gguf_model(path)
    expect = NumpyModel.from_state_dict(config, state)
    assert loaded.config.replace(name="tiny", dtype="bfloat16", eos_token_ids=(),
                                 bos_token_id=None) == config
    np.testing.assert_array_equal(loaded.forward(ids()), expect.forward(ids()))


def test_quantized_tensors_match_their_dequantized_weights(tmp_path):
    c = tiny_config()
    state = f32_state(c)
    quant = {"attn_q": Q.Q8_0, "attn_k": Q.Q4_0, "attn_v": Q.Q4_1, "ffn_up": Q.F16,
             "token_embd": Q.Q8_0}
    path = write_gguf(tmp_path / "q.gguf", c, state, quant=quant)
    loaded, _ = load_gguf_model(path, dtype="float64")
    hf_to_kind = {"q_proj": Q.Q8_0, "k_proj": Q.Q4_0, "v_proj": Q.Q4_1, "up_proj": Q.F16,
                  "embed_tokens": Q.Q8_0}
    expect_state = {}
    for name, w in state.items():  # quantization blocks run along rows: permuting rows commutes
        kind = next((q for key, q in hf_to_kind.items() if key in name), None)
        if kind is not None and w.ndim == 2:
            w = gguf.quants.dequantize(gguf.quants.quantize(w, kind), kind)
        expect_state[name] = w
    expect = NumpyModel.from_state_dict(c, expect_state, dtype="float64")
    np.testing.assert_allclose(loaded.forward(ids()), expect.forward(ids()), rtol=1e-12,
                               atol=1e-12)


def test_unpermute_inverts_llama_cpp_permute():
    w = np.arange(3 * 8 * 5).reshape(3 * 8, 5)  # [n_head * d_head, n_in]
    np.testing.assert_array_equal(unpermute_rows(llama_cpp_permute(w, 3), 3), w)
    b = np.arange(16)  # a bias
    np.testing.assert_array_equal(unpermute_rows(llama_cpp_permute(b, 2), 2), b)


def test_rope_freqs_divide_the_inverse_frequencies(tmp_path):
    c = tiny_config()
    divisors = np.array([1.0, 1.0, 2.0, 8.0])  # [d_head // 2]
    path = write_gguf(tmp_path / "r.gguf", c, f32_state(c), rope_freqs=divisors)
    loaded, _ = load_gguf_model(path, dtype="float64")
    base = NumpyModel.random(c, dtype="float64").inv_freq
    np.testing.assert_allclose(loaded.inv_freq, base / divisors)


def test_resolve_model_and_llm_accept_a_gguf_path(tmp_path):
    from sim import LLM, SamplingParams

    c = tiny_config()
    path = write_gguf(tmp_path / "tiny.gguf", c, f32_state(c))
    shape = resolve_model(str(path))
    assert (shape.n_layer, shape.n_vocab, shape.name) == (2, N_VOCAB, "tiny.gguf")
    llm = LLM(model=str(path), hardware="a100-sxm4-80gb")
    out = llm.generate(["the the"], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 5
    assert out[0].prompt_token_ids == [ord("t"), 257, 258]  # "t", "he", "Ġthe"
    chat = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=2))
    assert chat[0].prompt == "<user>hi<assistant>"


def test_byte_level_tokenizer_from_metadata(tmp_path):
    c = tiny_config()
    _, tok = load_gguf_model(write_gguf(tmp_path / "t.gguf", c, f32_state(c)))
    assert tok.encode("the the") == [ord("t"), 257, 258]
    assert tok.encode("a<|endoftext|>b") == [ord("a"), 259, ord("b")]  # special token kept whole
    text = "héllo, 世界! 42\n\tdef f(): pass"
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode([259, ord("a")]) == "a"  # control tokens skipped
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "<user>x<assistant>"


def test_sentencepiece_tokenizer_from_metadata():
    from sim.model.gguf_tokenizer import GGUFTokenizer

    pieces = ["▁", "h", "e", "l", "o", "w", "r", "d", "▁h", "ll", "▁he", "▁hell", "▁hello",
              "▁w", "or", "▁wor", "ld", "▁world"]
    tokens = ["<unk>", "<s>", "</s>", *[f"<0x{b:02X}>" for b in range(256)], *pieces]
    types = [2, 3, 3, *[6] * 256, *[1] * len(pieces)]
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.scores": [0.0] * 259 + [-float(i) for i in range(len(pieces))],
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.unknown_token_id": 0}
    tok = GGUFTokenizer(meta)
    vocab = {t: i for i, t in enumerate(tokens)}
    assert tok.encode("hello world") == [1, vocab["▁hello"], vocab["▁world"]]  # BOS by default
    assert tok.encode("hello", add_bos=False) == [vocab["▁hello"]]
    assert tok.encode("é", add_bos=False) == [vocab["▁"], 3 + 0xC3, 3 + 0xA9]  # byte fallback
    assert tok.decode(tok.encode("hello world, é")) == "hello world, é"


def test_gguf_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="no such GGUF file"):
        load_gguf_model(tmp_path / "missing.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ConfigError, match="not a readable GGUF"):
        GGUFFile(bad)
    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ConfigError, match="architecture 'gpt2' is not supported"):
        GGUFFile(tmp_path / "gpt2.gguf")
