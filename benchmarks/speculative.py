"""When does speculative decoding pay? Measured speedups against the closed form, and under load.

1. **Batch 1, timing**: one request (prompt 128, 256 output tokens) on Llama-2-7B / A100-80GB,
   draft models priced as their own shapes (JackFram/llama-68m, TinyLlama-1.1B: their cost ratio
   c comes from the cost model), acceptance i.i.d. with rate alpha; measured speedup (busy time
   without / with speculation) against (1 - a^(k+1)) / ((1 - a)(k c + 1)).
2. **Load**: the Azure conv trace's lengths at increasing Poisson rates, and closed batches of
   growing size: speculation (llama-68m, alpha 0.7, k 4) against plain decoding; where the
   speedup turns into a slowdown (the verification pass turns compute-bound).
3. **Methods, functional**: real drafts on the tiny proxy (float32): n-gram lookup and
   draft-model proxies of the target (noise 0.05 / 0.2, first layer only), their measured
   acceptance and the timing they imply for the 7B target; plus the real-text n-gram acceptance
   trace of SmolLM2-135M (`benchmarks/acceptance_real.py`) replayed, when present; token trees
   (`speculative.tree`, SpecInfer-style) against a chain at an equal budget of 6 verified draft
   tokens per step.

Writes `results/speculative.json`.
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np
from common import RESULTS, print_table, trace_path, write_json

from sim.engine.args import EngineArgs
from sim.engine.engine import Engine
from sim.workload.specs import RequestSpec, load_azure_trace, workload_from_trace
from speculative.analysis import walltime_improvement

TARGET = "meta-llama/Llama-2-7b-hf"
DRAFTS = {"llama-68m": "JackFram/llama-68m", "tinyllama-1.1b": "TinyLlama/TinyLlama-1.1B-Chat-v1.0"}


def timing_engine(spec: dict | None, **kw) -> Engine:
    return Engine(EngineArgs(model=TARGET, mode="timing", speculative_config=spec, **kw))


def batch1(alphas, ks) -> list[dict]:
    reqs = [RequestSpec("r0", 0.0, 128, 256)]
    base = timing_engine(None).run(reqs).stats.busy_s
    rows = []
    for (name, draft), a, k in itertools.product(DRAFTS.items(), alphas, ks):
        engine = timing_engine({"method": "draft_model", "model": draft,
                                "num_speculative_tokens": k, "acceptance_rate": a})
        busy = engine.run(reqs).stats.busy_s
        c = engine.speculation.c
        rows.append({"draft": name, "c": round(c, 4), "alpha": a, "k": k,
                     "measured": round(base / busy, 3),
                     "formula": round(walltime_improvement(a, k, c), 3)})
    return rows


def load_sweep(rates, num: int, spec: dict) -> list[dict]:
    trace = load_azure_trace(trace_path("conv"))
    rows = []
    for rate in rates:
        out = {}
        for label, s in (("plain", None), ("spec", spec)):
            engine = timing_engine(s)
            wl = workload_from_trace(trace, num_requests=num, request_rate=rate, seed=0,
                                     max_prompt_len=2048, max_output_len=1024)
            out[label] = engine.run(wl, keep_requests=False).summary
        p, s_ = out["plain"], out["spec"]
        rows.append({"rate_per_s": rate,
                     "tpot_ms_plain": round(p.tpot.mean_s * 1e3, 2),
                     "tpot_ms_spec": round(s_.tpot.mean_s * 1e3, 2),
                     "e2e_s_plain": round(p.e2el.mean_s, 2), "e2e_s_spec": round(s_.e2el.mean_s, 2),
                     "e2e_speedup": round(p.e2el.mean_s / s_.e2el.mean_s, 3)})
    return rows


def batch_sweep(sizes, spec: dict, alphas=(0.3, 0.5, 0.7)) -> list[dict]:
    rows = []
    for n in sizes:
        reqs = [RequestSpec(f"r{i}", 0.0, 512, 256) for i in range(n)]
        base = timing_engine(None).run(reqs).summary.duration_s
        row = {"batch": n, "plain_s": round(base, 3)}
        for a in alphas:
            spec_s = timing_engine({**spec, "acceptance_rate": a}).run(reqs).summary.duration_s
            row[f"speedup_a{a}"] = round(base / spec_s, 3)
        rows.append(row)
    return rows


def methods(num_prompts: int) -> list[dict]:
    rng = np.random.default_rng(0)
    # prompts with repeated phrases (as in code / retrieval): where n-gram lookup finds drafts
    phrases = [rng.integers(3, 250, 6).tolist() for _ in range(4)]
    reqs = []
    for i in range(num_prompts):
        ids = [t for j in rng.integers(0, 4, 8) for t in phrases[j]]
        reqs.append(RequestSpec(f"r{i}", 0.0, len(ids), 64, prompt_token_ids=tuple(ids)))
    specs = {
        "plain": None,
        "ngram k=4": {"method": "ngram", "num_speculative_tokens": 4},
        "draft noise 0.05 k=4 (68m)": {"method": "draft_model", "model": DRAFTS["llama-68m"],
                                       "draft_noise_scale": 0.05, "num_speculative_tokens": 4},
        "draft noise 0.2 k=4 (68m)": {"method": "draft_model", "model": DRAFTS["llama-68m"],
                                      "draft_noise_scale": 0.2, "num_speculative_tokens": 4},
        "target[:1] k=2": {"method": "draft_model", "draft_num_layers": 1,
                           "num_speculative_tokens": 2},
    }
    # tree vs chain at an equal verified-token budget (6 draft tokens scored per step)
    noisy = {"method": "draft_model", "model": DRAFTS["llama-68m"], "draft_noise_scale": 0.2}
    specs["chain k=6 noise 0.2 (68m)"] = {**noisy, "num_speculative_tokens": 6}
    for tree in ([6], [3, 1], [2, 2], [2, 1, 1]):
        specs[f"tree {tree} (6 nodes) noise 0.2 (68m)"] = {**noisy, "tree": tree}
    rows = []
    base_tokens = None
    base_s = None
    for name, spec in specs.items():
        engine = Engine(EngineArgs(model=TARGET, speculative_config=spec))
        res = engine.run(reqs)
        tokens = sorted((r.request_id, tuple(r.output_token_ids)) for r in res.requests)
        if base_tokens is None:
            base_tokens, base_s = tokens, res.summary.duration_s
        summ = res.speculation or {}
        rows.append({"method": name, "acceptance": round(summ.get("acceptance_rate", 0.0), 3),
                     "tokens_per_step": round(summ.get("mean_tokens_per_step", 1.0), 3),
                     "c": round(summ.get("cost_ratio_c", 0.0), 3),
                     "duration_s": round(res.summary.duration_s, 3),
                     "speedup": round(base_s / res.summary.duration_s, 3),
                     "same_tokens": tokens == base_tokens})
    trace = RESULTS / "acceptance_ngram.json"
    if trace.exists():  # real text (SmolLM2-135M), replayed for the 7B target at batch 1
        one = [RequestSpec("r0", 0.0, 128, 256)]
        base = timing_engine(None).run(one).summary.duration_s
        res = timing_engine({"method": "ngram", "num_speculative_tokens": 4,
                             "acceptance_trace": str(trace)}).run(one)
        rows.append({"method": "ngram k=4, SmolLM2 real-text trace (timing)",
                     "acceptance": round(res.speculation["acceptance_rate"], 3),
                     "tokens_per_step": round(res.speculation["mean_tokens_per_step"], 3),
                     "c": 0.0, "duration_s": round(res.summary.duration_s, 3),
                     "speedup": round(base / res.summary.duration_s, 3), "same_tokens": None})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small sweep (CI smoke)")
    ns = parser.parse_args()
    alphas = (0.6, 0.8) if ns.quick else (0.5, 0.6, 0.7, 0.8, 0.9)
    ks = (1, 4) if ns.quick else (1, 2, 3, 4, 6, 8)
    spec = {"method": "draft_model", "model": DRAFTS["llama-68m"], "num_speculative_tokens": 4,
            "acceptance_rate": 0.7}
    rates = (1.0, 4.0) if ns.quick else (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
    sizes = (1, 16) if ns.quick else (1, 4, 16, 64, 128, 256)
    results = {
        "setup": f"timing: {TARGET} on the default A100-SXM4-80GB profile",
        "batch1": batch1(alphas, ks),
        "load_azure_conv": load_sweep(rates, 100 if ns.quick else 400, spec),
        "batch_size": batch_sweep(sizes, spec),
        "methods_functional": methods(4 if ns.quick else 8),
    }
    print_table("Batch 1: measured speedup vs (1-a^(k+1))/((1-a)(kc+1))", results["batch1"])
    print_table("Azure conv trace, llama-68m draft, alpha 0.7, k 4: speedup vs request rate",
                results["load_azure_conv"])
    print_table("Closed batch (prompt 512, 256 out; llama-68m, k 4): speedup vs batch size",
                results["batch_size"])
    print_table("Methods (functional tiny proxy; timing Llama-2-7B)",
                results["methods_functional"])
    print(f"\nwrote {write_json('speculative', results)}")


if __name__ == "__main__":
    main()
