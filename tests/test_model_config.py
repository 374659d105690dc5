"""ModelConfig: Hugging Face config.json in both spellings, built-in shapes, counts, bad input."""

from __future__ import annotations

import json

import pytest

from sim.core.errors import ConfigError, InfersimError
from sim.core.model_config import ModelConfig
from sim.model.zoo import BUILTIN_HF_CONFIGS, builtin_names, resolve_model

# Parameter counts published with the checkpoints (safetensors index "total_size" / 2 bytes, or
# the model cards).
PUBLISHED_PARAMS = {
    "meta-llama/Llama-2-7b-hf": 6_738_415_616,
    "meta-llama/Llama-2-13b-hf": 13_015_864_320,
    "meta-llama/Llama-2-70b-hf": 68_976_648_192,
    "meta-llama/Meta-Llama-3-8B": 8_030_261_248,
    "mistralai/Mistral-7B-v0.1": 7_241_732_096,
    "mistralai/Mixtral-8x7B-v0.1": 46_702_792_704,
    "TinyLlama/TinyLlama-1.1B-Chat-v1.0": 1_100_048_384,
}


@pytest.mark.parametrize("name,count", PUBLISHED_PARAMS.items())
def test_parameter_counts_match_published(name, count):
    assert resolve_model(name).num_params() == count


def test_moe_active_params():
    mixtral = resolve_model("mistralai/Mixtral-8x7B-v0.1")
    assert mixtral.num_params(active_only=True) / 1e9 == pytest.approx(12.9, abs=0.05)
    qwen = resolve_model("Qwen/Qwen1.5-MoE-A2.7B")
    assert qwen.num_params(active_only=True) / 1e9 == pytest.approx(2.7, abs=0.05)  # "A2.7B"
    assert qwen.num_params() / 1e9 == pytest.approx(14.3, abs=0.05)


def test_kv_bytes_per_token_interview_numbers():
    llama7 = resolve_model("meta-llama/Llama-2-7b-chat-hf")
    assert llama7.kv_bytes_per_token("float16") == 2 * 32 * 32 * 128 * 2 == 524_288
    llama70 = resolve_model("meta-llama/Llama-2-70b-hf")  # GQA: 8 KV heads
    assert llama70.kv_bytes_per_token("fp16") == 2 * 80 * 8 * 128 * 2
    assert llama70.kv_bytes_per_token("fp8") == 2 * 80 * 8 * 128


def test_weight_bytes_per_dtype():
    llama7 = resolve_model("meta-llama/Llama-2-7b-hf")
    assert llama7.weight_bytes() == llama7.num_params() * 2  # checkpoint dtype float16
    assert llama7.weight_bytes("int4") == llama7.num_params() / 2


@pytest.mark.parametrize("name", builtin_names())
def test_every_builtin_resolves(name):
    cfg = resolve_model(name)
    assert cfg.num_params() > 0 and cfg.kv_bytes_per_token() > 0


def test_structure_of_families():
    assert resolve_model("mistralai/Mistral-7B-v0.1").sliding_window == 4096
    qwen2 = resolve_model("Qwen/Qwen2-0.5B")
    assert qwen2.qkv_bias and not qwen2.o_bias and qwen2.tie_word_embeddings
    qmoe = resolve_model("Qwen/Qwen1.5-MoE-A2.7B")
    assert qmoe.shared_expert_n_inner == 5632 and not qmoe.norm_topk_prob
    assert resolve_model("mistralai/Mixtral-8x7B-v0.1").norm_topk_prob
    assert not resolve_model("facebook/opt-13b").is_llama_like


def test_transformers_4_and_5_spellings_agree():
    tf4 = dict(BUILTIN_HF_CONFIGS["meta-llama/Meta-Llama-3-8B"])
    tf4["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    tf5 = {k: v for k, v in tf4.items() if k not in ("rope_theta", "rope_scaling", "torch_dtype")}
    tf5["rope_parameters"] = {"rope_theta": 500000.0, **tf4["rope_scaling"]}
    tf5["dtype"] = "bfloat16"
    a, b = ModelConfig.from_hf_config(tf4, "x"), ModelConfig.from_hf_config(tf5, "x")
    assert a == b
    assert a.rope_theta == 500000.0 and a.rope_scaling["rope_type"] == "llama3"


def test_old_rope_scaling_key_type():
    cfg = dict(BUILTIN_HF_CONFIGS["meta-llama/Llama-2-7b-hf"])
    cfg["rope_scaling"] = {"type": "linear", "factor": 2.0}
    assert ModelConfig.from_hf_config(cfg).rope_scaling == {"rope_type": "linear", "factor": 2.0}


def test_local_folder_resolves(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(BUILTIN_HF_CONFIGS["Qwen/Qwen2-0.5B"]))
    assert resolve_model(tmp_path).n_embd == 896


@pytest.mark.parametrize("mutation,match", [
    ({"num_hidden_layers": None}, "num_hidden_layers"),
    ({"num_attention_heads": 32, "num_key_value_heads": 5}, "multiple of n_kv_head"),
    ({"hidden_size": "4096"}, "hidden_size"),
    ({"model_type": "gpt2"}, "not supported"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"vocab_size": -1}, "n_vocab"),
])
def test_malformed_config_is_a_clear_error(tmp_path, mutation, match):
    cfg = {**BUILTIN_HF_CONFIGS["meta-llama/Llama-2-7b-hf"], **mutation}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=match) as info:
        ModelConfig.from_json_file(path)
    assert str(path) in str(info.value)


def test_not_json_names_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="config.json"):
        ModelConfig.from_json_file(path)


def test_unknown_model_suggests_close_names():
    with pytest.raises(InfersimError, match="Mistral-7B-v0.1"):
        resolve_model("mistralai/Mistral-7B")
