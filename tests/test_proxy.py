"""Tiny proxies keep their target's structure; load_functional_model resolves names."""

from __future__ import annotations

import numpy as np
import pytest

from sim.core.errors import UnknownNameError
from sim.model.proxy import DEFAULT_PROXY_SEED, load_functional_model, tiny_proxy_config
from sim.model.tokenizer import ByteTokenizer
from sim.model.zoo import BUILTIN_HF_CONFIGS, resolve_model


@pytest.mark.parametrize("name", sorted(BUILTIN_HF_CONFIGS))
def test_proxy_keeps_structure(name: str) -> None:
    target = resolve_model(name)
    proxy = tiny_proxy_config(target)
    assert proxy.name == f"tiny-proxy({name})"
    assert proxy.is_llama_like and proxy.dtype == "float32"
    assert proxy.n_vocab == ByteTokenizer.vocab_size and proxy.eos_token_ids == (257,)
    assert proxy.n_embd == 64 and proxy.n_layer == 2 and proxy.d_head % 2 == 0
    assert proxy.tie_word_embeddings == target.tie_word_embeddings
    if target.is_llama_like:
        assert proxy.model_type == target.model_type
        assert proxy.qkv_bias == target.qkv_bias
        assert proxy.rope_scaling == target.rope_scaling
        if target.n_q_per_kv <= 16:
            assert proxy.n_q_per_kv == target.n_q_per_kv
    else:
        assert proxy.model_type == "llama" and proxy.n_q_per_kv == 1
    assert (proxy.sliding_window is None) == (target.sliding_window is None)
    if target.is_moe:
        assert proxy.n_expert == target.n_expert  # the real count: imbalance depends on it
        assert proxy.n_expert_per_tok == target.n_expert_per_tok
        assert bool(proxy.shared_expert_n_inner) == bool(target.shared_expert_n_inner)
        assert proxy.norm_topk_prob == target.norm_topk_prob


def test_mistral_window_scales_with_width() -> None:
    proxy = tiny_proxy_config(resolve_model("mistralai/Mistral-7B-v0.1"))
    assert proxy.sliding_window == 64  # 4096 * 64 / 4096


@pytest.mark.parametrize("name", ["meta-llama/Llama-2-7b-hf", "Qwen/Qwen1.5-MoE-A2.7B",
                                  "facebook/opt-13b"])
def test_load_functional_model_by_name(name: str) -> None:
    model, tok = load_functional_model(name)
    assert isinstance(tok, ByteTokenizer)
    assert model.config.name == f"tiny-proxy({name})" and model.dtype == np.float32
    again, _ = load_functional_model(name, seed=DEFAULT_PROXY_SEED)
    ids = tok.encode("Hello")
    np.testing.assert_array_equal(model.forward(ids), again.forward(ids))
    other, _ = load_functional_model(name, seed=1)
    assert not np.array_equal(model.forward(ids), other.forward(ids))


def test_unknown_name() -> None:
    with pytest.raises(UnknownNameError, match="Llama-2-7b-hf"):
        load_functional_model("meta-llama/Llama-2-7b-hff")
