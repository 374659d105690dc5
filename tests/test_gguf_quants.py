"""GGUF block formats: hand-built blocks dequantize to the values ggml's block layouts define.

Each oracle below is written element by element from the block structs of ggml-common.h
(scalar loops, no vectorisation), independent of the NumPy implementation it checks; gguf-py's
own dequantizer is a second oracle when installed.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.core.errors import ConfigError
from sim.model.gguf_quants import FORMATS, dequantize, q4_k_scales


def f16(x: float) -> bytes:
    return struct.pack("<e", x)


def f16v(b: bytes) -> float:
    return float(struct.unpack("<e", b)[0])


# ---------------------------------------------------------------------------------- scalar oracles
def ref_q8_0(block: bytes) -> list[float]:
    d = np.float32(f16v(block[:2]))
    return [float(d * np.float32(struct.unpack("b", block[2 + i: 3 + i])[0])) for i in range(32)]


def ref_q4(block: bytes, with_min: bool) -> list[float]:
    d = np.float32(f16v(block[:2]))
    m = np.float32(f16v(block[2:4])) if with_min else np.float32(0)
    qs = block[4:] if with_min else block[2:]
    out = [0.0] * 32
    for j in range(16):
        lo, hi = qs[j] & 0x0F, qs[j] >> 4
        if with_min:
            out[j], out[j + 16] = float(d * lo + m), float(d * hi + m)
        else:
            out[j], out[j + 16] = float(d * (lo - 8)), float(d * (hi - 8))
    return out


def ref_scale_min_k4(j: int, q: bytes) -> tuple[int, int]:
    if j < 4:
        return q[j] & 63, q[j + 4] & 63
    return (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4)


def ref_q4_k(block: bytes) -> list[float]:
    d, dmin = np.float32(f16v(block[0:2])), np.float32(f16v(block[2:4]))
    scales, qs = block[4:16], block[16:144]
    out: list[float] = []
    for j in range(4):  # 64 values per pass: sub-blocks 2j (low nibbles), 2j+1 (high)
        sc1, m1 = ref_scale_min_k4(2 * j, scales)
        sc2, m2 = ref_scale_min_k4(2 * j + 1, scales)
        chunk = qs[32 * j: 32 * j + 32]
        out += [float(d * np.float32(sc1) * np.float32(b & 0xF) - dmin * np.float32(m1))
                for b in chunk]
        out += [float(d * np.float32(sc2) * np.float32(b >> 4) - dmin * np.float32(m2))
                for b in chunk]
    return out


def ref_q6_k(block: bytes) -> list[float]:
    ql, qh = block[0:128], block[128:192]
    sc = struct.unpack("16b", block[192:208])
    d = np.float32(f16v(block[208:210]))
    y = [0.0] * 256
    for half in range(2):
        L, H, S, Y = ql[64 * half:], qh[32 * half:], sc[8 * half:], 128 * half
        for i in range(32):
            s = i // 16
            q1 = ((L[i] & 0xF) | (((H[i] >> 0) & 3) << 4)) - 32
            q2 = ((L[i + 32] & 0xF) | (((H[i] >> 2) & 3) << 4)) - 32
            q3 = ((L[i] >> 4) | (((H[i] >> 4) & 3) << 4)) - 32
            q4 = ((L[i + 32] >> 4) | (((H[i] >> 6) & 3) << 4)) - 32
            for off, q, k in ((0, q1, 0), (32, q2, 2), (64, q3, 4), (96, q4, 6)):
                y[Y + i + off] = float(d * np.float32(S[s + k]) * np.float32(q))
    return y


def random_block(fmt: str, rng: np.random.Generator) -> bytes:
    """Random packed integers with finite, modest float16 scales in the right places."""
    _, size, _ = FORMATS[fmt]
    raw = bytearray(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
    scale_at = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q4_K": [0, 2], "Q6_K": [208]}[fmt]
    for at in scale_at:
        raw[at: at + 2] = f16(float(rng.uniform(-2, 2)))
    return bytes(raw)


ORACLES = {"Q8_0": ref_q8_0, "Q4_0": lambda b: ref_q4(b, False), "Q4_1": lambda b: ref_q4(b, True),
           "Q4_K": ref_q4_k, "Q6_K": ref_q6_k}


# ---------------------------------------------------------------------------------- hand-built
def test_q8_0_hand_built_block():
    qs = list(range(-16, 16))
    block = f16(0.5) + struct.pack("32b", *qs)
    np.testing.assert_array_equal(dequantize(np.frombuffer(block, np.uint8), "Q8_0", (32,)),
                                  0.5 * np.array(qs, dtype=np.float32))


def test_q4_0_and_q4_1_hand_built_blocks():
    # byte j holds value j in its low nibble and value j + 16 in its high nibble
    low, high = np.arange(16), 15 - np.arange(16)
    qs = bytes((low | (high << 4)).astype(np.uint8))
    values = np.concatenate([low, high]).astype(np.float32)  # the 4-bit values in element order
    got = dequantize(np.frombuffer(f16(2.0) + qs, np.uint8), "Q4_0", (32,))
    np.testing.assert_array_equal(got, 2.0 * (values - 8))
    got = dequantize(np.frombuffer(f16(0.25) + f16(-1.0) + qs, np.uint8), "Q4_1", (32,))
    np.testing.assert_array_equal(got, 0.25 * values - 1.0)


def test_q4_k_packed_scales_hand_built():
    # sub-blocks 0-3 keep 6-bit scale/min in bytes 0-7; 4-7 split them: 4 low bits in bytes 8-11,
    # 2 high bits in the top of bytes 0-3 (scales) and 4-7 (mins)
    sc = np.array([1, 2, 3, 63, 17, 33, 49, 62])
    mn = np.array([5, 6, 7, 8, 40, 50, 60, 31])
    packed = np.zeros(12, dtype=np.uint8)
    packed[0:4] = sc[:4] | ((sc[4:] >> 4) << 6)
    packed[4:8] = mn[:4] | ((mn[4:] >> 4) << 6)
    packed[8:12] = (sc[4:] & 0xF) | ((mn[4:] & 0xF) << 4)
    got_sc, got_mn = q4_k_scales(packed[None, :])
    np.testing.assert_array_equal(got_sc[0], sc)
    np.testing.assert_array_equal(got_mn[0], mn)
    # a whole block: all nibbles 3, d = 1, dmin = 0.5 -> sc_j * 3 - 0.5 * m_j per sub-block
    block = f16(1.0) + f16(0.5) + packed.tobytes() + bytes([0x33] * 128)
    got = dequantize(np.frombuffer(block, np.uint8), "Q4_K", (256,)).reshape(8, 32)
    np.testing.assert_array_equal(got, np.repeat((3.0 * sc - 0.5 * mn)[:, None], 32, axis=1))


def test_q6_k_hand_built_block():
    # value q (0..63) at every element: low 4 bits in ql, high 2 bits in qh; scales 1..16
    q = 45  # low 13, high 2
    ql = bytes([(q & 0xF) | ((q & 0xF) << 4)] * 128)
    h = q >> 4
    qh = bytes([h | (h << 2) | (h << 4) | (h << 6)] * 64)
    scales = struct.pack("16b", *range(-8, 8))
    block = ql + qh + scales + f16(0.5)
    got = dequantize(np.frombuffer(block, np.uint8), "Q6_K", (256,)).reshape(16, 16)
    expect = 0.5 * np.arange(-8, 8)[:, None] * (q - 32) * np.ones((16, 16))
    np.testing.assert_array_equal(got, expect.astype(np.float32))


@pytest.mark.parametrize("fmt", sorted(ORACLES))
def test_random_blocks_match_the_scalar_oracle(fmt):
    rng = np.random.default_rng(7)
    blocks = [random_block(fmt, rng) for _ in range(5)]
    raw = np.frombuffer(b"".join(blocks), np.uint8)
    n = FORMATS[fmt][0] * len(blocks)
    got = dequantize(raw, fmt, (len(blocks), n // len(blocks)))
    expect = np.array([ORACLES[fmt](b) for b in blocks], dtype=np.float32)
    np.testing.assert_allclose(got, expect, rtol=1e-6, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(st.sampled_from(sorted(ORACLES)), st.integers(0, 2**32 - 1))
def test_property_blocks_match_the_scalar_oracle(fmt, seed):
    block = random_block(fmt, np.random.default_rng(seed))
    got = dequantize(np.frombuffer(block, np.uint8), fmt, (FORMATS[fmt][0],))
    np.testing.assert_allclose(got, np.array(ORACLES[fmt](block), np.float32), rtol=1e-6,
                               atol=1e-6)


@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"])
def test_matches_gguf_py(fmt):
    gguf = pytest.importorskip("gguf")
    rng = np.random.default_rng(3)
    raw = np.frombuffer(b"".join(random_block(fmt, rng) for _ in range(64)), np.uint8)
    theirs = gguf.quants.dequantize(raw[None, :], gguf.GGMLQuantizationType[fmt]).reshape(-1)
    np.testing.assert_array_equal(dequantize(raw, fmt, (theirs.size,)), theirs)


def test_plain_formats_round_trip():
    x = np.random.default_rng(0).standard_normal(64).astype(np.float32)  # [64]
    np.testing.assert_array_equal(dequantize(x.view(np.uint8), "F32", (8, 8)), x.reshape(8, 8))
    h = x.astype(np.float16)
    np.testing.assert_array_equal(dequantize(h.view(np.uint8), "F16", (64,)), h.astype(np.float32))
    bf = (x.view(np.uint32) >> 16).astype(np.uint16)  # truncated bfloat16 bits
    expect = (bf.astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_array_equal(dequantize(bf.view(np.uint8), "BF16", (64,)), expect)


def test_quantize_round_trip_error_is_bounded():
    gguf = pytest.importorskip("gguf")
    x = np.random.default_rng(1).standard_normal((4, 256)).astype(np.float32)  # [4, 256]
    for fmt, tol in (("Q8_0", 0.02), ("Q4_0", 0.35), ("Q4_1", 0.3)):
        q = gguf.quants.quantize(x, gguf.GGMLQuantizationType[fmt])
        assert np.abs(dequantize(q, fmt, x.shape) - x).max() < tol, fmt


def test_bad_sizes_and_formats_are_clear_errors():
    with pytest.raises(ConfigError, match="not supported"):
        dequantize(np.zeros(4, np.uint8), "IQ2_XXS", (2,))
    with pytest.raises(ConfigError, match="expected 34 bytes"):
        dequantize(np.zeros(30, np.uint8), "Q8_0", (32,))
