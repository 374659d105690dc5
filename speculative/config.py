"""`speculative_config`: what speculates, how many tokens, and how acceptance is decided.

vLLM's keys: `method` (`"draft_model"` or `"ngram"`), `model` (the draft, a name or a local
folder), `num_speculative_tokens` (k), `prompt_lookup_min` / `prompt_lookup_max` (n-gram sizes).
Ours:

- the functional draft as a *controlled proxy* of the target, so acceptance emerges from real
  math and can be dialled: `draft_noise_scale` (the target's weights plus seeded Gaussian noise of
  that relative scale, `draft_seed`) and/or `draft_num_layers` (the target's first layers with
  its final norm and head). Without either, the draft runs `model`'s own functional weights (its
  tiny proxy or checkpoint; it must share the target's vocabulary). `model` is always the shape
  the draft is *priced* as on the same GPU (default: the target truncated to
  `draft_num_layers`, or the target itself);
- timing-only acceptance: `acceptance_rate` (each draft token accepted i.i.d. with this
  probability, seeded per request) or `acceptance_trace` (a JSON trace from
  `speculative.acceptance`, replayed per request);
- `adaptive`: choose k each step from the measured acceptance (`speculative.analysis`), up to
  `num_speculative_tokens`;
- `draft_tensor_parallel_size` (vLLM's name): with tensor parallelism, the draft runs sharded
  over the whole TP group (the default, as vLLM: its all-reduces priced like the target's) or
  whole on one rank (1: no collectives, but that rank holds all of the draft's weights and KV,
  so its KV pool binds the group's).

The draft model's weights and its KV for every cached token are taken out of the KV pool
(`draft_model_shape` is the shape both the memory plan and the pricer use); n-gram lookup
needs neither.

References: vLLM `vllm/config/speculative.py` (SpeculativeConfig keys); Leviathan et al. 2023.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

from sim.core.errors import ConfigError, suggest
from sim.core.model_config import ModelConfig

#: the one list of `speculative_config` methods (`EngineArgs` validates through this config)
METHODS = ("draft_model", "ngram")


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str = "draft_model"
    num_speculative_tokens: int = 4
    model: str | None = None
    prompt_lookup_min: int = 1
    prompt_lookup_max: int = 3
    draft_noise_scale: float | None = None
    draft_num_layers: int | None = None
    draft_seed: int = 0
    acceptance_rate: float | None = None
    acceptance_trace: str | None = None
    adaptive: bool = False
    tree: tuple[int, ...] | None = None  # branching factors of a token tree (speculative.tree)
    draft_tensor_parallel_size: int | None = None  # None: the target's TP degree (as vLLM)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"speculative_config method={self.method!r} is not one of "
                              f"{', '.join(METHODS)}")
        if not isinstance(self.num_speculative_tokens, int) or self.num_speculative_tokens < 1:
            raise ConfigError("speculative_config num_speculative_tokens must be an int >= 1, "
                              f"got {self.num_speculative_tokens!r}")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ConfigError("speculative_config needs 1 <= prompt_lookup_min <= "
                              f"prompt_lookup_max, got {self.prompt_lookup_min}, "
                              f"{self.prompt_lookup_max}")
        noise = self.draft_noise_scale
        if noise is not None and not (noise >= 0 and math.isfinite(noise)):
            raise ConfigError(f"draft_noise_scale must be a finite number >= 0, got {noise}")
        if self.draft_num_layers is not None and self.draft_num_layers < 1:
            raise ConfigError(f"draft_num_layers must be >= 1, got {self.draft_num_layers}")
        dtp = self.draft_tensor_parallel_size
        if dtp is not None and (not isinstance(dtp, int) or isinstance(dtp, bool) or dtp < 1):
            raise ConfigError("speculative_config draft_tensor_parallel_size must be an int >= 1 "
                              f"(1: the draft on one rank; the target's tensor_parallel_size: "
                              f"sharded like it), got {dtp!r}")
        if self.tree is not None:
            from speculative.tree import TreeShape

            object.__setattr__(self, "tree", TreeShape(tuple(self.tree)).branching)
            if self.method != "draft_model" or self.adaptive:
                raise ConfigError("a token tree ('tree') needs method='draft_model' and no "
                                  "adaptive k")
            if self.acceptance_rate is not None or self.acceptance_trace is not None:
                raise ConfigError("a token tree is verified from real drafts: tree speculation "
                                  "runs in mode='functional' (drop acceptance_rate / trace)")
        rate = self.acceptance_rate
        if rate is not None and not 0 <= rate <= 1:
            raise ConfigError(f"acceptance_rate must be in [0, 1], got {rate}")
        if rate is not None and self.acceptance_trace is not None:
            raise ConfigError("give acceptance_rate or acceptance_trace, not both")
        if self.method == "ngram" and (self.model is not None or noise is not None
                                       or self.draft_num_layers is not None
                                       or dtp is not None):
            raise ConfigError("method='ngram' uses no draft model: drop model / "
                              "draft_noise_scale / draft_num_layers / "
                              "draft_tensor_parallel_size")

    @classmethod
    def from_any(cls, value: SpeculativeConfig | dict[str, Any] | str) -> SpeculativeConfig:
        """From a config, a dict of vLLM-style keys, or a JSON object string (the CLI flag)."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"--speculative-config is not valid JSON: {exc}") from exc
        if not isinstance(value, dict):
            raise ConfigError("speculative_config must be a dict (or a JSON object), got "
                              f"{type(value).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        for key in value:
            if key not in known:
                raise ConfigError(str(suggest(key, known, "speculative_config key")))
        return cls(**value)

    @property
    def controlled_proxy(self) -> bool:
        """Whether the functional draft is derived from the target's own weights."""
        return self.draft_noise_scale is not None or self.draft_num_layers is not None

    def describe(self) -> str:
        parts = [self.method, f"k={self.num_speculative_tokens}"]
        if self.method == "ngram":
            parts.append(f"n={self.prompt_lookup_min}..{self.prompt_lookup_max}")
        if self.model is not None:
            parts.append(f"draft {self.model}")
        if self.draft_num_layers is not None:
            parts.append(f"target[:{self.draft_num_layers} layers]")
        if self.draft_noise_scale is not None:
            parts.append(f"noise {self.draft_noise_scale:g}")
        if self.acceptance_rate is not None:
            parts.append(f"acceptance {self.acceptance_rate:g} i.i.d.")
        if self.acceptance_trace is not None:
            parts.append(f"acceptance trace {self.acceptance_trace}")
        if self.adaptive:
            parts.append("adaptive k")
        if self.draft_tensor_parallel_size is not None:
            parts.append(f"draft TP={self.draft_tensor_parallel_size}")
        if self.tree is not None:
            parts[1] = f"tree {list(self.tree)}"
        return ", ".join(parts)


def draft_model_shape(cfg: SpeculativeConfig, target: ModelConfig) -> ModelConfig | None:
    """The shape the draft is priced and sized as: `model`'s, else the target truncated to
    `draft_num_layers`, else the target itself; None for n-gram lookup (no draft model)."""
    if cfg.method != "draft_model":
        return None
    if cfg.model is not None:
        from sim.model.zoo import resolve_model

        return resolve_model(cfg.model)
    if cfg.draft_num_layers is not None:
        if cfg.draft_num_layers > target.n_layer:
            raise ConfigError(f"draft_num_layers={cfg.draft_num_layers} exceeds the target's "
                              f"{target.n_layer} layers; use at most {target.n_layer}")
        return target.replace(n_layer=cfg.draft_num_layers,
                              name=f"{target.name}[:{cfg.draft_num_layers} layers]")
    return target


def draft_tp(cfg: SpeculativeConfig, tensor_parallel_size: int) -> int:
    """The draft's TP degree: `draft_tensor_parallel_size`, or the target's when not given."""
    return cfg.draft_tensor_parallel_size or tensor_parallel_size
