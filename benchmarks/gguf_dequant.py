"""GGUF dequantization speed: ours (`sim.model.gguf_quants`) against gguf-py's `gguf.quants`.

For every format we read, a few MB of random blocks (fixed seed, float16 scales kept finite) are
dequantized by both; each side runs `--repeats` times and the best time counts (the least
disturbed by other work on the machine). The outputs are checked bit for bit first, so a faster
but different result cannot win. Prints a table (MB/s of packed input, speed-up) and writes
results/gguf_dequant.json. Small on purpose: `--mb 4` takes a few seconds on one core.

    python benchmarks/gguf_dequant.py [--mb 4] [--repeats 5]

References: gguf-py `gguf/quants.py` (llama.cpp's NumPy (de)quantizers).
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import struct
import time
from collections.abc import Callable

import numpy as np
from common import print_table, write_json

from sim.model.gguf_quants import FORMATS, dequantize

# where each block format keeps its float16 scales (kept finite so timings see no NaN paths)
SCALES_AT = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2],
             "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}


def random_blocks(fmt: str, num_bytes: int, rng: np.random.Generator) -> np.ndarray:
    """About `num_bytes` of random `fmt` blocks, `[n_bytes]` uint8, scales finite."""
    _, type_size, _ = FORMATS[fmt]
    num_blocks = max(1, num_bytes // type_size)
    raw = rng.integers(0, 256, (num_blocks, type_size), dtype=np.uint8)  # [n, type_size]
    if fmt in ("F32", "F16", "BF16"):
        values = rng.standard_normal(num_blocks * type_size // {"F32": 4}.get(fmt, 2))
        dtype = {"F32": "<f4", "F16": "<f2"}.get(fmt)
        if dtype is None:  # BF16: the top half of float32 bits
            return (values.astype(np.float32).view(np.uint32) >> 16).astype("<u2").view(np.uint8)
        return values.astype(dtype).view(np.uint8)
    scale = np.frombuffer(struct.pack("<e", 0.01), np.uint8)  # [2]
    for at in SCALES_AT[fmt]:
        raw[:, at: at + 2] = scale
    return raw.reshape(-1)


def best_time_s(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    import gguf

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=4.0, help="MB of packed input per format")
    parser.add_argument("--repeats", type=int, default=5, help="runs per side; the best counts")
    ns = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for fmt, (block_size, type_size, _) in FORMATS.items():
        raw = random_blocks(fmt, int(ns.mb * 1e6), rng)  # [n_bytes]
        num_values = raw.size // type_size * block_size
        qtype = gguf.GGMLQuantizationType[fmt]
        ours = dequantize(raw, fmt, (num_values,))
        theirs = gguf.quants.dequantize(raw.reshape(1, -1), qtype).reshape(-1)
        if not np.array_equal(ours.view(np.uint32), theirs.view(np.uint32)):
            raise SystemExit(f"{fmt}: ours and gguf.quants differ; fix before timing")
        ours_s = best_time_s(functools.partial(dequantize, raw, fmt, (num_values,)), ns.repeats)
        theirs_s = best_time_s(functools.partial(gguf.quants.dequantize, raw.reshape(1, -1),
                                                 qtype), ns.repeats)
        rows.append({"format": fmt, "input_mb": round(raw.size / 1e6, 2),
                     "ours_mb_per_s": round(raw.size / 1e6 / ours_s, 1),
                     "gguf_mb_per_s": round(raw.size / 1e6 / theirs_s, 1),
                     "speedup": round(theirs_s / ours_s, 2), "bit_exact": True})
    version = importlib.metadata.version("gguf")
    print_table(f"GGUF dequantization, best of {ns.repeats}: ours vs gguf.quants (gguf-py "
                f"{version})", rows)
    path = write_json("gguf_dequant", {"mb": ns.mb, "repeats": ns.repeats,
                                       "gguf_version": version, "rows": rows})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
