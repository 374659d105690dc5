"""Paged attention in NumPy vs contiguous attention: wall time of one batched decode attention.

The functional model's decode attention (`NumpyModel._decode_attention`: read each sequence's
K/V from the store, pad, one batched masked attention) runs over the same K/V held two ways:
`ContiguousKVStore` (one slab per sequence) and `PagedKVStore` at block size 16 with the blocks
scattered over the pool (a random permutation, as after many allocations and frees); the paged
read gathers through the block table with one fancy index per sequence and layer. Target: paged
within 1.3x of contiguous. Both give bit-identical outputs (checked here too).

Usage: .venv/bin/python benchmarks/paged_attention_speed.py [--repeats 7]
Writes results/paged_attention_speed.json.

References: Kwon et al., SOSP'23, section 7.1 (PagedAttention kernel overhead vs contiguous:
20-26 % slower attention kernel, negligible end to end).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
from common import print_table, write_json

from sim.model.kv_store import ContiguousKVStore
from sim.model.numpy_model import NumpyModel, SeqChunk
from sim.model.paged_store import PagedKVStore
from sim.model.zoo import resolve_model

CASES = [  # (n_seq, max context, n_head, n_kv_head, d_head)
    (16, 512, 32, 32, 128),
    (32, 1024, 32, 8, 128),
    (64, 1024, 32, 8, 128),
    (128, 256, 32, 32, 128),
]
BLOCK_SIZE = 16


def case(n_seq: int, ctx: int, n_head: int, n_kv: int, d_head: int, repeats: int,
         rng: np.random.Generator) -> dict[str, Any]:
    cfg = resolve_model("meta-llama/Llama-2-7b-hf").replace(
        n_layer=1, n_head=n_head, n_kv_head=n_kv, d_head=d_head, n_embd=n_head * d_head)
    model = NumpyModel(cfg, weights=None, dtype="float32")  # type: ignore[arg-type]
    lengths = rng.integers(ctx // 2, ctx + 1, size=n_seq)  # [n_seq] keys incl. the new token
    cont = ContiguousKVStore(1, n_kv, d_head, "float32")
    paged = PagedKVStore(1, n_kv, d_head, BLOCK_SIZE, "float32")
    blocks_per_seq = -(-lengths // BLOCK_SIZE)  # [n_seq]
    physical = rng.permutation(int(blocks_per_seq.sum()))  # [n_blocks] scattered
    offsets = np.concatenate([[0], np.cumsum(blocks_per_seq)])  # [n_seq + 1]
    chunks = []
    for s, n in enumerate(lengths.tolist()):
        k = rng.standard_normal((n, n_kv, d_head), dtype=np.float32)  # [n, n_kv, d_head]
        v = rng.standard_normal((n, n_kv, d_head), dtype=np.float32)  # [n, n_kv, d_head]
        cont.allocate(s, n)
        cont.write(s, 0, 0, k, v)
        paged.prepare(s, physical[offsets[s]:offsets[s + 1]].tolist(), 0)
        paged.write(s, 0, 0, k, v)
        chunks.append(SeqChunk(s, np.zeros(1, dtype=np.int64), n - 1))
    q = rng.standard_normal((n_seq, n_head, d_head), dtype=np.float32)  # [n_seq, n_head, d]
    q_pos = lengths - 1  # [n_seq]

    stores = {"contiguous": cont, "paged": paged}
    outs = {name: model._decode_attention(0, chunks, q, q_pos, store, None).copy()
            for name, store in stores.items()}  # warm-up
    times: dict[str, list[float]] = {name: [] for name in stores}
    for _ in range(repeats):  # interleaved, so load drift hits both alike
        for name, store in stores.items():
            t0 = time.perf_counter()
            model._decode_attention(0, chunks, q, q_pos, store, None)
            times[name].append(time.perf_counter() - t0)
    cont_s, paged_s = (float(np.median(times[name])) for name in stores)
    cont_out, paged_out = outs["contiguous"], outs["paged"]
    return {
        "n_seq": n_seq, "max_ctx": ctx, "heads/kv": f"{n_head}/{n_kv}", "d_head": d_head,
        "contiguous_ms": round(1e3 * cont_s, 2), "paged_ms": round(1e3 * paged_s, 2),
        "ratio": round(paged_s / cont_s, 3),
        "identical": bool(np.array_equal(cont_out, paged_out)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ns = ap.parse_args()
    rng = np.random.default_rng(0)
    rows = [case(*c, repeats=ns.repeats, rng=rng) for c in CASES]
    print_table(f"batched decode attention, one layer, float32, block size {BLOCK_SIZE} "
                "(median wall time)", rows)
    worst = max(r["ratio"] for r in rows)
    print(f"\nworst paged/contiguous ratio {worst:.2f} (target <= 1.3): "
          f"{'met' if worst <= 1.3 else 'NOT met'}")
    path = write_json("paged_attention_speed", {"block_size": BLOCK_SIZE, "rows": rows,
                                                "worst_ratio": worst, "target": 1.3})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
