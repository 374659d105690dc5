"""Oracles for the quantization number formats: round-trip bounds, bit-exact fp8, exact int8 GEMM."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from sim.core.errors import ConfigError
from sim.model.quantization.formats import (
    E4M3,
    E5M2,
    fake_quant_fp8_rows,
    fake_quant_int8_rows,
    fp8_decode,
    fp8_encode,
    fp8_round,
    int_gemm,
    quantize_int,
    quantize_rows_int8,
)

finite = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=64)


@settings(max_examples=60, deadline=None)
@given(w=arrays(np.float64, st.tuples(st.integers(1, 5), st.integers(1, 70)), elements=finite),
       bits=st.sampled_from([4, 8]), group=st.sampled_from([-1, 1, 7, 16, 32, 128]),
       symmetric=st.booleans())
def test_int_round_trip_within_half_a_step(w: np.ndarray, bits: int, group: int,
                                           symmetric: bool) -> None:
    q = quantize_int(w, bits, group, symmetric)
    k = w.shape[-1]
    step = np.repeat(q.scales, q.group_size, axis=-1)[..., :k]  # [rows, k]
    err = np.abs(q.dequantize() - w)
    assert np.all(err <= step * (0.5 + 1e-9) + 1e-300)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    assert q.codes.min() >= lo and q.codes.max() <= hi


def test_int_exact_on_grid_values() -> None:
    rng = np.random.default_rng(0)
    codes = rng.integers(-127, 128, size=(3, 64)).astype(np.float64)
    codes[:, 0] = 127  # every row reaches the top code: its scale is exactly 0.25
    w = codes * 0.25
    assert np.array_equal(quantize_int(w, 8, -1, True).dequantize(), w)


def _brute_force_fp8(x: float, table: np.ndarray, max_value: float) -> float:
    """Nearest finite value, ties to the even code (mantissa LSB 0), saturating."""
    if abs(x) >= max_value:
        return float(np.copysign(max_value, x))
    finite_codes = [c for c in range(256) if np.isfinite(table[c])]
    dist = [abs(table[c] - x) for c in finite_codes]
    best = min(dist)
    ties = [c for c, d in zip(finite_codes, dist, strict=True) if d == best]
    even = [c for c in ties if c % 2 == 0]
    return float(table[(even or ties)[0]])


@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=lambda f: f.name)
def test_fp8_table_constants(fmt) -> None:  # type: ignore[no-untyped-def]
    expect = {"fp8_e4m3": (448.0, 2.0**-6, 2.0**-9), "fp8_e5m2": (57344.0, 2.0**-14, 2.0**-16)}
    assert (fmt.max, fmt.min_normal, fmt.min_subnormal) == expect[fmt.name]
    table = fmt.table
    assert np.isnan(table[0x7F]) and np.isnan(table[0xFF])
    assert np.isinf(table[0x7C]) == fmt.has_inf
    assert table[0x80] == 0 and np.signbit(table[0x80])


@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=lambda f: f.name)
def test_fp8_encode_decode_exact_on_every_code(fmt) -> None:  # type: ignore[no-untyped-def]
    codes = np.arange(256, dtype=np.uint8)
    values = fp8_decode(codes, fmt)
    ok = ~np.isnan(values)
    assert np.array_equal(fp8_encode(values[ok], fmt, saturate=False), codes[ok])
    assert np.array_equal(fp8_round(values[ok], fmt, saturate=False), values[ok])


@settings(max_examples=300, deadline=None)
@given(x=st.floats(-7e4, 7e4, allow_nan=False, width=64), name=st.sampled_from(["e4m3", "e5m2"]))
def test_fp8_round_is_nearest_even_saturating(x: float, name: str) -> None:
    fmt = E4M3 if name == "e4m3" else E5M2
    assert fp8_round(np.array([x]), fmt)[0] == _brute_force_fp8(x, fmt.table, fmt.max)


@settings(max_examples=100, deadline=None)
@given(x=st.floats(-400, 400, allow_nan=False, width=64))
def test_fp8_relative_error_bound(x: float) -> None:
    r = fp8_round(np.array([x]), E4M3)[0]
    assert abs(r - x) <= max(abs(x) * 2.0**-4, 2.0**-10) * (1 + 1e-12)


def test_fp8_ties_overflow_nan() -> None:
    # halfway between 1 and 1.125 (e4m3 spacing 1/8 at 1): ties go to the even mantissa, 1.0
    assert fp8_round(np.array([1.0625, 1.1875]), E4M3).tolist() == [1.0, 1.25]
    assert fp8_round(np.array([1e6, -1e6, np.inf]), E4M3).tolist() == [448.0, -448.0, 448.0]
    assert np.isnan(fp8_round(np.array([500.0]), E4M3, saturate=False)[0])
    assert np.isinf(fp8_round(np.array([61440.0]), E5M2, saturate=False)[0])  # ties up -> inf
    assert fp8_round(np.array([61439.0]), E5M2, saturate=False)[0] == 57344.0
    assert fp8_encode(np.array([np.nan]), E4M3)[0] == 0x7F
    assert fp8_round(np.array([2.0**-10, 3 * 2.0**-11]), E4M3).tolist() == [0.0, 2.0**-9]


@settings(max_examples=40, deadline=None)
@given(x=arrays(np.float64, st.tuples(st.integers(1, 4), st.integers(1, 40)), elements=finite))
def test_scaled_rows_round_trip(x: np.ndarray) -> None:
    amax = np.max(np.abs(x), axis=-1, keepdims=True)
    assert np.all(np.abs(fake_quant_int8_rows(x) - x) <= amax / 127 * 0.5 * (1 + 1e-9) + 1e-300)
    assert np.all(np.abs(fake_quant_fp8_rows(x) - x) <= np.maximum(
        np.abs(x) * 2.0**-4, amax / 448 * 2.0**-10) * (1 + 1e-9) + 1e-300)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 6), m=st.integers(1, 6), k=st.integers(1, 300), seed=st.integers(0, 99))
def test_int8_gemm_equals_dequantized_float_path(n: int, m: int, k: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x, w = rng.standard_normal((n, k)), rng.standard_normal((m, k))
    qx, sx = quantize_rows_int8(x)
    qw, sw = quantize_rows_int8(w)
    exact = int_gemm(qx, sx, qw, sw, exact_int=True)
    # integer accumulation in int64 and in float64 (sums of integers < 2^53) agree bit for bit
    assert np.array_equal(int_gemm(qx, sx, qw, sw), exact)
    # the dequantized float path differs only by float rounding of the products
    deq = (qx * sx[:, None]) @ (qw * sw[:, None]).T
    assert np.allclose(deq, exact, rtol=1e-12, atol=1e-12 * np.abs(exact).max(initial=1.0))
    # with power-of-two scales every dequantized product and partial sum is exact too
    px, pw = 2.0 ** np.round(np.log2(sx)), 2.0 ** np.round(np.log2(sw))
    assert np.array_equal((qx * px[:, None]) @ (qw * pw[:, None]).T, int_gemm(qx, px, qw, pw))


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError):
        quantize_int(np.ones((2, 4)), 5)
    with pytest.raises(ConfigError):
        quantize_int(np.ones((2, 4)), 8, group_size=0)
    with pytest.raises(ConfigError):
        fp8_round(np.ones(2), "e3m4")
