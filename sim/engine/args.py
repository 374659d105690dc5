"""Engine arguments, with vLLM's names wherever vLLM has one.

Ours: `hardware` (a profile name or TOML path), `mode` (`functional`: real NumPy tokens;
`timing`: token counts only, fast), `functional_model` (what computes tokens when it should
differ from `model`, the shape that is priced: by default a seeded tiny proxy of a built-in
shape, or the real weights of a local checkpoint folder), the contiguous KV baselines
(`contiguous_reservation`), KV eviction (`kv_eviction` with `kv_eviction_window` / `_sinks` /
`_heavy`), the request-level schedulers' waits and the data-parallel router.

Every choice-valued argument takes its choices from the package that implements them (`CHOICES`:
the registry's keys, or the tuple beside the implementation), so a policy added there is accepted
here and offered by the CLI without being listed twice.

References: vLLM `vllm/engine/arg_utils.py` (EngineArgs).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from batching import SCHEDULERS
from batching.policy import POLICIES as SCHEDULING_POLICIES
from cache import KV_CACHES
from cache.contiguous import RESERVATIONS as CONTIGUOUS_RESERVATIONS
from cache.kv_eviction import KV_EVICTION_POLICIES, KVEviction
from cache.paged import PREEMPTION_MODES
from parallel.data import ROUTERS as DATA_PARALLEL_ROUTERS
from sim.core.dtypes import canonical_dtype
from sim.core.errors import ConfigError, suggest
from sim.core.quantization import METHODS as QUANTIZATION_METHODS
from sim.core.quantization import QuantSpec
from sim.engine.compat import check_compatible
from sim.model.kv_quant import KV_CACHE_DTYPES
from sim.model.zoo import DEFAULT_MODEL
from sim.timing.hardware import DEFAULT_HARDWARE
from speculative.config import SpeculativeConfig

#: `mode=`: the engine implements both (`sim.engine.build` picks the executor: the NumPy model's
#: or the token-count-only one)
MODES = ("functional", "timing")
#: `dtype=`: vLLM's `--dtype` choices (`half` and `float` are the short names of
#: `sim.core.dtypes.ALIASES`) plus `float64`, which also runs the functional model in float64
DTYPE_CHOICES = ("auto", "float16", "bfloat16", "float32", "float64", "half", "float")

#: every choice-valued engine argument -> its choices, each declared once by what implements it.
#: The registry dicts are held, not copied: an entry added to one at run time is accepted too.
CHOICES: dict[str, Collection[str]] = {
    "mode": MODES,
    "dtype": DTYPE_CHOICES,
    "kv_cache": KV_CACHES,
    "contiguous_reservation": CONTIGUOUS_RESERVATIONS,
    "preemption_mode": PREEMPTION_MODES,
    "kv_cache_dtype": KV_CACHE_DTYPES,
    "kv_eviction": KV_EVICTION_POLICIES,
    "scheduler": SCHEDULERS,
    "scheduling_policy": SCHEDULING_POLICIES,
    "data_parallel_router": DATA_PARALLEL_ROUTERS,
    "quantization": QUANTIZATION_METHODS,
}
#: the choice-valued arguments whose default, None, turns the feature off
OPTIONAL_CHOICES = frozenset({"kv_eviction", "quantization"})


def check_choice(name: str, value: object) -> None:
    """Raise a `ConfigError` naming the argument, the value and its choices (and the closest
    ones) unless `value` is one of `CHOICES[name]` (or None where `OPTIONAL_CHOICES` allows)."""
    choices = CHOICES[name]
    optional = name in OPTIONAL_CHOICES
    if (value is None and optional) or (isinstance(value, str) and value in choices):
        return
    valid = ", ".join(choices) + (" (or None: off)" if optional else "")
    close = difflib.get_close_matches(str(value), list(choices), n=2, cutoff=0.6)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise ConfigError(f"{name}={value!r} is not one of {valid}{hint}")


@dataclass(frozen=True)
class EngineArgs:
    model: str = DEFAULT_MODEL
    hardware: str = DEFAULT_HARDWARE
    mode: str = "functional"
    kv_cache: str = "paged"
    scheduler: str = "continuous"
    dtype: str = "auto"
    kv_cache_dtype: str = "auto"
    seed: int = 0
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int = 1
    functional_model: str | None = None
    # model parallelism (the parallel issue; vLLM's names, plus the DP router, ours)
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    enable_expert_parallel: bool = False
    data_parallel_router: str = "round_robin"
    # how collectives run (vLLM's flags; parallel.collectives): CUDA graphs off (every collective
    # an eager launch) and vLLM's custom all-reduce off (NCCL for every message)
    enforce_eager: bool = False
    disable_custom_all_reduce: bool = False
    # KV cache (the cache issue): paged blocks, prefix caching, contiguous baselines, preemption
    block_size: int = 16
    enable_prefix_caching: bool = False
    contiguous_reservation: str = "max_len"
    preemption_mode: str = "recompute"
    swap_space: float = 4.0  # GiB of host memory for swapped-out KV blocks (vLLM's default)
    num_gpu_blocks_override: int | None = None  # KV pool size in blocks instead of the plan's
    # KV eviction (cache.kv_eviction.KV_EVICTION_POLICIES; None: off)
    kv_eviction: str | None = None
    kv_eviction_window: int = 1024  # recent tokens kept
    kv_eviction_sinks: int = 4  # StreamingLLM attention sinks
    kv_eviction_heavy: int = 0  # H2O heavy hitters kept
    # request-level batching: static launches when full or after max_wait_s; dynamic (Triton)
    # as soon as a preferred batch size can be formed or after max_queue_delay_s
    max_wait_s: float = 0.0
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_s: float = 0.05
    # continuous batching: chunked prefill (Sarathi-Serve) and the waiting-queue policy
    enable_chunked_prefill: bool = False
    long_prefill_token_threshold: int = 0
    max_num_partial_prefills: int = 1
    scheduling_policy: str = "fcfs"
    # continuous batching: keep this share of the KV pool free at admission (vLLM v0's watermark)
    kv_watermark: float = 0.01
    # admission control at arrival (None: off): queue limit, token bucket, SLO-aware rejection
    admission_max_waiting: int | None = None
    admission_rate_per_s: float | None = None
    admission_burst: int = 1
    admission_ttft_slo_s: float | None = None
    # weight / activation quantization (sim.core.quantization.METHODS; None: unquantized)
    quantization: str | None = None
    quantization_group_size: int = 128
    # speculative decoding (speculative/): vLLM's dict, e.g. {"method": "ngram",
    # "num_speculative_tokens": 4}; a dict or JSON string becomes a SpeculativeConfig
    speculative_config: Any = None

    def __post_init__(self) -> None:
        for name in CHOICES:
            check_choice(name, getattr(self, name))
        for name in ("enforce_eager", "disable_custom_all_reduce"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.speculative_config is not None:  # validates the method and its options
            object.__setattr__(self, "speculative_config",
                               SpeculativeConfig.from_any(self.speculative_config))
        if self.quantization is not None:  # validates the group size for the method
            QuantSpec(self.quantization, self.quantization_group_size)
        if self.block_size not in (1, 2, 4, 8, 16, 32, 64, 128, 256):
            raise ConfigError(f"block_size must be a power of two from 1 to 256, got "
                              f"{self.block_size}")
        if not (self.swap_space >= 0 and math.isfinite(self.swap_space)):
            raise ConfigError(f"swap_space must be >= 0 GiB, got {self.swap_space}")
        check_compatible(self)  # combinations of settings: the rules of sim.engine.compat
        for name in ("max_num_seqs", "tensor_parallel_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_model_len", "max_num_batched_tokens", "num_gpu_blocks_override"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be at least 1, got {value}")
        if not (0 < self.gpu_memory_utilization <= 1 and math.isfinite(self.gpu_memory_utilization)):
            raise ConfigError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if not 0 <= self.kv_watermark < 1:
            raise ConfigError(f"kv_watermark must be in [0, 1), got {self.kv_watermark}")
        if self.long_prefill_token_threshold < 0 or self.max_num_partial_prefills < 1:
            raise ConfigError("long_prefill_token_threshold must be >= 0 (0: no cap) and "
                              "max_num_partial_prefills >= 1")
        for name in ("max_wait_s", "max_queue_delay_s"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ConfigError(f"{name} must be a finite number of seconds >= 0, got {value}")
        if self.admission_max_waiting is not None and self.admission_max_waiting < 0:
            raise ConfigError(
                f"admission_max_waiting must be >= 0, got {self.admission_max_waiting}")
        for name in ("admission_rate_per_s", "admission_ttft_slo_s"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"{name} must be a positive finite number, got {value}")
        if self.admission_burst < 1:
            raise ConfigError(f"admission_burst must be at least 1, got {self.admission_burst}")
        object.__setattr__(self, "preferred_batch_sizes",
                           tuple(int(n) for n in self.preferred_batch_sizes))
        if any(n < 1 or n > self.max_num_seqs for n in self.preferred_batch_sizes):
            raise ConfigError(
                f"preferred_batch_sizes {self.preferred_batch_sizes} must lie in 1..max_num_seqs "
                f"({self.max_num_seqs})"
            )
        for name in ("pipeline_parallel_size", "data_parallel_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        self.eviction()  # validates the eviction policy and its sizes

    def eviction(self) -> KVEviction | None:
        """The `cache.kv_eviction.KVEviction` asked for, or None."""
        if self.kv_eviction is None:
            return None
        return KVEviction(self.kv_eviction, self.kv_eviction_window, self.kv_eviction_sinks,
                          self.kv_eviction_heavy)

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineArgs:
        """Build from keyword arguments; an unknown name is a `ConfigError` with suggestions."""
        known = [f.name for f in dataclasses.fields(cls)]
        for key in kwargs:
            if key not in known:
                raise ConfigError(str(suggest(key, known, "engine argument")))
        return cls(**kwargs)

    @property
    def functional_dtype(self) -> str:
        """NumPy precision of the functional model: float64 when asked, else float32."""
        return "float64" if self.dtype == "float64" else "float32"

    def timing_dtype(self, checkpoint_dtype: str) -> str:
        """The dtype the target GPU is priced in: the checkpoint's unless a GPU dtype is given."""
        if self.dtype in ("auto", "float64"):
            return checkpoint_dtype
        return canonical_dtype(self.dtype)  # `half` -> float16, `float` -> float32
