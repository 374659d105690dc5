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

import numpy as np

from batching import SCHEDULERS
from batching.policy import POLICIES as SCHEDULING_POLICIES
from cache import KV_CACHES
from cache.contiguous import RESERVATIONS as CONTIGUOUS_RESERVATIONS
from cache.kv_eviction import KV_EVICTION_POLICIES, KVEviction
from cache.paged import PREEMPTION_MODES
from parallel.data import ROUTERS as DATA_PARALLEL_ROUTERS
from parallel.expert import ExpertLoadSpec
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


#: bounds of the parallel degrees: one replica spans at most 16 x 16 GPUs (the planner's largest
#: tp and pp), and a run simulates at most `MAX_NUM_GPUS` GPUs, each replica a lane of its own
#: (a KV manager, a scheduler) in this process; 4096 GPUs is a large cluster's serving fleet
MAX_PARALLEL_SIZE = {"tensor_parallel_size": 16, "pipeline_parallel_size": 16,
                     "data_parallel_size": 1024}
MAX_NUM_GPUS = 4096
#: token counts above 2**31 are no context length any model has (the longest are ~10M tokens):
#: such a value is a typo or a unit mistake
MAX_TOKENS = 2**31 - 1
#: sequences in one batch; vLLM's default is 256, and no GPU holds a million sequences' KV
MAX_NUM_SEQS = 2**20
#: GiB of host swap space: a large host holds a few TiB of DRAM
MAX_SWAP_SPACE_GIB = 4096.0
#: seeds are fed to NumPy's SeedSequence and to per-request int64 seeds
MAX_SEED = 2**63 - 1


def _kind(annotation: object) -> tuple[str, bool] | None:
    """The value kind ('int', 'float', 'bool', 'str', 'ints') of a field annotation and whether
    None is allowed; None for annotations checked elsewhere (`Any`: the speculative config)."""
    text = str(annotation).replace(" ", "")
    optional = text.endswith("|None")
    base = text.removesuffix("|None")
    if base == "tuple[int,...]":
        return "ints", optional
    if base in ("int", "float", "bool", "str"):
        return base, optional
    return None


def _as_int(name: str, value: object) -> int:
    """`value` as an int, or a ConfigError: no bools, floats or strings where a count goes."""
    if isinstance(value, bool | np.bool_):
        raise ConfigError(f"{name}={value!r} must be an integer, not a bool; pass e.g. 1")
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, str):
        raise ConfigError(f"{name}={value!r} must be an integer, not a string; pass the number "
                          "itself (e.g. 16, not '16')")
    if isinstance(value, float | np.floating):
        hint = (f"; pass {int(value)}" if math.isfinite(value) and float(value).is_integer()
                else "; pass a whole number")
        raise ConfigError(f"{name}={value!r} must be an integer (a count), not a float{hint}")
    raise ConfigError(f"{name}={value!r} must be an integer, got a {type(value).__name__}")


def _as_float(name: str, value: object) -> float:
    """`value` as a finite float, or a ConfigError (no bools, strings, NaN or infinity)."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | float | np.number):
        what = "a string" if isinstance(value, str) else f"a {type(value).__name__}"
        raise ConfigError(f"{name}={value!r} must be a number, not {what}; pass e.g. 0.5")
    number = float(value)
    if not math.isfinite(number):
        raise ConfigError(f"{name}={value!r} must be a finite number; pass a real value")
    return number


def check_types(args: EngineArgs) -> None:
    """Check (and normalise: NumPy scalars -> Python, a list -> a tuple) every field's type from
    its annotation, so a `'16'`, a `True` or a `2.5` where a count goes is refused by name before
    any arithmetic, as vLLM's argparse types and pydantic configs refuse them."""
    for f in dataclasses.fields(args):
        kind = _kind(f.type)
        value = getattr(args, f.name)
        if kind is None or (value is None and kind[1]) or f.name in CHOICES:
            continue  # (a choice is checked by `check_choice`, which lists the choices)
        if value is None:
            raise ConfigError(f"{f.name}=None is not allowed; pass a value (default "
                              f"{f.default!r})")
        base = kind[0]
        new: object
        if base == "int":
            new = _as_int(f.name, value)
        elif base == "float":
            new = _as_float(f.name, value)
        elif base == "bool":
            if not isinstance(value, bool | np.bool_):
                raise ConfigError(f"{f.name}={value!r} must be True or False")
            new = bool(value)
        elif base == "str":
            if not isinstance(value, str):
                raise ConfigError(f"{f.name}={value!r} must be a string, got a "
                                  f"{type(value).__name__}")
            new = value
        else:  # "ints"
            if isinstance(value, str | bytes) or not isinstance(value, tuple | list):
                raise ConfigError(f"{f.name}={value!r} must be a list of integers, e.g. [4, 8]")
            new = tuple(_as_int(f"{f.name}[{i}]", v) for i, v in enumerate(value))
        object.__setattr__(args, f.name, new)


def _at_least(args: EngineArgs, name: str, low: int, high: int, fix: str = "") -> None:
    value = getattr(args, name)
    if value is not None and not low <= value <= high:
        hint = f"; {fix}" if fix else ""
        raise ConfigError(f"{name}={value} must be in {low}..{high:,}{hint}")


def check_ranges(args: EngineArgs) -> None:
    """Every numeric field in its range, and the settings that only make sense together."""
    _at_least(args, "seed", 0, MAX_SEED, "seeds are non-negative (vLLM's --seed)")
    _at_least(args, "max_num_seqs", 1, MAX_NUM_SEQS)
    for name in ("max_model_len", "max_num_batched_tokens"):
        _at_least(args, name, 1, MAX_TOKENS, "a token count this large is likely a typo")
    _at_least(args, "num_gpu_blocks_override", 1, MAX_TOKENS,
              "it counts KV blocks of block_size tokens, not tokens or bytes")
    for name, high in MAX_PARALLEL_SIZE.items():
        _at_least(args, name, 1, high)
    num_gpus = args.tensor_parallel_size * args.pipeline_parallel_size * args.data_parallel_size
    if num_gpus > MAX_NUM_GPUS:
        raise ConfigError(
            f"tensor_parallel_size x pipeline_parallel_size x data_parallel_size = {num_gpus:,} "
            f"GPUs is more than the {MAX_NUM_GPUS} one run simulates (each replica is a lane of "
            "its own); simulate one replica and scale its throughput by data_parallel_size")
    if args.block_size not in (1, 2, 4, 8, 16, 32, 64, 128, 256):
        raise ConfigError(f"block_size={args.block_size} must be a power of two from 1 to 256 "
                          "(vLLM uses 16)")
    if not 0 <= args.swap_space <= MAX_SWAP_SPACE_GIB:
        raise ConfigError(f"swap_space={args.swap_space:g} must be in 0..{MAX_SWAP_SPACE_GIB:g} "
                          "GiB of host memory (it is GiB, not bytes)")
    if not 0 < args.gpu_memory_utilization <= 1:
        raise ConfigError(f"gpu_memory_utilization={args.gpu_memory_utilization:g} must be in "
                          "(0, 1]: a share of the GPU's memory, e.g. 0.9 (not 90)")
    if not 0 <= args.kv_watermark < 1:
        raise ConfigError(f"kv_watermark={args.kv_watermark:g} must be in [0, 1): a share of "
                          "the KV pool, e.g. 0.01")
    _at_least(args, "long_prefill_token_threshold", 0, MAX_TOKENS, "0 means no cap")
    _at_least(args, "max_num_partial_prefills", 1, MAX_NUM_SEQS)
    if not args.enable_chunked_prefill and (args.long_prefill_token_threshold
                                            or args.max_num_partial_prefills != 1):
        raise ConfigError(
            f"long_prefill_token_threshold={args.long_prefill_token_threshold} and "
            f"max_num_partial_prefills={args.max_num_partial_prefills} only act with chunked "
            "prefill; set enable_chunked_prefill=True or leave them at 0 and 1")
    for name in ("max_wait_s", "max_queue_delay_s"):
        if getattr(args, name) < 0:
            raise ConfigError(f"{name}={getattr(args, name):g} must be >= 0 seconds")
    _at_least(args, "admission_max_waiting", 0, MAX_NUM_SEQS * 1024)
    for name in ("admission_rate_per_s", "admission_ttft_slo_s"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise ConfigError(f"{name}={value:g} must be > 0 (or None: off)")
    _at_least(args, "admission_burst", 1, MAX_NUM_SEQS * 1024)
    for name in ("kv_eviction_window", "kv_eviction_sinks", "kv_eviction_heavy"):
        _at_least(args, name, 0, MAX_TOKENS)
    bad = [n for n in args.preferred_batch_sizes if not 1 <= n <= args.max_num_seqs]
    if bad:
        raise ConfigError(
            f"preferred_batch_sizes={list(args.preferred_batch_sizes)} must lie in "
            f"1..max_num_seqs ({args.max_num_seqs}); {bad} do not")


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
    # the functional model's tokenizer (vLLM's name): None = the model's own (a checkpoint
    # without tokenizer.json is refused), "byte" = opt in to byte ids, or a tokenizer.json path
    tokenizer: str | None = None
    # model parallelism (the parallel issue; vLLM's names, plus the DP router, ours)
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    enable_expert_parallel: bool = False
    data_parallel_router: str = "round_robin"
    # how collectives run (vLLM's flags; parallel.collectives): CUDA graphs off (every collective
    # an eager launch) and vLLM's custom all-reduce off (NCCL for every message)
    enforce_eager: bool = False
    disable_custom_all_reduce: bool = False
    # expert-parallel load skew in timing runs (parallel.expert.ExpertLoadSpec): "uniform"
    # (perfect balance), "zipf:S" (Zipf skew S > 0 over the experts) or a routing-trace JSON path
    expert_load: str = "uniform"
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
        check_types(self)  # every field's type first, so the range checks compare numbers
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
        check_ranges(self)
        ExpertLoadSpec.parse(self.expert_load)  # the form, the skew, the trace file
        if self.tokenizer is not None and not (isinstance(self.tokenizer, str) and self.tokenizer):
            raise ConfigError(f"tokenizer must be None, 'byte' or a path to a tokenizer.json "
                              f"folder, got {self.tokenizer!r}")
        check_compatible(self)  # combinations of settings: the rules of sim.engine.compat
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
