"""Model shapes: `ModelConfig`, read from a Hugging Face `config.json`.

Covers the Llama family as transformers defines it: Llama 2/3 (GQA, llama3 RoPE scaling),
Mistral (sliding-window attention), Qwen2 (q/k/v bias), Mixtral (top-k MoE) and Qwen2-MoE
(top-k MoE plus a gated shared expert). OPT is understood as a shape (for pricing and memory)
only. `sim.core.hf_config` reads both transformers 4 and 5 spellings of config.json.

Parameter counts follow the module lists of transformers' modeling files, so
`num_params()` of `meta-llama/Llama-2-7b-hf` is 6,738,415,616 as its safetensors index says.

References: Touvron et al. 2023 (Llama 2); Jiang et al. 2023 (Mistral 7B), 2024 (Mixtral);
Qwen Team 2024 (Qwen1.5-MoE); Zhang et al. 2022 (OPT); Hugging Face transformers configs.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sim.core.dtypes import canonical_dtype, dtype_bytes
from sim.core.errors import ConfigError

# model_type -> family traits that transformers hard-codes in the modeling file (not in config.json)
LLAMA_LIKE = ("llama", "mistral", "qwen2", "mixtral", "qwen2_moe")
SUPPORTED_MODEL_TYPES = (*LLAMA_LIKE, "opt")


#: plausibility bounds of a shape: the largest released models have ~130 layers, hidden sizes
#: of ~25k, 128 heads, vocabularies of ~260k and contexts of ~10M tokens, so a value past these
#: (by one or more orders of magnitude) is a unit or typing mistake, refused by name before any
#: size derived from it is computed
SHAPE_BOUNDS: dict[str, tuple[int, str]] = {
    "n_layer": (4096, "num_hidden_layers"),
    "n_embd": (2**20, "hidden_size"),
    "n_head": (2**16, "num_attention_heads"),
    "n_kv_head": (2**16, "num_key_value_heads"),
    "d_head": (2**16, "head_dim"),
    "n_vocab": (2**24, "vocab_size"),
    "max_position_embeddings": (2**31 - 1, "max_position_embeddings"),
    "n_inner": (2**22, "intermediate_size"),
    "moe_n_inner": (2**22, "moe_intermediate_size"),
    "shared_expert_n_inner": (2**22, "shared_expert_intermediate_size"),
    "n_expert": (2**16, "num_local_experts / num_experts"),
    "n_expert_per_tok": (2**16, "num_experts_per_tok"),
    "decoder_sparse_step": (4096, "decoder_sparse_step"),
}
#: more parameters than this (1e14: 100x the largest dense models) is a shape mistake
MAX_NUM_PARAMS = 10**14


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a decoder-only transformer, with GPT-2-code dimension names.

    `n_inner` is the dense MLP width; `moe_n_inner` the width of one routed expert and
    `shared_expert_n_inner` that of Qwen-MoE's always-on shared expert (0 = none).
    """

    name: str
    model_type: str
    n_layer: int
    n_embd: int
    n_head: int
    n_kv_head: int
    d_head: int
    n_inner: int
    n_vocab: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = field(default=None, hash=False)
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    # mixture of experts (n_expert == 0: dense)
    n_expert: int = 0
    n_expert_per_tok: int = 0
    moe_n_inner: int = 0
    shared_expert_n_inner: int = 0
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    # traits of non-Llama shapes (OPT), used for pricing and memory only
    gated_mlp: bool = True
    hidden_act: str = "silu"
    norm_kind: str = "rmsnorm"
    learned_pos_embd: bool = False
    dtype: str = "bfloat16"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        where = f"model config {self.name!r}"
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{where}: model_type {self.model_type!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        for key in ("n_layer", "n_embd", "n_head", "n_kv_head", "d_head", "n_vocab",
                    "max_position_embeddings"):
            value = getattr(self, key)
            if not _is_int(value) or value <= 0:
                raise ConfigError(f"{where}: {key} ({SHAPE_BOUNDS[key][1]}) must be a positive "
                                  f"integer, got {value!r}")
        for key in ("n_inner", "n_expert", "n_expert_per_tok", "moe_n_inner",
                    "shared_expert_n_inner", "decoder_sparse_step"):
            value = getattr(self, key)
            if not _is_int(value) or value < 0:
                raise ConfigError(f"{where}: {key} ({SHAPE_BOUNDS[key][1]}) must be an integer "
                                  f">= 0, got {value!r}")
        for key, (high, hf_name) in SHAPE_BOUNDS.items():
            value = getattr(self, key)
            if value > high:
                raise ConfigError(
                    f"{where}: {hf_name} = {value:,} is past any real model (at most {high:,} "
                    "here); check for a typo or a value in the wrong field")
        if self.decoder_sparse_step < 1:
            raise ConfigError(f"{where}: decoder_sparse_step must be >= 1, got "
                              f"{self.decoder_sparse_step}")
        if self.n_head % self.n_kv_head:
            raise ConfigError(
                f"{where}: n_head ({self.n_head}) must be a multiple of n_kv_head "
                f"({self.n_kv_head}) for grouped-query attention"
            )
        if self.model_type in LLAMA_LIKE and self.d_head % 2:
            raise ConfigError(f"{where}: head_dim = {self.d_head} must be even: RoPE rotates "
                              "pairs of dimensions (Su et al. 2021)")
        for key in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, key)
            if (isinstance(value, bool) or not isinstance(value, int | float)
                    or not math.isfinite(value) or value <= 0):
                raise ConfigError(f"{where}: {key} must be a finite number > 0, got {value!r}")
        if self.sliding_window is not None and (not _is_int(self.sliding_window)
                                                or self.sliding_window <= 0):
            raise ConfigError(f"{where}: sliding_window must be a positive integer or null, "
                              f"got {self.sliding_window!r}")
        for name, ids in (("bos_token_id", () if self.bos_token_id is None
                           else (self.bos_token_id,)), ("eos_token_id", self.eos_token_ids)):
            bad = [t for t in ids if not _is_int(t) or not 0 <= t < self.n_vocab]
            if bad:
                raise ConfigError(f"{where}: {name} {bad[0]!r} must be a token id in "
                                  f"0..{self.n_vocab - 1} (vocab_size)")
        if self.n_expert:
            if not 0 < self.n_expert_per_tok <= self.n_expert:
                raise ConfigError(
                    f"{where}: n_expert_per_tok must be in 1..n_expert ({self.n_expert}), "
                    f"got {self.n_expert_per_tok}"
                )
            if self.moe_n_inner <= 0:
                raise ConfigError(f"{where}: an MoE model needs a positive moe_n_inner")
        elif self.n_inner <= 0:
            raise ConfigError(f"{where}: n_inner must be positive for a dense model")
        if any(not _is_int(i) for i in self.mlp_only_layers):
            raise ConfigError(f"{where}: mlp_only_layers must be layer indices, got "
                              f"{list(self.mlp_only_layers)[:8]}")
        num_params = self.num_params()  # closed form: instant at any layer count
        if num_params > MAX_NUM_PARAMS:
            raise ConfigError(
                f"{where}: {num_params:.3g} parameters is more than {MAX_NUM_PARAMS:.0e} (100x "
                "the largest models); check num_hidden_layers, hidden_size, intermediate_size "
                "and vocab_size for a typo")
        object.__setattr__(self, "dtype", canonical_dtype(self.dtype))

    # ------------------------------------------------------------------ shape facts
    @property
    def is_moe(self) -> bool:
        return self.n_expert > 0

    @property
    def is_llama_like(self) -> bool:
        """True when the NumPy model can run this shape (the Llama family)."""
        return self.model_type in LLAMA_LIKE

    @property
    def n_q_per_kv(self) -> int:
        """Query heads per KV head (1 = MHA, n_head = MQA)."""
        return self.n_head // self.n_kv_head

    def is_moe_layer(self, layer: int) -> bool:
        """Whether layer `layer` has routed experts (Qwen2-MoE's sparse-step rule)."""
        return (
            self.is_moe
            and layer not in self.mlp_only_layers
            and (layer + 1) % self.decoder_sparse_step == 0
        )

    @property
    def num_moe_layers(self) -> int:
        """Layers with routed experts, in closed form: every `decoder_sparse_step`-th layer
        less the `mlp_only_layers` among them (no loop over the layers)."""
        if not self.is_moe:
            return 0
        step = self.decoder_sparse_step
        dense = {i for i in self.mlp_only_layers if 0 <= i < self.n_layer and (i + 1) % step == 0}
        return self.n_layer // step - len(dense)

    # ------------------------------------------------------------------ parameter counts
    def attn_params_per_layer(self) -> int:
        q_dim, kv_dim = self.n_head * self.d_head, self.n_kv_head * self.d_head
        weights = self.n_embd * (q_dim + 2 * kv_dim) + q_dim * self.n_embd
        biases = (q_dim + 2 * kv_dim) * self.qkv_bias + self.n_embd * self.o_bias
        return weights + biases

    def dense_mlp_params(self, n_inner: int) -> int:
        n_mat = 3 if self.gated_mlp else 2
        biases = (n_inner * (n_mat - 1) + self.n_embd) * self.mlp_bias
        return n_mat * self.n_embd * n_inner + biases

    def moe_params_per_layer(self, active_only: bool = False) -> int:
        """Router + experts (+ shared expert and its sigmoid gate) of one MoE layer."""
        n_routed = self.n_expert_per_tok if active_only else self.n_expert
        total = self.n_embd * self.n_expert + n_routed * self.dense_mlp_params(self.moe_n_inner)
        if self.shared_expert_n_inner:
            total += self.dense_mlp_params(self.shared_expert_n_inner) + self.n_embd
        return total

    def norm_params(self) -> int:
        return self.n_embd * (2 if self.norm_kind == "layernorm" else 1)

    def num_params(self, active_only: bool = False) -> int:
        """Parameter count; `active_only` counts only the experts one token uses (MoE)."""
        per_layer_common = self.attn_params_per_layer() + 2 * self.norm_params()
        total = self.n_layer * per_layer_common
        n_moe = self.num_moe_layers  # closed form, as the sum over layers it replaces
        if n_moe:
            total += n_moe * self.moe_params_per_layer(active_only)
        total += (self.n_layer - n_moe) * self.dense_mlp_params(self.n_inner)
        total += self.n_vocab * self.n_embd  # token embedding
        if self.learned_pos_embd:
            total += (self.max_position_embeddings + 2) * self.n_embd  # OPT's offset of 2
        total += self.norm_params()  # final norm
        if not self.tie_word_embeddings:
            total += self.n_vocab * self.n_embd  # lm_head
        return total

    def weight_bytes(self, dtype: str | None = None) -> float:
        """Bytes of all weights stored in `dtype` (default: the checkpoint dtype)."""
        return self.num_params() * dtype_bytes(dtype or self.dtype)

    def kv_bytes_per_token(self, dtype: str | None = None) -> float:
        """KV-cache bytes one token occupies: 2 (K and V) x layers x KV heads x head dim x bytes."""
        return 2 * self.n_layer * self.n_kv_head * self.d_head * dtype_bytes(dtype or self.dtype)

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ Hugging Face config.json
    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], name: str = "") -> ModelConfig:
        """Build from the dict of a Hugging Face `config.json` (transformers 4 or 5 spelling)."""
        from sim.core.hf_config import model_config_from_hf

        return model_config_from_hf(cfg, name or str(cfg.get("_name_or_path", "") or "model"))

    @classmethod
    def from_json_file(cls, path: str | Path) -> ModelConfig:
        """Read a `config.json`; malformed files raise `ConfigError` naming the file."""
        path = Path(path)
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read a JSON model config: {exc}") from exc
        if not isinstance(cfg, dict):
            raise ConfigError(f"{path}: a model config must be a JSON object")
        try:
            from sim.core.hf_config import model_config_from_hf

            return model_config_from_hf(cfg, path.parent.name or str(path))
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from exc
