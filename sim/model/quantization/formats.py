"""Number formats of quantized inference, emulated bit-exactly in NumPy.

- **Integers** (int8, int4), group-wise along the input dimension: every `group_size`
  consecutive weights of a row share one scale (symmetric: `q = rint(w / s)`, `s = amax / qmax`)
  or a scale and a zero point (asymmetric: `q = rint(w / s) + z` in `[0, 2^b - 1]`, the range
  `[min(w, 0), max(w, 0)]` as GPTQ and AWQ take it). Round to nearest, ties to even (`np.rint`).
  Error bound: `|w - dequant(q)| <= s / 2` for every element.
- **fp8** e4m3 ("fn": bias 7, no infinities, NaN = S.1111.111, max 448) and e5m2 (bias 15, IEEE
  infinities and NaNs, max 57344), with subnormals, round to nearest even, and saturation to the
  largest finite value (or overflow to NaN / inf when `saturate=False`). `fp8_encode` gives the
  8-bit codes, `fp8_decode` their values, `fp8_round` both at once.
- **Scaled fp8**: a per-row scale `amax / fp8_max` maps each row (a weight's output channel, or
  an activation's token) onto the format's range.
- `int_gemm`: the integer GEMM of two int8 operands with their scales, accumulated exactly (in
  int64, or in float64 while the sum stays below 2^53), the oracle for the dequantized path.

References: Micikevicius et al. 2022, "FP8 Formats for Deep Learning" (e4m3 / e5m2 definitions);
Jacob et al. 2018 (integer-arithmetic-only inference, scales and zero points); Frantar et al.
2023 (GPTQ) and Lin et al. 2024 (AWQ) for group-wise asymmetric int4 with a zero-inclusive range.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sim.core.errors import ConfigError


# ---------------------------------------------------------------------------------- integers
@dataclass(frozen=True)
class IntQuantized:
    """Integer codes of a tensor quantized along its last axis in groups.

    `codes [..., k]` (int16: signed and unsigned 8-bit codes both fit), `scales [...,
    n_groups]`, `zeros` the same shape (asymmetric) or None (symmetric); `group_size` is the
    group length (the last group may be shorter when it does not divide k).
    """

    codes: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray | None
    bits: int
    group_size: int

    def dequantize(self, dtype: np.dtype | type = np.float64) -> np.ndarray:
        k = self.codes.shape[-1]
        scale = np.repeat(self.scales, self.group_size, axis=-1)[..., :k]  # [..., k]
        q = self.codes.astype(np.float64)  # [..., k]
        if self.zeros is not None:
            q = q - np.repeat(self.zeros, self.group_size, axis=-1)[..., :k]  # [..., k]
        return (q * scale).astype(dtype)  # [..., k]


def _check_bits(bits: int) -> None:
    if bits not in (2, 3, 4, 8):
        raise ConfigError(f"integer quantization supports 2, 3, 4 or 8 bits, got {bits}")


def group_size_for(k: int, group_size: int) -> int:
    """The group length used for a row of `k`: `group_size`, or the whole row for -1 / larger."""
    if group_size == -1 or group_size >= k:
        return k
    if group_size < 1:
        raise ConfigError(f"group_size must be a positive integer or -1 (one group per row), "
                          f"got {group_size}")
    return group_size


def int_params(block: np.ndarray, bits: int, symmetric: bool
               ) -> tuple[np.ndarray, np.ndarray | None]:
    """Scale (and zero point) of each row of `block [..., g]` (float64 in, float64 out)."""
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        step = np.max(np.abs(block), axis=-1) / qmax  # [...]
        return np.where(step > 0, step, 1.0), None  # 0 (or an underflow): any scale works
    qrange = 2**bits - 1
    lo = np.minimum(np.min(block, axis=-1), 0.0)  # [...]
    hi = np.maximum(np.max(block, axis=-1), 0.0)  # [...]
    step = (hi - lo) / qrange  # [...]
    scale = np.where(step > 0, step, 1.0)  # [...]
    zero = np.clip(np.rint(-lo / scale), 0, qrange)  # [...]
    return scale, zero


def int_codes(x: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, bits: int
              ) -> np.ndarray:
    """Codes of `x` for given scale/zero (broadcast against `x`), clipped to the format."""
    if zero is None:
        qmax = 2 ** (bits - 1) - 1
        return np.clip(np.rint(x / scale), -qmax - 1, qmax)  # x.shape
    return np.clip(np.rint(x / scale) + zero, 0, 2**bits - 1)  # x.shape


def quantize_int(w: np.ndarray, bits: int, group_size: int = -1, symmetric: bool = True
                 ) -> IntQuantized:
    """Round-to-nearest group-wise integer quantization of `w` along its last axis."""
    _check_bits(bits)
    w = np.asarray(w, dtype=np.float64)  # [..., k]
    k = w.shape[-1]
    g = group_size_for(k, group_size)
    n_groups = -(-k // g)
    pad = n_groups * g - k
    # edge padding repeats a value of the last group: its min / max / amax do not change
    padded = np.pad(w, [(0, 0)] * (w.ndim - 1) + [(0, pad)], mode="edge") if pad else w
    blocks = padded.reshape(*w.shape[:-1], n_groups, g)  # [..., n_groups, g]
    scale, zero = int_params(blocks, bits, symmetric)  # [..., n_groups] each
    codes = int_codes(blocks, scale[..., None], None if zero is None else zero[..., None], bits)
    codes = codes.reshape(*w.shape[:-1], n_groups * g)[..., :k]  # [..., k]
    return IntQuantized(codes.astype(np.int16), scale, zero, bits, g)


def fake_quant_int(w: np.ndarray, bits: int, group_size: int = -1, symmetric: bool = True
                   ) -> np.ndarray:
    """`w` after a quantize-dequantize round trip (float64, same shape)."""
    return quantize_int(w, bits, group_size, symmetric).dequantize()


def quantize_rows_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per row (per token / per output channel): codes `[..., k]` (int8) and
    scales `[...]` (float64)."""
    q = quantize_int(x, 8, -1, symmetric=True)
    return q.codes.astype(np.int8), q.scales[..., 0]


def int_gemm(qx: np.ndarray, sx: np.ndarray, qw: np.ndarray, sw: np.ndarray,
             exact_int: bool = False) -> np.ndarray:
    """`(qx sx) @ (qw sw).T` for int8 codes `qx [n, k]`, `qw [m, k]` with per-row scales
    `sx [n]`, `sw [m]`: the integer products are summed exactly (an int32 accumulator never
    overflows for k < 2^31 / 127^2), then scaled once. In float64 the sum of integers below 2^53
    is exact, so `exact_int=False` (BLAS) gives the same accumulator as `exact_int=True`
    (int64). Returns float64 `[n, m]`."""
    k = qx.shape[-1]
    if k * 128 * 128 >= 2**53:
        raise ConfigError(f"int_gemm: k={k} is too long for an exact float64 accumulator")
    if exact_int:
        acc = (qx.astype(np.int64) @ qw.astype(np.int64).T).astype(np.float64)  # [n, m]
    else:
        acc = qx.astype(np.float64) @ qw.astype(np.float64).T  # [n, m]
    return acc * np.asarray(sx, dtype=np.float64)[:, None] * np.asarray(sw, np.float64)[None, :]


# ---------------------------------------------------------------------------------- fp8
@dataclass(frozen=True)
class FP8Format:
    """An 8-bit float: 1 sign bit, `exp_bits`, `man_bits`, exponent `bias`."""

    name: str
    exp_bits: int
    man_bits: int
    bias: int
    has_inf: bool  # e5m2: IEEE-like; e4m3fn: no infinities, one NaN code per sign

    @property
    def table(self) -> np.ndarray:
        """The value of every code 0..255 (float64; NaN / inf where the format has them)."""
        return _decode_table(self)

    @property
    def max(self) -> float:
        return float(np.nanmax(np.where(np.isinf(self.table), np.nan, self.table)))

    @property
    def min_normal(self) -> float:
        return 2.0 ** (1 - self.bias)

    @property
    def min_subnormal(self) -> float:
        return 2.0 ** (1 - self.bias - self.man_bits)


E4M3 = FP8Format("fp8_e4m3", 4, 3, 7, has_inf=False)
E5M2 = FP8Format("fp8_e5m2", 5, 2, 15, has_inf=True)
FP8_FORMATS: dict[str, FP8Format] = {E4M3.name: E4M3, E5M2.name: E5M2}

_TABLES: dict[str, np.ndarray] = {}


def _decode_table(fmt: FP8Format) -> np.ndarray:
    if fmt.name in _TABLES:
        return _TABLES[fmt.name]
    codes = np.arange(256)  # [256]
    sign = np.where(codes >> 7, -1.0, 1.0)  # [256]
    exp = (codes >> fmt.man_bits) & (2**fmt.exp_bits - 1)  # [256]
    man = codes & (2**fmt.man_bits - 1)  # [256]
    frac = man / 2.0**fmt.man_bits  # [256]
    value = np.where(exp == 0, frac * 2.0 ** (1 - fmt.bias),
                     (1.0 + frac) * 2.0 ** (exp - fmt.bias))  # [256]
    top = exp == 2**fmt.exp_bits - 1
    if fmt.has_inf:  # e5m2: exponent all ones is inf (mantissa 0) or NaN
        value = np.where(top & (man == 0), np.inf, np.where(top, np.nan, value))
    else:  # e4m3fn: only S.1111.111 is NaN; the rest of the top binade is finite
        value = np.where(top & (man == 2**fmt.man_bits - 1), np.nan, value)
    table = sign * value  # [256]
    table.setflags(write=False)
    _TABLES[fmt.name] = table
    return table


def _fmt(fmt: FP8Format | str) -> FP8Format:
    if isinstance(fmt, FP8Format):
        return fmt
    if fmt not in FP8_FORMATS:
        raise ConfigError(f"unknown fp8 format {fmt!r}; use one of {', '.join(FP8_FORMATS)}")
    return FP8_FORMATS[fmt]


def fp8_round(x: np.ndarray, fmt: FP8Format | str = E4M3, saturate: bool = True) -> np.ndarray:
    """`x` rounded to the nearest `fmt` value (ties to even), as float64 of the same shape.

    Out-of-range magnitudes saturate to +-max (`saturate=True`), else become NaN (e4m3) or
    +-inf (e5m2); NaN stays NaN.
    """
    f = _fmt(fmt)
    x = np.asarray(x, dtype=np.float64)  # x.shape
    a = np.abs(x)  # x.shape
    finite = np.isfinite(a)
    safe = np.where(finite & (a > 0), a, 1.0)  # x.shape
    _, e2 = np.frexp(safe)  # a = m 2^e2, m in [0.5, 1)
    exponent = np.maximum(e2 - 1, 1 - f.bias)  # binade, clamped into the subnormal range
    quantum = np.ldexp(1.0, exponent - f.man_bits)  # spacing of fmt values there
    r = np.rint(safe / quantum) * quantum  # exact: powers of two; np.rint ties to even
    r = np.where(a > 0, r, 0.0)
    over = ~finite | (r > f.max)
    big = f.max if saturate else (np.inf if f.has_inf else np.nan)
    r = np.where(over, big, r)
    r = np.where(np.isnan(x), np.nan, r)
    return np.copysign(r, x)  # x.shape; keeps -0.0


def fp8_encode(x: np.ndarray, fmt: FP8Format | str = E4M3, saturate: bool = True) -> np.ndarray:
    """The uint8 codes of `x` in `fmt` (see `fp8_round`); NaN -> the format's NaN code."""
    f = _fmt(fmt)
    r = fp8_round(x, f, saturate)  # x.shape
    table = f.table
    positives = table[:128]  # [128]: codes 0..127, increasing, then inf / NaN at the top
    n_finite = int(np.sum(np.isfinite(positives)))
    mag = np.abs(r)  # x.shape
    codes = np.searchsorted(positives[:n_finite], np.where(np.isfinite(mag), mag, 0.0))
    codes = np.where(np.isinf(mag), n_finite, codes)  # e5m2 inf code 0x7C
    codes = np.where(np.isnan(r), 127, codes)  # 0x7F is NaN in both formats
    return (codes | np.where(np.signbit(r), 128, 0)).astype(np.uint8)  # x.shape


def fp8_decode(codes: np.ndarray, fmt: FP8Format | str = E4M3) -> np.ndarray:
    """Values (float64) of uint8 `codes` in `fmt`."""
    return _fmt(fmt).table[np.asarray(codes, dtype=np.uint8)]  # codes.shape


def fake_quant_fp8_rows(x: np.ndarray, fmt: FP8Format | str = E4M3) -> np.ndarray:
    """Scaled fp8 per row: each row of `x [..., k]` divided by `amax / fmt.max`, rounded to fmt,
    and scaled back (float64). A zero row stays zero."""
    f = _fmt(fmt)
    x = np.asarray(x, dtype=np.float64)  # [..., k]
    step = np.max(np.abs(x), axis=-1, keepdims=True) / f.max  # [..., 1]
    scale = np.where(step > 0, step, 1.0)  # [..., 1]
    return fp8_round(x / scale, f) * scale  # [..., k]


def fake_quant_int8_rows(x: np.ndarray) -> np.ndarray:
    """Symmetric int8 per row (per-token dynamic activation quantization), float64 back."""
    x = np.asarray(x, dtype=np.float64)  # [..., k]
    step = np.max(np.abs(x), axis=-1, keepdims=True) / 127.0  # [..., 1]
    scale = np.where(step > 0, step, 1.0)  # [..., 1]
    return np.clip(np.rint(x / scale), -128, 127) * scale  # [..., k]


# per-token dynamic activation quantizers, by format name
ACT_QUANTIZERS = {"int8": fake_quant_int8_rows, "fp8_e4m3": fake_quant_fp8_rows}
