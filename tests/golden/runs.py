"""Golden runs: a fixed set of simulations whose results must stay bit-identical across refactors.

Each case returns a JSON-able dict: the benchmark summary, the step counters and a digest of every
request's times (timing runs), or the tokens and cumulative logprobs (functional runs). JSON keeps
floats exactly (shortest round-trip repr), so equality of the stored and the fresh dict means
bit-identical results. Only a bug fix may change a golden; regenerate with
`python -m tests.golden.runs --write` and say in the commit which cases changed and why.
"""

from __future__ import annotations

import os

# the same BLAS setting as the test suite (tests/conftest.py): summation order is part of the result
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
GOLDEN = HERE / "golden.json"
TRACE = HERE.parents[2] / "shared" / "traces" / "azure_llm_2023_conv.csv"
NUM_TRACE_REQUESTS = 200
#: floats agree to this relative tolerance (BLAS kernels may differ in the last bits between CPUs)
REL_TOL = 1e-12


def _clean(value: Any) -> Any:
    """NaN/inf as strings so that JSON round-trips them and equality holds."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def _timing(workload: str = "trace", **kwargs: Any) -> dict[str, Any]:
    from sim.engine.args import EngineArgs
    from sim.engine.engine import Engine
    from sim.workload.specs import load_azure_trace, make_workload, workload_from_trace

    engine = Engine(EngineArgs(mode="timing", **kwargs))
    if workload == "trace":
        trace = load_azure_trace(TRACE, limit=NUM_TRACE_REQUESTS)
        specs = list(workload_from_trace(trace, num_requests=NUM_TRACE_REQUESTS, seed=0))
    else:  # a burst of equal requests (static batching, tight pools)
        specs = list(make_workload(64, 40.0, 200, 64, seed=1))
    result = engine.run(specs)
    requests = [[r.request_id, r.status.name, r.first_scheduled_s, r.first_token_s, r.finished_s,
                 r.num_output_tokens, r.num_preemptions, math.fsum(r.token_times_s)]
                for r in result.requests]
    stats = dataclasses.asdict(result.stats)
    return _clean({"summary": result.summary.to_benchmark_json(), "stats": stats,
                   "requests": requests, "speculation": result.speculation})


PROMPTS: list[Any] = ["The capital of France is", "Once upon a time there", "1 2 3 4 5",
                      "A quick brown fox jumps over the lazy dog and then"]
#: prompts that fit a 16-token max_model_len (a tight pool's runs)
SHORT_PROMPTS: list[Any] = [{"prompt_token_ids": ids} for ids in
                            ([5, 9, 13, 200], [17, 3, 88, 41, 6], [7, 8, 9], [120, 33, 250, 4, 61])]


def _functional(params: dict[str, Any] | None = None, beam: int = 0,
                prompts: list[Any] = PROMPTS, **kwargs: Any) -> dict[str, Any]:
    from sim import LLM, SamplingParams

    llm = LLM(model="meta-llama/Llama-2-7b-hf", dtype="float64", seed=7, **kwargs)
    if beam:
        from sim.model.beam_search import BeamSearchParams

        outs = llm.beam_search(prompts[:2], BeamSearchParams(beam_width=beam, max_tokens=8))
        return _clean({"beams": [[[list(s.tokens), s.cum_logprob] for s in o.sequences]
                                 for o in outs]})
    sp = SamplingParams(**{"temperature": 0.0, "max_tokens": 12, "ignore_eos": True,
                           "logprobs": 1, **(params or {})})
    outs = llm.generate(prompts, sp)
    summary = llm.last_result.summary.to_benchmark_json()
    return _clean({
        "outputs": [[[list(c.token_ids), c.cumulative_logprob] for c in o.outputs] for o in outs],
        "mean_ttft_ms": summary["mean_ttft_ms"], "mean_tpot_ms": summary["mean_tpot_ms"],
        "num_steps": llm.last_result.stats.num_steps,
    })


CASES: dict[str, Callable[[], dict[str, Any]]] = {
    "timing_default": lambda: _timing(),
    "timing_chunked": lambda: _timing(enable_chunked_prefill=True),
    "timing_swap_tight": lambda: _timing(preemption_mode="swap", swap_space=4.0,
                                         num_gpu_blocks_override=600),
    "timing_recompute_tight": lambda: _timing(num_gpu_blocks_override=600),
    "timing_prefix_caching": lambda: _timing(enable_prefix_caching=True),
    "timing_contiguous_pow2": lambda: _timing(kv_cache="contiguous",
                                              contiguous_reservation="pow2"),
    "timing_static": lambda: _timing("burst", scheduler="static", max_num_seqs=16),
    "timing_dynamic": lambda: _timing("burst", scheduler="dynamic"),
    "timing_int8_kv_int4": lambda: _timing(kv_cache_dtype="int8", quantization="int4"),
    "timing_sliding_window": lambda: _timing(kv_eviction="sliding_window",
                                             kv_eviction_window=256),
    "timing_admission_slo": lambda: _timing(admission_ttft_slo_s=0.5, admission_max_waiting=64),
    "timing_spec_iid": lambda: _timing(speculative_config={
        "method": "draft_model", "model": "JackFram/llama-68m", "num_speculative_tokens": 3,
        "acceptance_rate": 0.7}),
    "timing_tp2_pp2": lambda: _timing(model="meta-llama/Llama-2-70b-hf",
                                      tensor_parallel_size=4, pipeline_parallel_size=2),
    "timing_dp2_tp2": lambda: _timing(model="meta-llama/Llama-2-13b-hf", tensor_parallel_size=2,
                                      data_parallel_size=2,
                                      data_parallel_router="least_outstanding"),
    "functional_paged": lambda: _functional(),
    "functional_sampled_n2": lambda: _functional({"temperature": 0.8, "n": 2, "seed": 3}),
    "functional_tight_n2": lambda: _functional({"n": 2, "max_tokens": 8}, prompts=SHORT_PROMPTS,
                                               num_gpu_blocks_override=4, block_size=4,
                                               max_model_len=16),
    "functional_int8_kv": lambda: _functional(kv_cache_dtype="int8"),
    "functional_spec_ngram": lambda: _functional(speculative_config={
        "method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1,
        "prompt_lookup_max": 2}),
    "functional_spec_draft_int8_kv": lambda: _functional(kv_cache_dtype="int8", speculative_config={
        "method": "draft_model", "num_speculative_tokens": 3, "draft_noise_scale": 0.1}),
    "functional_tp2": lambda: _functional(tensor_parallel_size=2),
    "functional_h2o": lambda: _functional(kv_eviction="h2o", kv_eviction_window=8,
                                          kv_eviction_heavy=4),
    "functional_prefix_chunked": lambda: _functional(enable_prefix_caching=True,
                                                     enable_chunked_prefill=True,
                                                     max_num_batched_tokens=8),
    "functional_beam": lambda: _functional(beam=3),
}


def run_case(name: str) -> dict[str, Any]:
    try:
        return CASES[name]()
    except Exception as err:  # an error is a result too (its type and message are pinned)
        return {"error": f"{type(err).__name__}: {err}"}


def same(a: Any, b: Any, path: str = "") -> str | None:
    """Where `a` and `b` differ (floats to `REL_TOL`), or None when they agree."""
    if isinstance(a, float) and isinstance(b, float):
        return None if math.isclose(a, b, rel_tol=REL_TOL, abs_tol=1e-300) else f"{path}: {a!r} != {b!r}"
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return f"{path}: keys {sorted(a.keys() ^ b.keys())} differ"
        return next((d for k in a if (d := same(a[k], b[k], f"{path}.{k}")) is not None), None)
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{path}: length {len(a)} != {len(b)}"
        return next((d for i, (x, y) in enumerate(zip(a, b, strict=True))
                     if (d := same(x, y, f"{path}[{i}]")) is not None), None)
    return None if a == b else f"{path}: {a!r} != {b!r}"


def load() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(GOLDEN.read_text(encoding="utf-8"))
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite golden.json")
    parser.add_argument("cases", nargs="*", help="only these cases (default: all)")
    ns = parser.parse_args()
    names = ns.cases or list(CASES)
    old = load() if GOLDEN.exists() else {}
    new = dict(old)
    for name in names:
        new[name] = json.loads(json.dumps(run_case(name)))
        diff = "new" if name not in old else same(old[name], new[name])
        print(f"{name}: {'same' if diff is None else 'CHANGED ' + diff[:300]}")
    if ns.write:
        GOLDEN.write_text(json.dumps({k: new[k] for k in CASES if k in new}, indent=1) + "\n",
                          encoding="utf-8")


if __name__ == "__main__":
    main()
