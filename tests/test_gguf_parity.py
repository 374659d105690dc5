"""GGUF block formats against two references: gguf-py's `gguf.quants` (bit for bit, every format
we support, random blocks including NaN/inf scales) and, for the formats added last (Q5_0, Q5_1,
Q2_K, Q3_K, Q5_K), scalar oracles written loop by loop from ggml's `dequantize_row_*`, so a bug
shared with gguf-py would still be caught. We implement no quantizer: gguf-py's quantized output
is dequantized by ours exactly as by theirs, and close to the input."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.core.errors import ConfigError
from sim.model.gguf_quants import FORMATS, dequantize

gguf = pytest.importorskip("gguf", reason="parity tests need gguf-py: pip install 'infersim[dev]'")

QUANTIZERS = [f for f in ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
              if getattr(gguf.quants, f, None) is not None]


def theirs(raw: np.ndarray, fmt: str) -> np.ndarray:
    return gguf.quants.dequantize(raw.reshape(1, -1), gguf.GGMLQuantizationType[fmt]).reshape(-1)


def f16(x: float) -> bytes:
    return struct.pack("<e", x)


def f16v(b: bytes) -> np.float32:
    return np.float32(struct.unpack("<e", b)[0])


# ---------------------------------------------------------------------------------- gguf-py
@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("seed", [0, 1])
def test_random_bytes_bit_exact_with_gguf_py(fmt: str, seed: int) -> None:
    """Every byte random (scales too, so NaN/inf/subnormal float16 scales occur): identical bits."""
    _, type_size, _ = FORMATS[fmt]
    raw = np.random.default_rng(seed).integers(0, 256, 300 * type_size, dtype=np.uint8)
    with np.errstate(invalid="ignore", over="ignore"):
        expect = theirs(raw, fmt)
        got = dequantize(raw, fmt, (expect.size,))
    assert got.dtype == expect.dtype == np.float32
    np.testing.assert_array_equal(got.view(np.uint32), expect.view(np.uint32))


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(sorted(FORMATS)), st.integers(1, 8), st.integers(0, 2**32 - 1))
def test_property_bit_exact_with_gguf_py(fmt: str, num_blocks: int, seed: int) -> None:
    _, type_size, _ = FORMATS[fmt]
    raw = np.random.default_rng(seed).integers(0, 256, num_blocks * type_size, dtype=np.uint8)
    with np.errstate(invalid="ignore", over="ignore"):
        expect = theirs(raw, fmt)
        got = dequantize(raw, fmt, (expect.size,))
    np.testing.assert_array_equal(got.view(np.uint32), expect.view(np.uint32))


@pytest.mark.parametrize("fmt", QUANTIZERS)
def test_gguf_py_quantized_tensors_dequantize_identically(fmt: str) -> None:
    x = np.random.default_rng(2).standard_normal((8, 256)).astype(np.float32)  # [8, 256]
    q = gguf.quants.quantize(x, gguf.GGMLQuantizationType[fmt])  # [8, bytes per row]
    got = dequantize(q, fmt, x.shape)  # [8, 256]
    np.testing.assert_array_equal(got, gguf.quants.dequantize(q, gguf.GGMLQuantizationType[fmt]))
    bits = {"Q8_0": 8, "Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5}[fmt]
    step = np.abs(x).max() / 2 ** (bits - 1)  # the coarsest block's quantization step
    assert np.abs(got - x).max() <= step


# ---------------------------------------------------------------------------------- ggml loops
def ref_q5(block: bytes, with_min: bool) -> list[float]:
    """ggml `dequantize_row_q5_0` / `_q5_1`."""
    d = f16v(block[0:2])
    m = f16v(block[2:4]) if with_min else np.float32(0)
    at = 4 if with_min else 2
    (qh,) = struct.unpack("<I", block[at: at + 4])
    qs = block[at + 4: at + 20]
    y = [0.0] * 32
    for j in range(16):
        xh_0 = ((qh >> j) << 4) & 0x10
        xh_1 = (qh >> (j + 12)) & 0x10
        x0 = (qs[j] & 0x0F) | xh_0
        x1 = (qs[j] >> 4) | xh_1
        if with_min:
            y[j], y[j + 16] = float(np.float32(x0) * d + m), float(np.float32(x1) * d + m)
        else:
            y[j], y[j + 16] = float(np.float32(x0 - 16) * d), float(np.float32(x1 - 16) * d)
    return y


def ref_q2_k(block: bytes) -> list[float]:
    """ggml `dequantize_row_q2_K`."""
    scales, q, d, dmin = block[0:16], block[16:80], f16v(block[80:82]), f16v(block[82:84])
    y: list[float] = []
    is_ = 0
    for n in range(2):
        qq = q[32 * n: 32 * n + 32]
        for shift in (0, 2, 4, 6):
            for half in range(2):
                sc = scales[is_]
                is_ += 1
                dl, ml = d * np.float32(sc & 0xF), dmin * np.float32(sc >> 4)
                y += [float(dl * np.float32((qq[16 * half + i] >> shift) & 3) - ml)
                      for i in range(16)]
    return y


def ref_q3_k_scales(packed: bytes) -> list[int]:
    """ggml's kmask unpacking of the 12 scale bytes into 16 int8 scales."""
    aux = [*struct.unpack("<3I", packed), 0]
    km1, km2 = 0x03030303, 0x0F0F0F0F
    tmp = aux[2]
    aux[2] = ((aux[0] >> 4) & km2) | (((tmp >> 4) & km1) << 4)
    aux[3] = ((aux[1] >> 4) & km2) | (((tmp >> 6) & km1) << 4)
    aux[0] = (aux[0] & km2) | (((tmp >> 0) & km1) << 4)
    aux[1] = (aux[1] & km2) | (((tmp >> 2) & km1) << 4)
    return list(struct.unpack("16b", struct.pack("<4I", *aux)))


def ref_q3_k(block: bytes) -> list[float]:
    """ggml `dequantize_row_q3_K`."""
    hm, q, scales, d_all = block[0:32], block[32:96], ref_q3_k_scales(block[96:108]), f16v(
        block[108:110])
    y: list[float] = []
    is_, m = 0, 1
    for n in range(2):
        qq = q[32 * n: 32 * n + 32]
        for shift in (0, 2, 4, 6):
            for half in range(2):
                dl = d_all * np.float32(scales[is_] - 32)
                is_ += 1
                for i in range(16 * half, 16 * half + 16):
                    v = ((qq[i] >> shift) & 3) - (0 if hm[i] & m else 4)
                    y.append(float(dl * np.float32(v)))
            m <<= 1
    return y


def scale_min_k4(j: int, q: bytes) -> tuple[int, int]:
    """ggml `get_scale_min_k4`."""
    if j < 4:
        return q[j] & 63, q[j + 4] & 63
    return (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4)


def ref_q5_k(block: bytes) -> list[float]:
    """ggml `dequantize_row_q5_K`."""
    d, dmin, scales = f16v(block[0:2]), f16v(block[2:4]), block[4:16]
    qh, ql = block[16:48], block[48:176]
    y: list[float] = []
    u1, u2 = 1, 2
    for j in range(4):
        sc1, m1 = scale_min_k4(2 * j, scales)
        sc2, m2 = scale_min_k4(2 * j + 1, scales)
        d1, mm1 = d * np.float32(sc1), dmin * np.float32(m1)
        d2, mm2 = d * np.float32(sc2), dmin * np.float32(m2)
        chunk = ql[32 * j: 32 * j + 32]
        y += [float(d1 * np.float32((chunk[i] & 0xF) + (16 if qh[i] & u1 else 0)) - mm1)
              for i in range(32)]
        y += [float(d2 * np.float32((chunk[i] >> 4) + (16 if qh[i] & u2 else 0)) - mm2)
              for i in range(32)]
        u1, u2 = u1 << 2, u2 << 2
    return y


ORACLES = {"Q5_0": lambda b: ref_q5(b, False), "Q5_1": lambda b: ref_q5(b, True),
           "Q2_K": ref_q2_k, "Q3_K": ref_q3_k, "Q5_K": ref_q5_k}
SCALES_AT = {"Q5_0": [0], "Q5_1": [0, 2], "Q2_K": [80, 82], "Q3_K": [108], "Q5_K": [0, 2]}


def random_block(fmt: str, rng: np.random.Generator) -> bytes:
    _, size, _ = FORMATS[fmt]
    raw = bytearray(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
    for at in SCALES_AT[fmt]:
        raw[at: at + 2] = f16(float(rng.uniform(-2, 2)))
    return bytes(raw)


@pytest.mark.parametrize("fmt", sorted(ORACLES))
def test_new_formats_match_the_ggml_loops(fmt: str) -> None:
    rng = np.random.default_rng(11)
    blocks = [random_block(fmt, rng) for _ in range(6)]
    raw = np.frombuffer(b"".join(blocks), np.uint8)
    got = dequantize(raw, fmt, (len(blocks), FORMATS[fmt][0]))
    expect = np.array([ORACLES[fmt](b) for b in blocks], dtype=np.float32)
    np.testing.assert_array_equal(got, expect)


def test_q5_0_hand_built_block() -> None:
    # value j = 5-bit (j + 7) % 32: nibble in qs (j < 16 low, else high), bit 4 in qh bit j
    values = (np.arange(32) + 7) % 32
    qh = sum(int(v >> 4) << j for j, v in enumerate(values))
    qs = bytes(int(values[j] & 0xF) | (int(values[j + 16] & 0xF) << 4) for j in range(16))
    block = f16(0.5) + struct.pack("<I", qh) + qs
    got = dequantize(np.frombuffer(block, np.uint8), "Q5_0", (32,))
    np.testing.assert_array_equal(got, 0.5 * (values - 16).astype(np.float32))


def test_q3_k_mask_bit_set_means_no_offset() -> None:
    # all crumbs 2, all scales 33 (-> 1), d = 1: a set mask bit gives 2, a clear one 2 - 4
    packed = np.zeros(12, np.uint8)
    packed[0:8] = 0x11  # low nibbles 1 for scales 0..15
    packed[8:12] = 0b10101010  # high crumbs 2 -> 1 + 32 = 33
    hmask = bytes([0xFF] * 16 + [0x00] * 16)  # values l < 16 of every sub-block set
    block = hmask + bytes([0xAA] * 64) + packed.tobytes() + f16(1.0)
    got = dequantize(np.frombuffer(block, np.uint8), "Q3_K", (16, 16))
    np.testing.assert_array_equal(got[0::2], 2.0)  # sub-blocks of bytes l < 16
    np.testing.assert_array_equal(got[1::2], -2.0)


def test_new_formats_size_errors() -> None:
    for fmt, size in (("Q5_0", 22), ("Q5_1", 24), ("Q2_K", 84), ("Q3_K", 110), ("Q5_K", 176)):
        with pytest.raises(ConfigError, match=f"expected {size} bytes"):
            dequantize(np.zeros(size - 1, np.uint8), fmt, (FORMATS[fmt][0],))
