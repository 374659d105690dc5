"""Parity with Hugging Face transformers: logits of `NumpyModel` vs the PyTorch reference.

Tiny random checkpoints are written by transformers itself (`save_pretrained`) for each family
(Llama with biases, llama3 and linear RoPE scaling, tied embeddings; Mistral with a small
sliding window; Qwen2; Mixtral; Qwen2-MoE with a shared expert and a dense layer), plus a
sharded BF16 checkpoint and the fused 3-D MoE expert layout transformers 5 holds in memory.

float32 compares transformers' own code path (measured max |diff| 1e-6..4e-6; asserted 5e-5).
For float64, transformers computes RMSNorm, RoPE and the MoE router softmax in float32 even in a
float64 model, so those modules are patched to stay in float64 (their math unchanged) and the
NumPy model is given transformers' float32 `inv_freq`; everything else agrees to ~1e-14
(asserted 1e-11).

Skipped unless torch and transformers are installed (they are not project dependencies).
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from sim.model.numpy_model import NumpyModel  # noqa: E402
from sim.model.reference import generate  # noqa: E402

F = torch.nn.functional
N_VOCAB = 97
SEQ_LEN = 24

BASE: dict[str, Any] = {
    "vocab_size": N_VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
}
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}

FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama_bias": ("LlamaConfig", {**BASE, "attention_bias": True, "mlp_bias": True}),
    "llama_mha": ("LlamaConfig", {**BASE, "num_key_value_heads": 4}),
    "llama_mqa": ("LlamaConfig", {**BASE, "num_key_value_heads": 1}),
    "llama_tied": ("LlamaConfig", {**BASE, "tie_word_embeddings": True}),
    "llama3_rope": ("LlamaConfig", {**BASE, "rope_parameters": LLAMA3_ROPE}),
    "linear_rope": ("LlamaConfig", {**BASE, "rope_parameters": {
        "rope_type": "linear", "rope_theta": 500.0, "factor": 4.0}}),
    "mistral_window": ("MistralConfig", {**BASE, "sliding_window": 5}),
    "qwen2": ("Qwen2Config", {**BASE, "tie_word_embeddings": True}),
    "qwen2_window": ("Qwen2Config", {**BASE, "use_sliding_window": True, "sliding_window": 5,
                                     "max_window_layers": 1}),  # layer 1 slides, layer 0 not
    "mixtral": ("MixtralConfig", {**BASE, "num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen2_moe": ("Qwen2MoeConfig", {
        **BASE, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 48, "norm_topk_prob": False,
        "mlp_only_layers": [1]}),
    "qwen2_moe_window": ("Qwen2MoeConfig", {
        **BASE, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 48, "use_sliding_window": True, "sliding_window": 5,
        "max_window_layers": 2}),  # layer 0 slides, layer 1 not
    "qwen2_moe_norm": ("Qwen2MoeConfig", {
        **BASE, "num_experts": 4, "num_experts_per_tok": 3, "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 48, "norm_topk_prob": True}),
}


def _hf_model(family: str, seed: int = 0) -> Any:
    """A transformers model with weights large enough that logits are far from flat."""
    config_cls, kwargs = FAMILIES[family]
    config = getattr(transformers, config_cls)(**kwargs)
    torch.manual_seed(seed)
    # "eager" experts: the per-expert loop (the grouped-GEMM kernel refuses float64)
    model = transformers.AutoModelForCausalLM.from_config(config, experts_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn_like(p))
            elif "embed_tokens" in name:
                p.copy_(torch.randn_like(p) * (0.25 if config.tie_word_embeddings else 1.0))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    return model.eval()


def _hf_logits(model: Any, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model(torch.as_tensor(ids)[None], use_cache=False)
    return out.logits[0].numpy()


def _stay_float64(model: Any) -> None:
    """Make transformers' float32 islands (RMSNorm, RoPE, router softmax) compute in float64."""
    def rms_forward(self: Any, x: Any) -> Any:
        variance = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.variance_epsilon))

    def rope_forward(self: Any, x: Any, position_ids: Any) -> Any:
        freqs = position_ids[..., None].double() * self.inv_freq.double()
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (
            emb.sin() * self.attention_scaling).to(x.dtype)

    def router_forward(self: Any, hidden: Any) -> Any:
        hidden = hidden.reshape(-1, self.hidden_dim)
        logits = F.linear(hidden, self.weight)
        top, idx = torch.topk(F.softmax(logits, dim=-1), self.top_k, dim=-1)
        if getattr(self, "norm_topk_prob", True):
            top = top / top.sum(dim=-1, keepdim=True)
        return logits, top, idx

    for module in model.modules():
        name = type(module).__name__
        if name.endswith("RMSNorm"):
            module.forward = types.MethodType(rms_forward, module)
        elif name.endswith("RotaryEmbedding"):
            module.forward = types.MethodType(rope_forward, module)
        elif name.endswith("TopKRouter"):
            module.forward = types.MethodType(router_forward, module)


def _ids(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, N_VOCAB, SEQ_LEN)  # [SEQ_LEN]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_float32_logits_match_transformers(family: str, tmp_path: Path) -> None:
    hf = _hf_model(family)
    hf.save_pretrained(tmp_path)
    ours = NumpyModel.from_pretrained(tmp_path, dtype="float32")
    ids = _ids()
    expected = _hf_logits(hf, ids)
    got = ours.forward(ids)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=5e-5, rtol=0)
    assert (got.argmax(-1) == expected.argmax(-1)).all()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_float64_logits_match_transformers(family: str, tmp_path: Path) -> None:
    hf = _hf_model(family)
    hf.save_pretrained(tmp_path)
    hf = hf.double()
    _stay_float64(hf)
    ours = NumpyModel.from_pretrained(tmp_path, dtype="float64")
    ours.inv_freq = hf.model.rotary_emb.inv_freq.double().numpy()  # transformers' float32 values
    ids = _ids()
    np.testing.assert_allclose(ours.forward(ids), _hf_logits(hf, ids), atol=1e-11, rtol=0)


def test_float64_rope_frequencies_match_transformers() -> None:
    """The float64 formula for inv_freq (default, linear, llama3) agrees with transformers'
    float32 one to float32 precision."""
    for family in ("llama_bias", "llama3_rope", "linear_rope"):
        hf = _hf_model(family)
        ours = NumpyModel.from_state_dict(
            _config_of(hf), _state_of(hf), "float64")
        expected = hf.model.rotary_emb.inv_freq.double().numpy()
        np.testing.assert_allclose(ours.inv_freq, expected, rtol=1e-6)


def _config_of(hf: Any) -> Any:
    from sim.core.model_config import ModelConfig
    return ModelConfig.from_hf_config(hf.config.to_dict(), name="hf")


def _state_of(hf: Any) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in hf.state_dict().items()}


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_fused_expert_layout_loads(family: str) -> None:
    """transformers 5 keeps experts fused in memory (`mlp.experts.gate_up_proj`)."""
    hf = _hf_model(family)
    state = _state_of(hf)
    assert any(k.endswith("experts.gate_up_proj") for k in state)
    ours = NumpyModel.from_state_dict(_config_of(hf), state, "float32")
    ids = _ids()
    np.testing.assert_allclose(ours.forward(ids), _hf_logits(hf, ids), atol=1e-4, rtol=0)


def test_sharded_bf16_checkpoint(tmp_path: Path) -> None:
    hf = _hf_model("llama_bias").to(torch.bfloat16)
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    # reload in float32 (bf16 -> f32 is exact, as the NumPy reader widens it); `.float()` would
    # keep the RoPE buffer rounded to bf16 by `.to(bfloat16)`
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    ours = NumpyModel.from_pretrained(tmp_path, dtype="float32")
    ids = _ids()
    np.testing.assert_allclose(ours.forward(ids), _hf_logits(hf, ids), atol=1e-4, rtol=0)


def test_greedy_generate_matches_transformers(tmp_path: Path) -> None:
    hf = _hf_model("mistral_window")
    hf.save_pretrained(tmp_path)
    hf = hf.double()
    _stay_float64(hf)
    ours = NumpyModel.from_pretrained(tmp_path, dtype="float64")
    ours.inv_freq = hf.model.rotary_emb.inv_freq.double().numpy()
    prompt = _ids()[:6]
    with torch.no_grad():
        out = hf.generate(torch.as_tensor(prompt)[None], max_new_tokens=12, do_sample=False,
                          min_new_tokens=12, pad_token_id=0)
    expected = out[0, len(prompt):].tolist()
    assert generate(ours, prompt, 12) == expected
