"""The weights of a Llama-family model, in the layout the NumPy forward pass uses.

Matrices keep PyTorch's `[out, in]` layout. Per layer, q/k/v are stacked into one `w_qkv`
`[(n_head + 2 n_kv_head) d_head, n_embd]` and gate/up into one `w_gate_up` `[2 n_inner, n_embd]`
so each step runs one GEMM per projection group; MoE experts are stacked as transformers 5
holds them in memory (`w_gate_up` `[n_expert, 2 moe_n_inner, n_embd]`, `w_down`
`[n_expert, n_embd, moe_n_inner]`). `to_state_dict` gives back the checkpoint names as views.

Tensor names are transformers' checkpoint names. Both MoE layouts are accepted: per-expert
tensors (Mixtral `block_sparse_moe.experts.{e}.w1/w3/w2` = gate/up/down, Qwen2-MoE
`mlp.experts.{e}.gate_proj/up_proj/down_proj`) and the fused 3-D `mlp.experts.gate_up_proj` /
`mlp.experts.down_proj` (router `mlp.gate.weight` or `block_sparse_moe.gate.weight`).

References: Hugging Face transformers `modeling_llama.py`, `modeling_mixtral.py`,
`modeling_qwen2_moe.py` (module names and shapes).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from sim.core.errors import ConfigError
from sim.core.model_config import ModelConfig


class TensorSource(Protocol):
    """Named tensors: a checkpoint reader, or a dict of arrays (`DictSource`)."""

    #: where the config whose shapes the tensors must match comes from, for error messages
    config_origin: str

    def has(self, name: str) -> bool: ...
    def get(self, name: str) -> np.ndarray: ...
    def where(self, name: str | None = None) -> str: ...


class DictSource:
    """A `TensorSource` over an in-memory `{name: array}` dict."""

    config_origin = "the model config"

    def __init__(self, tensors: dict[str, np.ndarray], label: str = "state dict") -> None:
        self.tensors = tensors
        self.label = label

    def has(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str) -> np.ndarray:
        return self.tensors[name]

    def where(self, name: str | None = None) -> str:
        return self.label


@dataclass
class DenseMLPWeights:
    w_gate_up: np.ndarray  # [2 * n_inner, n_embd]
    w_down: np.ndarray  # [n_embd, n_inner]
    b_gate_up: np.ndarray | None = None  # [2 * n_inner]
    b_down: np.ndarray | None = None  # [n_embd]


@dataclass
class MoEWeights:
    w_router: np.ndarray  # [n_expert, n_embd]
    w_gate_up: np.ndarray  # [n_expert, 2 * moe_n_inner, n_embd]
    w_down: np.ndarray  # [n_expert, n_embd, moe_n_inner]
    shared: DenseMLPWeights | None = None
    w_shared_gate: np.ndarray | None = None  # [1, n_embd]


@dataclass
class LayerWeights:
    attn_norm: np.ndarray  # [n_embd]
    w_qkv: np.ndarray  # [(n_head + 2 n_kv_head) d_head, n_embd]
    w_o: np.ndarray  # [n_embd, n_head d_head]
    mlp_norm: np.ndarray  # [n_embd]
    mlp: DenseMLPWeights | MoEWeights
    b_qkv: np.ndarray | None = None  # [(n_head + 2 n_kv_head) d_head]
    b_o: np.ndarray | None = None  # [n_embd]


@dataclass
class ModelWeights:
    embed: np.ndarray  # [n_vocab, n_embd]
    layers: list[LayerWeights]
    final_norm: np.ndarray  # [n_embd]
    lm_head: np.ndarray  # [n_vocab, n_embd]; the same array as `embed` when tied


# ---------------------------------------------------------------------------------- names
def _moe_names(config: ModelConfig, i: int) -> tuple[str, tuple[str, str, str]]:
    if config.model_type == "mixtral":
        return f"model.layers.{i}.block_sparse_moe", ("w1", "w3", "w2")
    return f"model.layers.{i}.mlp", ("gate_proj", "up_proj", "down_proj")


def tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a transformers checkpoint of `config` (per-expert MoE layout), in order."""
    c = config
    q_dim, kv_dim = c.n_head * c.d_head, c.n_kv_head * c.d_head
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (c.n_vocab, c.n_embd)}

    def mlp(prefix: str, n_inner: int, names: tuple[str, str, str], bias: bool) -> None:
        gate, up, down = names
        shapes[f"{prefix}.{gate}.weight"] = (n_inner, c.n_embd)
        shapes[f"{prefix}.{up}.weight"] = (n_inner, c.n_embd)
        shapes[f"{prefix}.{down}.weight"] = (c.n_embd, n_inner)
        if bias:
            shapes[f"{prefix}.{gate}.bias"] = (n_inner,)
            shapes[f"{prefix}.{up}.bias"] = (n_inner,)
            shapes[f"{prefix}.{down}.bias"] = (c.n_embd,)

    for i in range(c.n_layer):
        p = f"model.layers.{i}"
        shapes[f"{p}.input_layernorm.weight"] = (c.n_embd,)
        for proj, dim in (("q_proj", q_dim), ("k_proj", kv_dim), ("v_proj", kv_dim)):
            shapes[f"{p}.self_attn.{proj}.weight"] = (dim, c.n_embd)
            if c.qkv_bias:
                shapes[f"{p}.self_attn.{proj}.bias"] = (dim,)
        shapes[f"{p}.self_attn.o_proj.weight"] = (c.n_embd, q_dim)
        if c.o_bias:
            shapes[f"{p}.self_attn.o_proj.bias"] = (c.n_embd,)
        shapes[f"{p}.post_attention_layernorm.weight"] = (c.n_embd,)
        if c.is_moe_layer(i):
            prefix, names = _moe_names(c, i)
            shapes[f"{prefix}.gate.weight"] = (c.n_expert, c.n_embd)
            for e in range(c.n_expert):
                mlp(f"{prefix}.experts.{e}", c.moe_n_inner, names, False)
            if c.shared_expert_n_inner:
                mlp(f"{prefix}.shared_expert", c.shared_expert_n_inner,
                    ("gate_proj", "up_proj", "down_proj"), False)
                shapes[f"{prefix}.shared_expert_gate.weight"] = (1, c.n_embd)
        else:
            mlp(f"{p}.mlp", c.n_inner, ("gate_proj", "up_proj", "down_proj"), c.mlp_bias)
    shapes["model.norm.weight"] = (c.n_embd,)
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.n_vocab, c.n_embd)
    return shapes


# ---------------------------------------------------------------------------------- loading
def _shape_reason(c: ModelConfig, name: str) -> str:
    """Which config fields set the expected shape of tensor `name`, for the shape-error message."""
    leaf = name.rsplit(".", 2)[-2] if name.count(".") >= 2 else name
    if "embed_tokens" in name or name.startswith("lm_head"):
        return f"vocab_size={c.n_vocab}, hidden_size={c.n_embd}"
    if leaf == "q_proj":
        return f"num_attention_heads={c.n_head} x head_dim={c.d_head}, hidden_size={c.n_embd}"
    if leaf in ("k_proj", "v_proj"):
        return f"num_key_value_heads={c.n_kv_head} x head_dim={c.d_head}, hidden_size={c.n_embd}"
    if leaf == "o_proj":
        return f"hidden_size={c.n_embd}, num_attention_heads={c.n_head} x head_dim={c.d_head}"
    if ".experts." in name or "shared_expert" in name:
        return (f"num_experts={c.n_expert}, moe_intermediate_size={c.moe_n_inner}, "
                f"shared_expert_intermediate_size={c.shared_expert_n_inner}, "
                f"hidden_size={c.n_embd}")
    if name.endswith(".gate.weight"):
        return f"num_experts={c.n_expert}, hidden_size={c.n_embd}"
    if leaf in ("gate_proj", "up_proj", "down_proj"):
        return f"intermediate_size={c.n_inner}, hidden_size={c.n_embd}"
    return f"hidden_size={c.n_embd}"


def _check_finite(arr: np.ndarray, name: str, source: TensorSource) -> None:
    """Refuse NaN/inf weights at load: they would run, and every logit after them is NaN (the
    greedy pick of an all-NaN row is token 0, so the output looks like `[0, 0, 0, ...]`)."""
    if np.isfinite(arr).all():
        return
    bad = ~np.isfinite(arr)  # arr.shape
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    raise ConfigError(f"{source.where(name)}: tensor {name!r} has {int(bad.sum())} non-finite "
                      f"values (NaN or inf; the first at index {first}: {arr[first]}); the "
                      "checkpoint is corrupt, or a value overflowed the load dtype")


def build_weights(config: ModelConfig, source: TensorSource, dtype: np.dtype) -> ModelWeights:
    """Read every tensor `config` needs from `source`, cast to `dtype`, check shapes."""
    c = config

    def fetch(name: str, shape: tuple[int, ...]) -> np.ndarray:
        """The tensor cast to `dtype`, refused unless its shape is `shape` and it is finite."""
        if not source.has(name):
            raise ConfigError(f"{source.where()}: missing tensor {name!r} (shape {shape}) "
                              f"needed by this {c.model_type} config")
        arr = source.get(name)
        if tuple(arr.shape) != shape:
            raise ConfigError(f"{source.where(name)}: tensor {name!r} has shape "
                              f"{tuple(arr.shape)}, but {source.config_origin} implies {shape} "
                              f"({_shape_reason(c, name)}); the weights and the config are not "
                              "of the same model")
        with np.errstate(over="ignore"):  # an overflow becomes inf, refused just below
            out = np.array(arr, dtype=dtype)  # shape: an owned copy in the model's dtype
        _check_finite(out, name, source)
        return out

    def stack(names: list[str], shapes: list[tuple[int, ...]]) -> np.ndarray:
        rows = sum(s[0] for s in shapes)
        out = np.empty((rows, *shapes[0][1:]), dtype=dtype)  # [sum(out), ...]
        at = 0
        for name, shape in zip(names, shapes, strict=True):
            out[at: at + shape[0]] = fetch(name, shape)
            at += shape[0]
        return out

    def vec(name: str, n: int) -> np.ndarray:
        return fetch(name, (n,))  # [n]

    def dense(prefix: str, n_inner: int, names: tuple[str, str, str], bias: bool
              ) -> DenseMLPWeights:
        gate, up, down = (f"{prefix}.{n}" for n in names)
        w_gate_up = stack([f"{gate}.weight", f"{up}.weight"], [(n_inner, c.n_embd)] * 2)
        w_down = fetch(f"{down}.weight", (c.n_embd, n_inner))  # [H, I]
        if not bias:
            return DenseMLPWeights(w_gate_up, w_down)
        b_gate_up = stack([f"{gate}.bias", f"{up}.bias"], [(n_inner,)] * 2)
        return DenseMLPWeights(w_gate_up, w_down, b_gate_up, vec(f"{down}.bias", c.n_embd))

    q_dim, kv_dim = c.n_head * c.d_head, c.n_kv_head * c.d_head
    layers = []
    for i in range(c.n_layer):
        p = f"model.layers.{i}"
        qkv = [f"{p}.self_attn.{n}_proj" for n in "qkv"]
        qkv_shapes: list[tuple[int, ...]] = [(q_dim, c.n_embd), (kv_dim, c.n_embd),
                                             (kv_dim, c.n_embd)]
        mlp: DenseMLPWeights | MoEWeights
        if c.is_moe_layer(i):
            mlp = _build_moe(c, i, source, fetch, dense, dtype)
        else:
            mlp = dense(f"{p}.mlp", c.n_inner, ("gate_proj", "up_proj", "down_proj"), c.mlp_bias)
        layers.append(LayerWeights(
            attn_norm=vec(f"{p}.input_layernorm.weight", c.n_embd),
            w_qkv=stack([f"{n}.weight" for n in qkv], qkv_shapes),
            w_o=fetch(f"{p}.self_attn.o_proj.weight", (c.n_embd, q_dim)),  # [n_embd, q_dim]
            mlp_norm=vec(f"{p}.post_attention_layernorm.weight", c.n_embd),
            mlp=mlp,
            b_qkv=stack([f"{n}.bias" for n in qkv], [(s[0],) for s in qkv_shapes])
            if c.qkv_bias else None,
            b_o=vec(f"{p}.self_attn.o_proj.bias", c.n_embd) if c.o_bias else None,
        ))
    embed = fetch("model.embed_tokens.weight", (c.n_vocab, c.n_embd))  # [n_vocab, n_embd]
    lm_head = embed if c.tie_word_embeddings else fetch(
        "lm_head.weight", (c.n_vocab, c.n_embd))  # [n_vocab, n_embd]
    return ModelWeights(embed, layers, vec("model.norm.weight", c.n_embd), lm_head)


def _build_moe(c: ModelConfig, i: int, source: TensorSource,
               fetch: Callable[[str, tuple[int, ...]], np.ndarray],
               dense: Callable[..., DenseMLPWeights], dtype: np.dtype) -> MoEWeights:
    prefixes = (f"model.layers.{i}.mlp", f"model.layers.{i}.block_sparse_moe")
    default_prefix, _ = _moe_names(c, i)
    prefix = next((p for p in prefixes if source.has(f"{p}.gate.weight")), default_prefix)
    w_router = fetch(f"{prefix}.gate.weight", (c.n_expert, c.n_embd))  # [n_expert, n_embd]
    inner, n_exp = c.moe_n_inner, c.n_expert
    fused = f"{prefix}.experts.gate_up_proj"
    if source.has(fused) or source.has(fused + ".weight"):
        suffix = "" if source.has(fused) else ".weight"
        w_gate_up = fetch(fused + suffix, (n_exp, 2 * inner, c.n_embd))  # [E, 2 I, H]
        w_down = fetch(f"{prefix}.experts.down_proj{suffix}", (n_exp, c.n_embd, inner))  # [E, H, I]
    else:
        e0 = f"{prefix}.experts.0"
        names = ("w1", "w3", "w2") if source.has(f"{e0}.w1.weight") else (
            "gate_proj", "up_proj", "down_proj") if source.has(f"{e0}.gate_proj.weight") else (
            _moe_names(c, i)[1])
        w_gate_up = np.empty((n_exp, 2 * inner, c.n_embd), dtype=dtype)  # [E, 2 I, H]
        w_down = np.empty((n_exp, c.n_embd, inner), dtype=dtype)  # [E, H, I]
        for e in range(n_exp):
            expert = dense(f"{prefix}.experts.{e}", inner, names, False)
            w_gate_up[e], w_down[e] = expert.w_gate_up, expert.w_down
    shared, w_shared_gate = None, None
    if c.shared_expert_n_inner:
        shared = dense(f"{prefix}.shared_expert", c.shared_expert_n_inner,
                       ("gate_proj", "up_proj", "down_proj"), False)
        w_shared_gate = fetch(f"{prefix}.shared_expert_gate.weight", (1, c.n_embd))  # [1, n_embd]
    return MoEWeights(w_router, w_gate_up, w_down, shared, w_shared_gate)


# ---------------------------------------------------------------------------------- export
def to_state_dict(config: ModelConfig, weights: ModelWeights) -> dict[str, np.ndarray]:
    """Checkpoint names -> arrays (views into `weights`), per-expert MoE layout."""
    c, out = config, {}
    q_dim, kv_dim = c.n_head * c.d_head, c.n_kv_head * c.d_head

    def dense(prefix: str, mlp: DenseMLPWeights, names: tuple[str, str, str]) -> None:
        n_inner = mlp.w_down.shape[1]
        gate, up, down = (f"{prefix}.{n}" for n in names)
        out[f"{gate}.weight"], out[f"{up}.weight"] = mlp.w_gate_up[:n_inner], mlp.w_gate_up[n_inner:]
        out[f"{down}.weight"] = mlp.w_down
        if mlp.b_gate_up is not None and mlp.b_down is not None:
            out[f"{gate}.bias"], out[f"{up}.bias"] = mlp.b_gate_up[:n_inner], mlp.b_gate_up[n_inner:]
            out[f"{down}.bias"] = mlp.b_down

    out["model.embed_tokens.weight"] = weights.embed
    splits = (q_dim, q_dim + kv_dim)
    for i, layer in enumerate(weights.layers):
        p = f"model.layers.{i}"
        out[f"{p}.input_layernorm.weight"] = layer.attn_norm
        for name, w in zip("qkv", np.split(layer.w_qkv, splits), strict=True):
            out[f"{p}.self_attn.{name}_proj.weight"] = w
        if layer.b_qkv is not None:
            for name, b in zip("qkv", np.split(layer.b_qkv, splits), strict=True):
                out[f"{p}.self_attn.{name}_proj.bias"] = b
        out[f"{p}.self_attn.o_proj.weight"] = layer.w_o
        if layer.b_o is not None:
            out[f"{p}.self_attn.o_proj.bias"] = layer.b_o
        out[f"{p}.post_attention_layernorm.weight"] = layer.mlp_norm
        if isinstance(layer.mlp, MoEWeights):
            prefix, names = _moe_names(c, i)
            out[f"{prefix}.gate.weight"] = layer.mlp.w_router
            for e in range(layer.mlp.w_gate_up.shape[0]):
                dense(f"{prefix}.experts.{e}",
                      DenseMLPWeights(layer.mlp.w_gate_up[e], layer.mlp.w_down[e]), names)
            if layer.mlp.shared is not None and layer.mlp.w_shared_gate is not None:
                dense(f"{prefix}.shared_expert", layer.mlp.shared,
                      ("gate_proj", "up_proj", "down_proj"))
                out[f"{prefix}.shared_expert_gate.weight"] = layer.mlp.w_shared_gate
        else:
            dense(f"{p}.mlp", layer.mlp, ("gate_proj", "up_proj", "down_proj"))
    out["model.norm.weight"] = weights.final_norm
    if not c.tie_word_embeddings:
        out["lm_head.weight"] = weights.lm_head
    return out


def random_state_dict(config: ModelConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Seeded float64 weights for `config`: linear std 1/sqrt(fan_in), norms ~1, biases ~0.1.

    The untied embedding has std 1; the output head (or a tied embedding) std 2/sqrt(n_embd),
    so logits have std ~2: next-token distributions that are neither flat nor one-hot.
    """
    out = {}
    for name, shape in tensor_shapes(config).items():
        draw = rng.standard_normal(shape)  # shape
        if name.endswith("norm.weight"):
            out[name] = 1.0 + 0.1 * draw
        elif name.endswith(".bias"):
            out[name] = 0.1 * draw
        elif name == "model.embed_tokens.weight" and not config.tie_word_embeddings:
            out[name] = draw
        elif name in ("lm_head.weight", "model.embed_tokens.weight"):
            out[name] = draw * (2.0 / np.sqrt(config.n_embd))
        else:
            out[name] = draw / np.sqrt(shape[-1])
    return out
