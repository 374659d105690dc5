"""How much does the KV cache save? Speedup over no cache against output length.

Llama-2-7B on a100-sxm4-80gb (timing from the cost model; the functional check that tokens are
identical lives in the tests and the demo). Prints a table and writes results/kv_cache_speedup.json.
The claim to check: "the KV cache makes generation 10-50x faster".

    python benchmarks/kv_cache_speedup.py [--prompt-len 512] [--batch-sizes 1 8]
"""

from __future__ import annotations

import argparse

from common import print_table, write_json

from sim.engine.args import EngineArgs
from sim.engine.engine import Engine
from sim.workload.specs import RequestSpec


def e2e_s(kv_cache: str, batch_size: int, prompt_len: int, output_len: int) -> tuple[float, int]:
    engine = Engine(EngineArgs(mode="timing", kv_cache=kv_cache, max_num_seqs=batch_size,
                               max_num_batched_tokens=batch_size * 4096))
    specs = [RequestSpec(f"r{i}", 0.0, prompt_len, output_len) for i in range(batch_size)]
    result = engine.run(specs)
    return max(r.finished_s for r in result.requests), result.stats.num_tokens_computed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--output-lens", type=int, nargs="+",
                        default=[16, 64, 128, 256, 512, 1024, 2048, 3584])
    ns = parser.parse_args()
    rows = []
    for batch in ns.batch_sizes:
        for out_len in ns.output_lens:
            if ns.prompt_len + out_len > 4096:
                continue
            none_s, none_tok = e2e_s("none", batch, ns.prompt_len, out_len)
            kv_s, kv_tok = e2e_s("contiguous", batch, ns.prompt_len, out_len)
            rows.append({
                "batch": batch, "prompt": ns.prompt_len, "output": out_len,
                "no_cache_s": round(none_s, 3), "kv_cache_s": round(kv_s, 3),
                "speedup": round(none_s / kv_s, 2),
                "no_cache_tok_per_s": round(batch * out_len / none_s, 1),
                "kv_cache_tok_per_s": round(batch * out_len / kv_s, 1),
                "tokens_computed_ratio": round(none_tok / kv_tok, 1),
            })
    print_table("KV cache speedup, Llama-2-7B fp16 on a100-sxm4-80gb (end-to-end time of the batch)",
                rows)
    print(f"\nwrote {write_json('kv_cache_speedup', rows)}")


if __name__ == "__main__":
    main()
