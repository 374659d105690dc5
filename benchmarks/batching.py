"""Continuous vs traditional batching, and where each policy's latency knee is.

For each setup (Llama-2-7B on a100-sxm4-80gb, OPT-13B on a100-sxm4-40gb) and workload (the Azure
conv trace's lengths, and a synthetic ShareGPT-like workload: lognormal lengths), sweep the
request rate (Poisson) and report throughput and p50/p99 TTFT, TPOT, ITL, E2E per scheduler
(static, dynamic, continuous, continuous with chunked prefill); then the highest rate each
sustains under an SLO (p99 TTFT <= 2 s and p99 TPOT <= 100 ms). Timing-only, default KV cache.

Then the continuous-vs-static gain against output-length variance (`variance_sweep`): an offline
burst (every request at t = 0) of 512-token prompts whose output lengths are fixed (128) or
log-normal around the same median (sigma 0.5, 1.0), static batching configured as
FasterTransformer runs it (one padded prefill per batch of `max_num_seqs`, see
batching/static.py) against continuous batching with the same `max_num_seqs`. With equal lengths
padding wastes nothing and the gain is near 1x; it grows with the variance, since a static batch
holds every slot until its longest member ends.

    python benchmarks/batching.py [--num-requests 600] [--rates 0.5 1 2 4 8 16]
    python benchmarks/batching.py --variance-only [--variance-requests 512]

Prints tables and writes results/batching.json.
"""

from __future__ import annotations

import argparse
import itertools
import math

from common import print_table, trace_path, write_json
from tqdm import tqdm

from sim.engine.args import EngineArgs
from sim.engine.engine import Engine
from sim.workload.specs import LognormalLength, load_azure_trace, make_workload, workload_from_trace

#: output-length spreads of the variance sweep: None = fixed length, else log-normal sigma
OUTPUT_SIGMAS: tuple[float | None, ...] = (None, 0.5, 1.0)

SETUPS = [("meta-llama/Llama-2-7b-hf", "a100-sxm4-80gb"), ("facebook/opt-13b", "a100-sxm4-40gb")]
POLICIES = {
    "static": {"scheduler": "static"},
    "dynamic": {"scheduler": "dynamic"},
    "continuous": {"scheduler": "continuous"},
    # Sarathi-Serve's regime: a small token budget so long prompts are really split
    "chunked-prefill-512": {"scheduler": "continuous", "enable_chunked_prefill": True,
                            "max_num_batched_tokens": 512},
}
SLO_TTFT_S, SLO_TPOT_S = 2.0, 0.100


def workload(name: str, num: int, rate: float, max_len: int):
    if name == "azure-conv":
        trace = load_azure_trace(trace_path("conv"), limit=num)
        return workload_from_trace(trace, num_requests=num, request_rate=rate, seed=0,
                                   max_prompt_len=max_len // 2, max_output_len=max_len // 2)
    # ShareGPT-like: prompts median ~ 256, outputs median ~ 192 tokens, heavy tails
    return make_workload(num, rate, LognormalLength(256, 0.9, max_len // 2),
                         LognormalLength(192, 0.8, max_len // 2), seed=0)


def variance_sweep(num_requests: int = 512, prompt_len: int = 512, output_median: int = 128,
                   model: str = "meta-llama/Llama-2-7b-hf", hardware: str = "a100-sxm4-80gb",
                   max_num_seqs: int = 64) -> list[dict[str, object]]:
    """Output throughput of static and continuous batching on one offline burst per output
    spread, the gain (continuous / static) and static's padding waste."""
    rows: list[dict[str, object]] = []
    for sigma in OUTPUT_SIGMAS:
        output = (output_median if sigma is None
                  else LognormalLength(output_median, sigma, 4 * output_median))
        throughput: dict[str, float] = {}
        waste = 0.0
        for scheduler in ("static", "continuous"):
            engine = Engine(EngineArgs(model=model, hardware=hardware, mode="timing",
                                       scheduler=scheduler, max_num_seqs=max_num_seqs))
            specs = make_workload(num_requests, math.inf, prompt_len, output, seed=0)
            result = engine.run(specs, keep_requests=False)
            throughput[scheduler] = result.summary.output_throughput
            if scheduler == "static":
                priced, useful = result.stats.num_tokens_priced, result.stats.num_tokens_computed
                waste = 1.0 - useful / priced if priced else 0.0
        rows.append({
            "output_len": "fixed" if sigma is None else f"lognormal sigma {sigma}",
            "static_tok_s": round(throughput["static"], 0),
            "continuous_tok_s": round(throughput["continuous"], 0),
            "gain": round(throughput["continuous"] / throughput["static"], 2),
            "static_padding_waste": round(waste, 3),
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-requests", type=int, default=600)
    parser.add_argument("--rates", type=float, nargs="+", default=[0.5, 1, 2, 4, 8, 16])
    parser.add_argument("--variance-requests", type=int, default=512)
    parser.add_argument("--variance-only", action="store_true",
                        help="only the gain-vs-output-variance sweep")
    ns = parser.parse_args()
    variance = variance_sweep(ns.variance_requests)
    print_table("Continuous vs static (FasterTransformer-style) by output-length spread, "
                "offline burst", variance)
    if ns.variance_only:
        print(f"\nwrote {write_json('batching', {'variance_sweep': variance})}")
        return
    rows = []
    grid = list(itertools.product(SETUPS, ("azure-conv", "sharegpt-like"), POLICIES, ns.rates))
    for (model, hardware), wl, policy, rate in tqdm(grid, desc="runs"):
        engine = Engine(EngineArgs(model=model, hardware=hardware, mode="timing",
                                   **POLICIES[policy]))
        result = engine.run(workload(wl, ns.num_requests, rate, engine.max_model_len),
                            keep_requests=False)
        s = result.summary
        rows.append({
            "model": model.split("/")[1], "hardware": hardware, "workload": wl,
            "policy": policy, "rate": rate,
            "throughput_req_s": round(s.request_throughput, 2),
            "output_tok_s": round(s.output_throughput, 0),
            "p50_ttft_s": round(s.ttft.median_s, 3), "p99_ttft_s": round(s.ttft.p99_s, 3),
            "p50_tpot_ms": round(s.tpot.median_s * 1e3, 1),
            "p99_tpot_ms": round(s.tpot.p99_s * 1e3, 1),
            "p99_itl_ms": round(s.itl.p99_s * 1e3, 1),
            "p50_e2e_s": round(s.e2el.median_s, 2), "p99_e2e_s": round(s.e2el.p99_s, 2),
            "meets_slo": bool(s.ttft.p99_s <= SLO_TTFT_S and s.tpot.p99_s <= SLO_TPOT_S),
        })
    for (model, hardware), wl in itertools.product(SETUPS, ("azure-conv", "sharegpt-like")):
        name = model.split("/")[1]
        print_table(f"{name} on {hardware}, {wl} workload",
                    [r for r in rows if r["model"] == name and r["workload"] == wl])
    best = []
    for (model, hardware), wl, policy in itertools.product(SETUPS, ("azure-conv", "sharegpt-like"),
                                                           POLICIES):
        name = model.split("/")[1]
        ok = [r["rate"] for r in rows if r["model"] == name and r["workload"] == wl
              and r["policy"] == policy and r["meets_slo"]]
        best.append({"model": name, "hardware": hardware, "workload": wl, "policy": policy,
                     "max_rate_under_slo": max(ok) if ok else 0.0})
    print_table(f"Highest swept rate meeting p99 TTFT <= {SLO_TTFT_S} s and p99 TPOT <= "
                f"{SLO_TPOT_S * 1e3:.0f} ms", best)
    payload = {"runs": rows, "max_rate_under_slo": best, "variance_sweep": variance}
    print(f"\nwrote {write_json('batching', payload)}")


if __name__ == "__main__":
    main()
