"""Simulation speed: simulated requests and tokens per wall-clock second.

- timing-only, the whole Azure conv trace (19,366 requests), Llama-2-7B on a100-sxm4-80gb;
- functional with the default tiny proxy, on the first `--functional-requests` of the same trace
  (lengths clipped to keep the run short);
- optionally (`--million`) one million synthetic requests in timing-only mode, with peak RSS.

Prints a table and writes results/sim_speed.json.

    python benchmarks/sim_speed.py [--functional-requests 200] [--million]
"""

from __future__ import annotations

import argparse
import resource
import time

from common import print_table, trace_path, write_json

from sim.engine.args import EngineArgs
from sim.engine.engine import Engine
from sim.workload.specs import load_azure_trace, make_workload, workload_from_trace


def measure(label: str, engine: Engine, workload, num_requests: int) -> dict:
    start = time.perf_counter()
    result = engine.run(workload, keep_requests=False)
    wall_s = time.perf_counter() - start
    summary = result.summary
    return {
        "run": label,
        "requests": num_requests,
        "completed": summary.num_completed,
        "steps": result.stats.num_steps,
        "output_tokens": summary.total_output_tokens,
        "simulated_s": round(summary.duration_s, 1),
        "wall_s": round(wall_s, 2),
        "requests_per_wall_s": round(num_requests / wall_s, 1),
        "output_tokens_per_wall_s": round(summary.total_output_tokens / wall_s, 1),
        "steps_per_wall_s": round(result.stats.num_steps / wall_s, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--functional-requests", type=int, default=200)
    parser.add_argument("--million", action="store_true",
                        help="also run 1,000,000 synthetic requests (timing-only)")
    ns = parser.parse_args()
    trace = load_azure_trace(trace_path("conv"))
    rows = [measure("timing, whole conv trace", Engine(EngineArgs(mode="timing")),
                    workload_from_trace(trace), len(trace))]
    n = ns.functional_requests
    rows.append(measure(
        f"functional tiny proxy, first {n} of conv (prompt<=512, output<=128)",
        Engine(EngineArgs(mode="functional")),
        workload_from_trace(trace, num_requests=n, max_prompt_len=512, max_output_len=128), n))
    if ns.million:
        rows.append(measure("timing, 1M synthetic (64 in / 8 out, 400 req/s)",
                            Engine(EngineArgs(mode="timing")),
                            make_workload(1_000_000, 400.0, 64, 8, seed=0), 1_000_000))
    print_table("Simulation speed (one core)", rows)
    print(f"\nwrote {write_json('sim_speed', rows)}")


if __name__ == "__main__":
    main()
