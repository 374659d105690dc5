"""llama.cpp's tensor storage formats, dequantized to float32 in vectorised NumPy.

A GGUF tensor is a flat run of bytes. Plain formats store one value per element (F32, F16,
BF16). Block formats store `block_size` values in `type_size` bytes: a float16 scale `d` (and a
minimum `m`) per block of 32, then the packed integers:

| format | values/block | bytes/block | one value |
| --- | --- | --- | --- |
| Q8_0 | 32 | 34 | `d * q`, q int8 |
| Q4_0 | 32 | 18 | `d * (q - 8)`, q 4-bit; byte j holds values j (low nibble) and j + 16 (high) |
| Q4_1 | 32 | 20 | `d * q + m`, same packing as Q4_0 |
| Q5_0 | 32 | 22 | `d * (q - 16)`, q = Q4_0's nibble + bit j of a little-endian uint32 `qh` as bit 4 |
| Q5_1 | 32 | 24 | `d * q + m`, q as Q5_0 |
| Q2_K | 256 | 84 | 16 sub-blocks of 16: `d * sc_j * q - dmin * m_j`, q 2-bit, sc_j, m_j 4-bit |
| Q3_K | 256 | 110 | 16 sub-blocks of 16: `d * (sc_j - 32) * (q - 4 h)`, q 2-bit, h = 1 - mask bit |
| Q4_K | 256 | 144 | 8 sub-blocks of 32: `d * sc_j * q - dmin * m_j`, 6-bit sc_j, m_j packed in 12 bytes |
| Q5_K | 256 | 176 | as Q4_K, q = nibble + 1 high bit from a 32-byte mask (bit j of byte l: sub-block j) |
| Q6_K | 256 | 210 | 16 sub-blocks of 16: `d * sc_j * (q - 32)`, q = 4 low bits + 2 high bits, sc_j int8 |

In the K-quants, packed bytes are walked in runs of 32: a run of 32 bytes gives 32 values per bit
field (nibble, or 2-bit crumb at shift 0, 2, 4, 6), so a value's sub-block is (run, field) and its
place in it the byte index; every dequantizer here builds `[n, run, field, 32]` arrays with one
broadcast shift and never loops over blocks.

`gguf.quants` (gguf-py, llama.cpp's Python package) dequantizes the same formats in NumPy; the
parity tests check ours bit for bit against it on random blocks, and `benchmarks/gguf_dequant.py`
measures both: ours is kept because it is faster on every block format (1.04x to 3.3x, 4 MB
per format on a shared 2-core machine: Q8_0 3.3x, Q6_K/Q5_0/Q4_0 ~1.65x, the other K-quants
1.15-1.4x) and as fast on F16 (one widening copy each) and F32 (a view each).

Every function takes the raw bytes (`uint8`, any shape whose size is a whole number of blocks)
and returns float32 values in storage order; the caller reshapes.

References: ggml `ggml-quants.c` (`dequantize_row_q4_0`, `_q4_1`, `_q5_0`, `_q5_1`, `_q8_0`,
`_q2_K`, `_q3_K`, `_q4_K`, `_q5_K`, `_q6_K`, `get_scale_min_k4`) and `ggml-common.h` (the block
structs `block_q5_0`, `block_q2_K`, `block_q3_K`, `block_q5_K`, ...); the GGUF specification
(ggml-org/ggml `docs/gguf.md`); gguf-py `gguf/quants.py` (the NumPy reference checked against).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from sim.core.errors import ConfigError

QK = 32  # values per block of the simple formats
QK_K = 256  # values per super-block of the K-quants


def _f16(raw: np.ndarray) -> np.ndarray:
    """Little-endian float16 from a `[n, 2]` byte array, widened to float32 `[n, 1]`."""
    return np.ascontiguousarray(raw).view("<f2").astype(np.float32)  # [n, 1]


def _blocks(raw: np.ndarray, type_size: int, name: str) -> np.ndarray:
    flat = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1)  # [n_bytes]
    if flat.size % type_size:
        raise ConfigError(f"{name} data of {flat.size} bytes is not a whole number of "
                          f"{type_size}-byte blocks (a truncated or corrupt tensor)")
    return flat.reshape(-1, type_size)  # [n_blocks, type_size]


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """Bytes `[n, 16]` -> 4-bit values `[n, 32]`: low nibbles first, then high nibbles."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)  # [n, 32]


def dequantize_f32(raw: np.ndarray) -> np.ndarray:
    """The stored values themselves, a view (no copy: `build_weights` copies into the model's
    dtype anyway; a second copy here made F32 ~60x slower than gguf-py's view)."""
    return np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1).view("<f4")  # [n]


def dequantize_f16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1).view("<f2").astype(np.float32)


def dequantize_bf16(raw: np.ndarray) -> np.ndarray:
    bits = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1).view("<u2")  # [n]
    return (bits.astype(np.uint32) << 16).view(np.float32)  # [n], exact


def dequantize_q8_0(raw: np.ndarray) -> np.ndarray:
    b = _blocks(raw, 2 + QK, "Q8_0")  # [n, 34]
    d = _f16(b[:, :2])  # [n, 1]
    q = b[:, 2:].view(np.int8)  # [n, 32]
    return (d * q).reshape(-1)  # [n * 32]


def dequantize_q4_0(raw: np.ndarray) -> np.ndarray:
    b = _blocks(raw, 2 + QK // 2, "Q4_0")  # [n, 18]
    d = _f16(b[:, :2])  # [n, 1]
    q = _nibbles(b[:, 2:]).astype(np.int8) - np.int8(8)  # [n, 32]
    return (d * q).reshape(-1)  # [n * 32]


def dequantize_q4_1(raw: np.ndarray) -> np.ndarray:
    b = _blocks(raw, 4 + QK // 2, "Q4_1")  # [n, 20]
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])  # [n, 1] x2
    q = _nibbles(b[:, 4:])  # [n, 32]
    return (d * q + m).reshape(-1)  # [n * 32]


def _q5_values(qs: np.ndarray, qh: np.ndarray) -> np.ndarray:
    """5-bit values `[n, 32]` from nibbles `[n, 16]` and the 4 bytes of a little-endian uint32
    high-bit mask `[n, 4]` (bit j is bit 4 of value j)."""
    bits = np.unpackbits(np.ascontiguousarray(qh), axis=1, bitorder="little")  # [n, 32]
    return _nibbles(qs) | (bits << 4)  # [n, 32]


def dequantize_q5_0(raw: np.ndarray) -> np.ndarray:
    b = _blocks(raw, 2 + 4 + QK // 2, "Q5_0")  # [n, 22]
    d = _f16(b[:, :2])  # [n, 1]
    q = _q5_values(b[:, 6:], b[:, 2:6]).astype(np.int8) - np.int8(16)  # [n, 32]
    return (d * q).reshape(-1)  # [n * 32]


def dequantize_q5_1(raw: np.ndarray) -> np.ndarray:
    b = _blocks(raw, 4 + 4 + QK // 2, "Q5_1")  # [n, 24]
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])  # [n, 1] x2
    q = _q5_values(b[:, 8:], b[:, 4:8])  # [n, 32]
    return (d * q + m).reshape(-1)  # [n * 32]


_CRUMB_SHIFTS = np.array([0, 2, 4, 6], dtype=np.uint8)[None, None, :, None]  # [1, 1, 4, 1]
_BIT_SHIFTS = np.arange(8, dtype=np.uint8)[None, None, :, None]  # [1, 1, 8, 1]


def dequantize_q2_k(raw: np.ndarray) -> np.ndarray:
    b = _blocks(raw, QK_K // 16 + QK_K // 4 + 4, "Q2_K")  # [n, 84]
    n = b.shape[0]
    scales = b[:, 0:16]  # [n, 16]: low nibble the scale, high nibble the min of sub-block j
    qs = b[:, 16:80].reshape(n, 2, 1, 32)  # [n, run, 1, 32]
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])  # [n, 1] x2
    q = ((qs >> _CRUMB_SHIFTS) & 3).reshape(n, 16, 16)  # [n, 16 sub-blocks, 16]
    scale = d * (scales & 0x0F).astype(np.float32)  # [n, 16]
    offset = dmin * (scales >> 4).astype(np.float32)  # [n, 16]
    return (scale[:, :, None] * q - offset[:, :, None]).reshape(-1)  # [n * 256]


def q3_k_scales(packed: np.ndarray) -> np.ndarray:
    """The 16 signed 6-bit scales (minus 32) of a Q3_K block from its 12 packed bytes `[n, 12]`:
    the low 4 bits of scale j are nibble j // 8 of byte j % 8, its high 2 bits the crumb j // 4
    of byte 8 + j % 4. Returns `[n, 16]` int8."""
    low = np.concatenate([packed[:, 0:8] & 0x0F, packed[:, 0:8] >> 4], axis=1)  # [n, 16]
    high = (packed[:, None, 8:12] >> _CRUMB_SHIFTS[0]) & 3  # [n, crumb j // 4, byte j % 4]
    return (low | (high.reshape(-1, 16) << 4)).astype(np.int8) - np.int8(32)  # [n, 16]


def dequantize_q3_k(raw: np.ndarray) -> np.ndarray:
    b = _blocks(raw, QK_K // 8 + QK_K // 4 + 12 + 2, "Q3_K")  # [n, 110]
    n = b.shape[0]
    hmask = b[:, 0:32].reshape(n, 1, 1, 32)  # [n, 1, 1, 32]: bit 4 run + field of value l
    qs = b[:, 32:96].reshape(n, 2, 1, 32)  # [n, run, 1, 32]
    sc = q3_k_scales(b[:, 96:108]).astype(np.float32)  # [n, 16]
    d = _f16(b[:, 108:110])  # [n, 1]
    low = ((qs >> _CRUMB_SHIFTS) & 3).astype(np.int8)  # [n, 2, 4, 32]
    high = ((hmask >> _BIT_SHIFTS) & 1).reshape(n, 2, 4, 32).astype(np.int8)  # [n, 2, 4, 32]
    q = (low - ((1 - high) << 2)).reshape(n, 16, 16)  # [n, 16 sub-blocks, 16]: a clear bit -4
    return ((d * sc)[:, :, None] * q).reshape(-1)  # [n * 256]


def q4_k_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 six-bit scales and mins of a Q4_K block from its 12 packed bytes `[n, 12]`
    (ggml's `get_scale_min_k4`, for all j at once). Returns (sc `[n, 8]`, m `[n, 8]`)."""
    s0, s1, s2 = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]  # [n, 4] x3
    sc = np.concatenate([s0 & 63, (s2 & 0x0F) | ((s0 >> 6) << 4)], axis=1)  # [n, 8]
    mins = np.concatenate([s1 & 63, (s2 >> 4) | ((s1 >> 6) << 4)], axis=1)  # [n, 8]
    return sc, mins


def dequantize_q4_k(raw: np.ndarray) -> np.ndarray:
    b = _blocks(raw, 4 + 12 + QK_K // 2, "Q4_K")  # [n, 144]
    n = b.shape[0]
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])  # [n, 1] x2
    sc, mins = q4_k_scales(b[:, 4:16])  # [n, 8] x2
    qs = b[:, 16:].reshape(n, 4, 32)  # [n, 4, 32]: 32 bytes hold sub-blocks 2j (low), 2j+1 (high)
    q = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(n, 8, 32)  # [n, 8, 32]
    scale = d * sc.astype(np.float32)  # [n, 8]
    offset = dmin * mins.astype(np.float32)  # [n, 8]
    return (scale[:, :, None] * q - offset[:, :, None]).reshape(-1)  # [n * 256]


def dequantize_q5_k(raw: np.ndarray) -> np.ndarray:
    b = _blocks(raw, 4 + 12 + QK_K // 8 + QK_K // 2, "Q5_K")  # [n, 176]
    n = b.shape[0]
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])  # [n, 1] x2
    sc, mins = q4_k_scales(b[:, 4:16])  # [n, 8] x2
    qh = b[:, 16:48].reshape(n, 1, 32)  # [n, 1, 32]: bit j of byte l is bit 4 of sub-block j's l
    qs = b[:, 48:].reshape(n, 4, 32)  # [n, 4, 32]: 32 bytes hold sub-blocks 2j (low), 2j+1 (high)
    low = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(n, 8, 32)  # [n, 8, 32]
    high = (qh >> _BIT_SHIFTS[0]) & 1  # [n, 8, 32]
    q = low | (high << 4)  # [n, 8, 32]
    scale = d * sc.astype(np.float32)  # [n, 8]
    offset = dmin * mins.astype(np.float32)  # [n, 8]
    return (scale[:, :, None] * q - offset[:, :, None]).reshape(-1)  # [n * 256]


def dequantize_q6_k(raw: np.ndarray) -> np.ndarray:
    b = _blocks(raw, QK_K // 2 + QK_K // 4 + QK_K // 16 + 2, "Q6_K")  # [n, 210]
    n = b.shape[0]
    ql = b[:, 0:128].reshape(n, 2, 2, 32)  # [n, half, 2, 32]: low 4 bits
    qh = b[:, 128:192].reshape(n, 2, 1, 32)  # [n, half, 1, 32]: 2 high bits of 4 values each
    sc = b[:, 192:208].view(np.int8).astype(np.float32)  # [n, 16]
    d = _f16(b[:, 208:210])  # [n, 1]
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=2)  # [n, half, 4, 32]
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8)[None, None, :, None]  # [1, 1, 4, 1]
    high = (qh >> shifts) & 3  # [n, half, 4, 32]
    q = (low | (high << 4)).astype(np.int8) - np.int8(32)  # [n, half, 4, 32]
    q16 = q.reshape(n, 16, 16)  # [n, 16 sub-blocks, 16]
    return ((d * sc)[:, :, None] * q16).reshape(-1)  # [n * 256]


# format name -> (values per block, bytes per block, dequantizer)
FORMATS: dict[str, tuple[int, int, Callable[[np.ndarray], np.ndarray]]] = {
    "F32": (1, 4, dequantize_f32),
    "F16": (1, 2, dequantize_f16),
    "BF16": (1, 2, dequantize_bf16),
    "Q8_0": (QK, 34, dequantize_q8_0),
    "Q4_0": (QK, 18, dequantize_q4_0),
    "Q4_1": (QK, 20, dequantize_q4_1),
    "Q5_0": (QK, 22, dequantize_q5_0),
    "Q5_1": (QK, 24, dequantize_q5_1),
    "Q2_K": (QK_K, 84, dequantize_q2_k),
    "Q3_K": (QK_K, 110, dequantize_q3_k),
    "Q4_K": (QK_K, 144, dequantize_q4_k),
    "Q5_K": (QK_K, 176, dequantize_q5_k),
    "Q6_K": (QK_K, 210, dequantize_q6_k),
}


def dequantize(raw: np.ndarray, fmt: str, shape: tuple[int, ...]) -> np.ndarray:
    """float32 values of `shape` (NumPy order: last axis contiguous) from bytes in format `fmt`."""
    if fmt not in FORMATS:
        raise ConfigError(f"GGUF tensor format {fmt} is not supported; supported: "
                          f"{', '.join(FORMATS)} (re-quantize the file, e.g. llama.cpp's "
                          "llama-quantize to Q8_0 or Q4_K_M)")
    block_size, type_size, fn = FORMATS[fmt]
    num = int(np.prod(shape, dtype=np.int64))
    if num % block_size or np.asarray(raw).size != num // block_size * type_size:
        raise ConfigError(f"{fmt} tensor of shape {shape}: expected {num // block_size * type_size}"
                          f" bytes, got {np.asarray(raw).size} (a truncated or corrupt file)")
    return fn(raw).reshape(shape)  # shape
