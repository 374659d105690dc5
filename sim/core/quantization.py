"""Quantization methods by name: what each stores, computes in, and costs.

| method | weights                                        | activations     | GEMM in  |
| ------ | ---------------------------------------------- | --------------- | -------- |
| int8   | int8 symmetric, group-wise, round-to-nearest   | 16-bit          | 16-bit   |
| int4   | int4 with zero point, group-wise, RTN          | 16-bit          | 16-bit   |
| gptq   | int4 with zero point, group-wise, GPTQ         | 16-bit          | 16-bit   |
| w8a8   | int8 per output channel, SmoothQuant-migrated  | int8 per token  | int8     |
| fp8    | fp8 e4m3 per output channel                    | fp8 e4m3 per token | fp8   |

Weight-only methods dequantize to 16 bit inside the GEMM; GPTQ compensates rounding errors with
calibration activations from the functional model; activation scales are dynamic (per token).
Embedding, LM head, norms and the MoE router stay unquantized (as GPTQ/AWQ/fp8 checkpoints keep
them). On a device without fp8 tensor cores (A100), `fp8` falls back to weight-only fp8 (W8A16:
weights dequantized to 16 bit in the kernel), as vLLM does with its FP8 Marlin kernel, and the
spec says so (`QuantSpec.note`); both the tokens and the price follow the fallback.

Stored bytes per weight include the scales: a 16-bit scale per group (and a 4-bit zero point per
group for asymmetric int4, packed as AWQ/GPTQ `qzeros`), a 32-bit scale per output channel for
w8a8/fp8 (negligible).

References: Frantar et al. 2023 (GPTQ); Lin et al. 2024 (AWQ); Xiao et al. 2023 (SmoothQuant,
W8A8 with per-token dynamic activation scales); Micikevicius et al. 2022 (FP8 formats); vLLM
`vllm/model_executor/layers/quantization/` (fp8 Marlin fallback on Ampere).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Protocol

from sim.core.errors import ConfigError


class TensorCores(Protocol):
    """What `QuantSpec.resolve` reads of a device (`sim.timing.hardware.HardwareProfile`)."""

    @property
    def name(self) -> str: ...

    @property
    def peak_flops(self) -> Mapping[str, float]: ...

#: methods that quantize weights only (activations stay 16-bit)
WEIGHT_ONLY_METHODS = ("int8", "int4", "gptq")
#: the one list of `quantization` choices (`EngineArgs` and the CLI take theirs from it)
METHODS = (*WEIGHT_ONLY_METHODS, "w8a8", "fp8")
DEFAULT_GROUP_SIZE = 128
SMOOTHQUANT_ALPHA = 0.5  # SmoothQuant's migration strength for most models (Xiao et al. 2023)
_SCALE_BYTES = 2.0  # one fp16 scale per group
_ZERO_BYTES = 0.5  # one packed int4 zero point per group


@dataclass(frozen=True)
class QuantSpec:
    """A quantization method with its options (a frozen config; no I/O).

    `weight_only` is derived from the method; `resolve(hardware)` may turn fp8 into weight-only
    fp8 on a device without fp8 tensor cores and record why in `note`.
    """

    method: str
    group_size: int = DEFAULT_GROUP_SIZE
    weight_only: bool | None = None
    note: str = ""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"quantization={self.method!r} is not one of {', '.join(METHODS)} "
                              "(or None for unquantized)")
        g = self.group_size
        if isinstance(g, bool) or not isinstance(g, int) or not (g == -1 or g >= 1):
            raise ConfigError(f"quantization_group_size must be a positive integer or -1 (one "
                              f"group per output channel), got {g!r}")
        if self.weight_only is None:
            object.__setattr__(self, "weight_only", self.method in WEIGHT_ONLY_METHODS)
        if self.method in WEIGHT_ONLY_METHODS and not self.weight_only:
            raise ConfigError(f"{self.method} is weight-only; use w8a8 or fp8 to quantize "
                              "activations too")

    # ------------------------------------------------------------------ what is stored
    @property
    def weight_format(self) -> str:
        """Storage format of the quantized weights (a `sim.core.dtypes` name)."""
        return {"int8": "int8", "int4": "int4", "gptq": "int4", "w8a8": "int8",
                "fp8": "fp8_e4m3"}[self.method]

    @property
    def bits(self) -> int:
        return 4 if self.weight_format == "int4" else 8

    @property
    def symmetric(self) -> bool:
        """int4 keeps a zero point (asymmetric), int8 and fp8 are symmetric."""
        return self.weight_format != "int4"

    @property
    def per_channel(self) -> bool:
        """One scale per output channel (w8a8, fp8: the integer / fp8 GEMM needs one scale per
        row of the accumulator) rather than per group."""
        return self.method in ("w8a8", "fp8")

    @property
    def act_format(self) -> str | None:
        """How activations are quantized before each GEMM (None: they stay 16-bit)."""
        if self.weight_only:
            return None
        return "int8" if self.method == "w8a8" else "fp8_e4m3"

    @property
    def calibrated(self) -> bool:
        """Whether the method needs calibration activations from the functional model."""
        return self.method in ("gptq", "w8a8")

    def weight_bytes_per_param(self, k: int | None = None) -> float:
        """Stored bytes per quantized weight, scales (and zero points) included; `k` the row
        length (None: long rows, so per-channel scales are free)."""
        base = 0.5 if self.weight_format == "int4" else 1.0
        if self.per_channel:
            return base + (4.0 / k if k else 0.0)
        g = self.group_size if self.group_size != -1 else (k or 0)
        if not g:
            return base
        extra = _SCALE_BYTES + (0.0 if self.symmetric else _ZERO_BYTES)
        return base + extra / g

    def gemm_dtype(self, act_dtype: str) -> str:
        """The dtype whose peak FLOP/s prices the quantized GEMMs."""
        if self.weight_only:
            return act_dtype
        return "int8" if self.method == "w8a8" else "fp8_e4m3"

    # ------------------------------------------------------------------ device
    def resolve(self, hardware: TensorCores) -> QuantSpec:
        """This spec as it runs on `hardware` (a `HardwareProfile`): fp8 without fp8 tensor
        cores falls back to weight-only fp8; int8 without int8 tensor cores is an error."""
        peaks, name = hardware.peak_flops, hardware.name
        if self.method == "fp8" and not self.weight_only and "fp8_e4m3" not in peaks:
            return replace(self, weight_only=True, note=(
                f"{name} has no fp8 tensor cores: fp8 runs weight-only (W8A16, weights "
                "dequantized to 16 bit in the GEMM, activations unquantized), as vLLM's FP8 "
                "Marlin kernel does"))
        if self.method == "w8a8" and "int8" not in peaks:
            raise ConfigError(f"{name} has no int8 tensor cores; w8a8 cannot run there (use "
                              "int8 weight-only quantization)")
        return self

    def describe(self) -> str:
        g = "per-channel" if self.per_channel or self.group_size == -1 else f"g{self.group_size}"
        what = {"int8": "int8 weight-only RTN", "int4": "int4 weight-only RTN",
                "gptq": "int4 weight-only GPTQ", "w8a8": "W8A8 SmoothQuant",
                "fp8": "fp8 e4m3 W8A8" if not self.weight_only else "fp8 e4m3 weight-only"}
        return f"{what[self.method]} {g}" + (f" ({self.note})" if self.note else "")


def quant_spec(method: str | None, group_size: int = DEFAULT_GROUP_SIZE) -> QuantSpec | None:
    """A `QuantSpec` for an engine argument value (None: unquantized)."""
    return None if method is None else QuantSpec(method, group_size)
