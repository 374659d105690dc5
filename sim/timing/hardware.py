"""Hardware profiles: the numbers the timing model prices a step with, read from TOML files.

A profile models one accelerator as a roofline device: dense peak FLOP/s per dtype (tensor-core
rates, no 2:4 sparsity), memory capacity and bandwidth, two links (GPU-GPU for collectives, host
PCIe for KV swap) priced alpha-beta (`latency_s + bytes / bandwidth`), achievable-efficiency
factors in (0, 1] applied on top of the peaks, and a fixed per-kernel launch overhead. Every
table in a profile file carries a `source` string, kept in `HardwareProfile.sources`.

Built-in profiles live in `hardware_profiles/<name>.toml`; any other `.toml` file with the same
layout can be loaded by path. Bandwidths are per GPU and per direction, in bytes/s.

References: Williams, Waterman & Patterson 2009 (Roofline); Hockney 1994 (alpha-beta
communication model); vendor datasheets and whitepapers cited inside each profile file.
"""

from __future__ import annotations

import functools
import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hardware_profiles import PROFILE_DIR
from sim.core.dtypes import BYTES_PER_ELEMENT, canonical_dtype
from sim.core.errors import ConfigError, UnknownNameError, suggest

DEFAULT_HARDWARE = "a100-sxm4-80gb"

# peak_flops keys: canonical dtype names plus TF32 (a tensor-core math mode, not a storage dtype)
FLOPS_DTYPES: tuple[str, ...] = (*BYTES_PER_ELEMENT, "tf32")
# every profile states all of these (fractions of the matching peak, in (0, 1])
EFFICIENCY_KEYS: tuple[str, ...] = (
    "matmul_flops",  # dense GEMMs (QKV/O projections, MLP, LM head)
    "attention_flops",  # attention score/value matmuls when compute-bound (prefill)
    "attention_bandwidth",  # attention reading the KV cache when memory-bound (decode)
    "memory_bandwidth",  # streaming weights and KV cache from device memory
    "elementwise_bandwidth",  # norms, activations, rotary, sampling: small memory-bound kernels
    "gpu_link_bandwidth",  # collectives over gpu_link
    "host_link_bandwidth",  # KV swap over host_link
)


def _fail(label: str, problem: str) -> ConfigError:
    return ConfigError(f"{label} {problem}")


def _positive(value: Any, label: str, *, integer: bool = False) -> Any:
    """`value` if it is a finite positive number (an int when `integer`), else a ConfigError."""
    kind = "a positive integer" if integer else "a positive number"
    ok_type = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok_type or not math.isfinite(value) or value <= 0:
        raise _fail(label, f"must be {kind}, got {value!r}")
    return value


# Physically plausible ranges of every number in a profile: (low, high, unit, what a value far
# below / far above the range most likely is). Wide enough for any accelerator from a T4 to a
# rack-scale part; a value outside is a unit mistake, not a new device.
PLAUSIBLE: dict[str, tuple[float, float, str, str, str]] = {
    "capacity_bytes": (2.0**30, 2.0**42, "bytes (1 GiB .. 4 TiB)",
                       "a size in GB or GiB written as bytes (80 GiB is 85899345920)",
                       "a placeholder such as 2**63-1, or bits instead of bytes"),
    "hbm_bytes_per_s": (1e10, 1e14, "bytes/s (10 GB/s .. 100 TB/s)",
                        "a bandwidth in TB/s or GB/s written as bytes/s (2 TB/s is 2e12)",
                        "bits/s instead of bytes/s, or an extra factor of 1000"),
    "flops": (1e11, 1e17, "FLOP/s (0.1 .. 100,000 TFLOP/s)",
              "TFLOP/s written as FLOP/s (312 TFLOP/s is 312e12)",
              "a sparse or cluster-wide number, or an extra factor of 1000"),
    "link_bytes_per_s": (1e8, 1e13, "bytes/s (0.1 GB/s .. 10 TB/s)",
                         "GB/s written as bytes/s (300 GB/s is 300e9)",
                         "bits/s instead of bytes/s, or a switch's total instead of one GPU's"),
    "latency_s": (1e-8, 1e-2, "seconds (10 ns .. 10 ms)",
                  "nanoseconds written as seconds", "microseconds written as seconds (2 us is 2e-6)"),
    "call_s": (0.0, 1e-3, "seconds (0 .. 1 ms)", "a negative time",
               "microseconds written as seconds (40 us is 4e-5)"),
    "num_sms": (1, 10_000, "SMs or compute units", "", "threads or cores instead of SMs"),
    "tdp_w": (1.0, 5_000.0, "watts", "kilowatts written as watts", "milliwatts written as watts"),
}


def _plausible(value: float, label: str, kind: str) -> None:
    """A ConfigError naming the likely unit mistake when `value` is outside `PLAUSIBLE[kind]`."""
    low, high, unit, below, above = PLAUSIBLE[kind]
    if low <= value <= high:
        return
    likely = below if value < low else above
    raise _fail(label, f"= {value!r} is outside the plausible range of {unit}; this looks like "
                f"{likely}; fix the value (or the units) in the profile")


def _fraction(value: Any, label: str) -> float:
    """`value` if it is a fraction of peak in (0, 1], else a ConfigError."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        hint = (f"; a percentage? write {value / 100:g}" if isinstance(value, int | float)
                and not isinstance(value, bool) and 1 < value <= 100 else "")
        raise _fail(label, f"must be a fraction of peak in (0, 1], got {value!r}{hint}")
    return float(value)


def _non_negative(value: Any, label: str) -> float:
    """`value` if it is a finite number >= 0, else a ConfigError."""
    if (isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value)
            or value < 0):
        raise _fail(label, f"must be a finite number of seconds >= 0, got {value!r}")
    return float(value)


TOPOLOGIES: tuple[str, ...] = ("switch", "mesh", "bus")


@dataclass(frozen=True)
class Link:
    """A point-to-point link priced alpha-beta: `latency_s + num_bytes / bandwidth_bytes_per_s`."""

    name: str
    bandwidth_bytes_per_s: float  # per GPU, one direction
    latency_s: float  # per collective step (alpha)
    source: str = ""
    # how a GPU reaches its peers (`TOPOLOGIES`): "switch" (NVSwitch: any peer at the GPU's
    # whole bandwidth, shared by all peers), "mesh" (one link per peer, AMD Infinity Fabric),
    # "bus" (PCIe, or an NVLink bridge joining pairs: not fully connected beyond 2 GPUs)
    topology: str = "bus"

    def __post_init__(self) -> None:
        where = f"link {self.name!r}:"
        _plausible(_positive(self.bandwidth_bytes_per_s, f"{where} bandwidth_bytes_per_s"),
                   f"{where} bandwidth_bytes_per_s", "link_bytes_per_s")
        _plausible(_positive(self.latency_s, f"{where} latency_s"), f"{where} latency_s",
                   "latency_s")
        if self.topology not in TOPOLOGIES:
            raise suggest(self.topology, TOPOLOGIES, f"{where} topology")

    def transfer_s(self, num_bytes: float, efficiency: float = 1.0) -> float:
        """Seconds to move `num_bytes` one way at `efficiency` x peak bandwidth (0 bytes: 0 s)."""
        if num_bytes <= 0:
            return 0.0
        return self.latency_s + num_bytes / (self.bandwidth_bytes_per_s * efficiency)


@dataclass(frozen=True)
class CollectiveCalls:
    """The fixed cost of one collective call, apart from its transfers (`parallel.collectives`):
    an eager NCCL call (host launch, the skew between the GPUs' launches, kernel start), the same
    call replayed inside a CUDA graph (kernel start and handshake only), and one call of vLLM's
    custom all-reduce kernel inside a graph. Seconds, >= 0."""

    nccl_eager_call_s: float
    nccl_graph_call_s: float
    custom_all_reduce_call_s: float
    source: str = ""

    def __post_init__(self) -> None:
        for key in ("nccl_eager_call_s", "nccl_graph_call_s", "custom_all_reduce_call_s"):
            _plausible(_non_negative(getattr(self, key), f"collectives: {key}"),
                       f"collectives: {key}", "call_s")


@dataclass(frozen=True)
class HardwareProfile:
    """One accelerator: peaks, memory, links, efficiencies and overheads (see module doc)."""

    name: str
    display_name: str
    vendor: str
    mem_bytes: int
    hbm_bytes_per_s: float  # device memory bandwidth (HBM or GDDR)
    peak_flops: dict[str, float] = field(hash=False)  # dense, by canonical dtype (+ "tf32")
    gpu_link: Link
    host_link: Link
    efficiency: dict[str, float] = field(hash=False)
    kernel_launch_s: float
    sources: dict[str, str] = field(hash=False, compare=False)  # table -> source string
    links: dict[str, Link] = field(default_factory=dict, hash=False)  # every link in the file
    num_sms: int | None = None  # SMs (NVIDIA) or compute units (AMD)
    tdp_w: float | None = None
    # fixed cost per collective call; None: transfers only (a profile built in code)
    collectives: CollectiveCalls | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        where = f"hardware profile {self.name!r}:"
        _plausible(_positive(self.mem_bytes, f"{where} mem_bytes", integer=True),
                   f"{where} mem_bytes", "capacity_bytes")
        _plausible(_positive(self.hbm_bytes_per_s, f"{where} hbm_bytes_per_s"),
                   f"{where} hbm_bytes_per_s", "hbm_bytes_per_s")
        _plausible(_positive(self.kernel_launch_s, f"{where} kernel_launch_s"),
                   f"{where} kernel_launch_s", "latency_s")
        for key, value in (("num_sms", self.num_sms), ("tdp_w", self.tdp_w)):
            if value is not None:
                _plausible(_positive(value, f"{where} {key}"), f"{where} {key}", key)
        if not self.peak_flops:
            raise _fail(where, "peak_flops is empty; give at least one dtype's dense FLOP/s")
        for dtype, flops in self.peak_flops.items():
            if dtype not in FLOPS_DTYPES:
                raise _fail(where, f"peak_flops key {dtype!r} is not one of {FLOPS_DTYPES}")
            _plausible(_positive(flops, f"{where} peak_flops[{dtype!r}]"),
                       f"{where} peak_flops[{dtype!r}]", "flops")
        missing = [key for key in EFFICIENCY_KEYS if key not in self.efficiency]
        if missing:
            raise _fail(where, f"efficiency lacks {', '.join(missing)}")
        for key, value in self.efficiency.items():
            if key not in EFFICIENCY_KEYS:
                raise _fail(where, f"efficiency key {key!r} is not one of {EFFICIENCY_KEYS}")
            _fraction(value, f"{where} efficiency[{key!r}]")

    def peak_flops_for(self, dtype: str) -> float:
        """Dense peak FLOP/s for `dtype` (aliases such as fp16, bf16, fp8 and tf32 accepted)."""
        key = "tf32" if str(dtype).lower() == "tf32" else canonical_dtype(dtype)
        if key in self.peak_flops:
            return self.peak_flops[key]
        have = "/".join(k for k in ("bfloat16", "float16") if k in self.peak_flops)
        others = [n for n in list_profiles() if key in load_profile(n).peak_flops]
        if not have:
            use = f"use one of {', '.join(sorted(self.peak_flops))}"
        elif others:
            use = f"use {have} or a device with {key} ({', '.join(others)})"
        else:
            use = f"no built-in profile has it; price the matmuls as {have}"
        what = "tensor cores" if key.startswith("fp8") or key == "tf32" else "compute"
        raise ConfigError(f"{self.name} has no {key} {what}; {use}")

    def efficiency_for(self, key: str) -> float:
        """Achievable fraction of peak for `key` (one of `EFFICIENCY_KEYS`)."""
        if key not in self.efficiency:
            raise suggest(key, EFFICIENCY_KEYS, "efficiency key")
        return self.efficiency[key]


# ---------------------------------------------------------------- reading TOML


class _Table:
    """A TOML table that reports missing, mistyped and unknown keys with file and field names."""

    def __init__(self, data: Any, file_label: str, path: str) -> None:
        self.file_label, self.path = file_label, path  # path: "" (top level) or "[memory]"
        if not isinstance(data, dict):
            raise ConfigError(f"{file_label}: {path} must be a table, got {data!r}")
        self.data = data

    def label(self, key: str) -> str:
        return f"{self.file_label}: {self.path + ' ' if self.path else ''}{key}"

    def require(self, key: str) -> Any:
        if key not in self.data:
            raise _fail(self.label(key), "is missing; every profile must give it")
        return self.data[key]

    def text(self, key: str) -> str:
        value = self.require(key)
        if not isinstance(value, str) or not value.strip():
            raise _fail(self.label(key), f"must be a non-empty string, got {value!r}")
        return value

    def number(self, key: str, *, integer: bool = False, kind: str | None = None) -> Any:
        """A positive finite number, inside `PLAUSIBLE[kind]` when `kind` is given."""
        value = _positive(self.require(key), self.label(key), integer=integer)
        if kind is not None:
            _plausible(value, self.label(key), kind)
        return value

    def seconds(self, key: str) -> float:
        """A call cost in seconds, >= 0 and inside `PLAUSIBLE['call_s']`."""
        value = _non_negative(self.require(key), self.label(key))
        _plausible(value, self.label(key), "call_s")
        return value

    def optional_number(self, key: str, *, integer: bool = False,
                        kind: str | None = None) -> Any:
        return self.number(key, integer=integer, kind=kind) if key in self.data else None

    def sub(self, key: str) -> _Table:
        inner = f"[{self.path.strip('[]') + '.' if self.path else ''}{key}]"
        return _Table(self.require(key), self.file_label, inner)

    def only(self, allowed: tuple[str, ...] | list[str]) -> None:
        for key in self.data:
            if key not in allowed:
                hint = str(suggest(key, list(allowed), "field")).split("; ", 1)[1]
                raise _fail(self.label(key), f"is not a known field; {hint}")


def _parse(data: dict[str, Any], file_label: str) -> HardwareProfile:
    top = _Table(data, file_label, "")
    top.only(("name", "display_name", "vendor", "gpu_link", "host_link", "memory", "compute",
              "links", "efficiency", "overhead", "collectives"))
    sources: dict[str, str] = {}

    memory = top.sub("memory")
    memory.only(("capacity_bytes", "bandwidth_bytes_per_s", "source"))
    sources["memory"] = memory.text("source")

    compute = top.sub("compute")
    compute.only(("peak_flops", "num_sms", "tdp_w", "source"))
    sources["compute"] = compute.text("source")
    flops_table = compute.sub("peak_flops")
    peak_flops: dict[str, float] = {}
    for key in flops_table.data:
        if key not in FLOPS_DTYPES:
            try:
                hint = f"write it as {canonical_dtype(key)!r}"
            except UnknownNameError:
                hint = f"use one of {', '.join(FLOPS_DTYPES)}"
            raise _fail(flops_table.label(key), f"is not a known dtype key; {hint}")
        peak_flops[key] = float(flops_table.number(key, kind="flops"))
    if not peak_flops:
        raise _fail(f"{file_label}: [compute.peak_flops]", "is empty; give a dtype's dense FLOP/s")

    links_table = top.sub("links")
    links: dict[str, Link] = {}
    for link_name in links_table.data:
        table = links_table.sub(link_name)
        table.only(("bandwidth_bytes_per_s", "latency_s", "topology", "source"))
        sources[f"links.{link_name}"] = table.text("source")
        topology = table.text("topology")
        if topology not in TOPOLOGIES:
            hint = str(suggest(topology, TOPOLOGIES, "topology")).split("; ", 1)[1]
            raise _fail(table.label("topology"), f"= {topology!r} is not a topology; {hint}")
        links[link_name] = Link(
            link_name, float(table.number("bandwidth_bytes_per_s", kind="link_bytes_per_s")),
            float(table.number("latency_s", kind="latency_s")), table.text("source"), topology)
    chosen: dict[str, Link] = {}
    for role in ("gpu_link", "host_link"):
        link_name = top.text(role)
        if link_name not in links:
            raise _fail(top.label(role), f"names {link_name!r}, which is not a [links.*] table "
                        f"(have: {', '.join(links) or 'none'})")
        chosen[role] = links[link_name]

    eff_table = top.sub("efficiency")
    eff_table.only((*EFFICIENCY_KEYS, "source"))
    sources["efficiency"] = eff_table.text("source")
    efficiency = {key: _fraction(eff_table.require(key), eff_table.label(key))
                  for key in EFFICIENCY_KEYS}

    overhead = top.sub("overhead")
    overhead.only(("kernel_launch_s", "source"))
    sources["overhead"] = overhead.text("source")

    coll = top.sub("collectives")
    coll_keys = ("nccl_eager_call_s", "nccl_graph_call_s", "custom_all_reduce_call_s")
    coll.only((*coll_keys, "source"))
    sources["collectives"] = coll.text("source")
    calls = CollectiveCalls(nccl_eager_call_s=coll.seconds("nccl_eager_call_s"),
                            nccl_graph_call_s=coll.seconds("nccl_graph_call_s"),
                            custom_all_reduce_call_s=coll.seconds("custom_all_reduce_call_s"),
                            source=coll.text("source"))

    tdp_w = compute.optional_number("tdp_w", kind="tdp_w")
    return HardwareProfile(
        name=top.text("name"),
        display_name=top.text("display_name"),
        vendor=top.text("vendor"),
        mem_bytes=memory.number("capacity_bytes", integer=True, kind="capacity_bytes"),
        hbm_bytes_per_s=float(memory.number("bandwidth_bytes_per_s", kind="hbm_bytes_per_s")),
        peak_flops=peak_flops,
        gpu_link=chosen["gpu_link"],
        host_link=chosen["host_link"],
        efficiency=efficiency,
        kernel_launch_s=float(overhead.number("kernel_launch_s", kind="latency_s")),
        sources=sources,
        links=links,
        num_sms=compute.optional_number("num_sms", integer=True, kind="num_sms"),
        tdp_w=None if tdp_w is None else float(tdp_w),
        collectives=calls,
    )


def _load_file(path: Path) -> HardwareProfile:
    if not path.is_file():
        raise ConfigError(f"hardware profile file {str(path)!r} does not exist; pass a built-in "
                          f"name ({', '.join(list_profiles())}) or a path to a .toml file")
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path.name}: not valid TOML: {err}") from err
    return _parse(data, path.name)


@functools.cache
def _load_builtin(name: str) -> HardwareProfile:
    profile = _load_file(PROFILE_DIR / f"{name}.toml")
    if profile.name != name:
        raise ConfigError(f"{name}.toml: name {profile.name!r} must equal the file name {name!r}")
    return profile


@functools.lru_cache(maxsize=1)
def _builtin_names() -> tuple[str, ...]:
    return tuple(sorted(p.stem for p in PROFILE_DIR.glob("*.toml")))


def list_profiles() -> list[str]:
    """Names of the built-in profiles, sorted."""
    return list(_builtin_names())


def load_profile(name_or_path: str | os.PathLike[str]) -> HardwareProfile:
    """A built-in profile by name (case-insensitive; `_` or spaces for `-`) or a `.toml` file."""
    text = os.fspath(name_or_path)
    if isinstance(name_or_path, os.PathLike) or text.endswith(".toml") or os.sep in text:
        return _load_file(Path(text))
    key = text.strip().lower().replace("_", "-").replace(" ", "-")
    if key not in _builtin_names():
        hint = suggest(text, list_profiles(), "hardware profile")
        raise UnknownNameError(f"{hint}; built-in profiles: {', '.join(list_profiles())}; "
                               "or pass a path to a .toml file")
    return _load_builtin(key)


def summary_row(profile: HardwareProfile) -> dict[str, str | float]:
    """The headline numbers of `profile`, for the `infersim profiles` table."""
    flops = profile.peak_flops
    fp8 = flops.get("fp8_e4m3")
    return {
        "name": profile.name,
        "display_name": profile.display_name,
        "memory_gib": round(profile.mem_bytes / 2**30, 1),
        "hbm_tb_per_s": round(profile.hbm_bytes_per_s / 1e12, 3),
        "bf16_tflops": round(flops["bfloat16"] / 1e12, 1) if "bfloat16" in flops else "-",
        "fp16_tflops": round(flops["float16"] / 1e12, 1) if "float16" in flops else "-",
        "fp8_tflops": round(fp8 / 1e12, 1) if fp8 is not None else "-",
        "gpu_link": profile.gpu_link.name,
        "gpu_link_gb_per_s": round(profile.gpu_link.bandwidth_bytes_per_s / 1e9, 1),
    }
