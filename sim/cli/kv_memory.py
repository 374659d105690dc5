"""`infersim kv-memory`: interview question 1 ("how much GPU memory does the KV cache of a 70B
model take, and how many users fit?") worked through with the model's own numbers.

The formula (bytes per token, per request, per batch), the per-GPU share under tensor
parallelism, and with `--hardware` the per-GPU memory plan (weights, a speculative draft's
weights and KV, activations, the KV pool) and how many requests of `--seq-len` tokens fit. The
breakdown is printed also when the model does not fit, followed by the error line (exit 2), so
the learner sees by how much.
"""

from __future__ import annotations

import argparse
import json

from sim.model.zoo import DEFAULT_MODEL
from sim.timing.kv_memory import KVMemoryDoesNotFitError, format_kv_memory, kv_memory_report

DTYPE_CHOICES_TEXT = "auto (the model's), float16, bfloat16, float32, fp8, int8, int4, ..."


def add_kv_memory_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The `kv-memory` subcommand and its flags (vLLM's spelling where vLLM has the flag)."""
    kv = sub.add_parser(
        "kv-memory", help="the KV-cache memory calculation, step by step (interview Q1)",
        description="KV bytes per token = 2 x layers x KV heads x head dim x bytes; per "
                    "request; per batch; per GPU under tensor parallelism; with --hardware, "
                    "the per-GPU memory plan and how many requests fit. The breakdown is "
                    "printed also when the model does not fit (then the error, exit 2).",
        epilog="example: infersim kv-memory --model meta-llama/Llama-2-70b-hf --seq-len 4096 "
               "--batch-size 8 --dtype fp16 --hardware a100-sxm4-80gb --tensor-parallel-size 8")
    kv.add_argument("--model", default=DEFAULT_MODEL, help="model name or local folder")
    kv.add_argument("--seq-len", type=int, required=True, help="tokens per request")
    kv.add_argument("--batch-size", type=int, default=1, help="requests in the batch")
    kv.add_argument("--dtype", default="float16",
                    help=f"weights dtype, and the KV's unless --kv-cache-dtype says otherwise: "
                         f"{DTYPE_CHOICES_TEXT}")
    kv.add_argument("--kv-cache-dtype", default="auto",
                    help="KV cache dtype: auto (as --dtype, as in `simulate`), fp8, int8, ...")
    kv.add_argument("--hardware", default=None, help="also size the KV pool on this GPU")
    kv.add_argument("--tensor-parallel-size", type=int, default=1,
                    help="GPUs the model is split over (Megatron-style): each holds 1/N of the "
                         "weights and of the KV heads; the plan is per GPU")
    kv.add_argument("--speculative-config", default=None, metavar="JSON",
                    help='as in `simulate`, e.g. \'{"method": "draft_model", "model": '
                         '"JackFram/llama-68m"}\': the draft\'s weights and KV join the plan')
    kv.add_argument("--block-size", type=int, default=16, help="tokens per paged KV block")
    kv.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                    help="with --hardware: share of GPU memory the engine may use")
    kv.add_argument("--max-num-batched-tokens", type=int, default=2048,
                    help="with --hardware: tokens of the largest forward (its activation peak)")
    kv.add_argument("--max-num-seqs", type=int, default=256,
                    help="with --hardware: most sequences per step (rows of fp32 logits)")
    kv.add_argument("--json", action="store_true", help="print JSON instead of text")


def run_kv_memory(ns: argparse.Namespace) -> int:
    """Print the report; when the model does not fit, print the breakdown and re-raise (the
    caller prints the error line and exits 2)."""
    from sim.model.zoo import resolve_model
    from speculative.config import SpeculativeConfig, draft_model_shape

    target = resolve_model(ns.model)
    draft = draft_tp = None
    if ns.speculative_config is not None:
        spec = SpeculativeConfig.from_any(ns.speculative_config)
        draft = draft_model_shape(spec, target)  # None for n-gram: no weights, no KV
        draft_tp = spec.draft_tensor_parallel_size
    try:
        report = kv_memory_report(
            target, seq_len=ns.seq_len, batch_size=ns.batch_size, dtype=ns.dtype,
            hardware=ns.hardware, block_size=ns.block_size,
            gpu_memory_utilization=ns.gpu_memory_utilization,
            kv_cache_dtype=ns.kv_cache_dtype, tensor_parallel_size=ns.tensor_parallel_size,
            draft=draft, draft_tensor_parallel_size=draft_tp,
            max_num_batched_tokens=ns.max_num_batched_tokens, max_num_seqs=ns.max_num_seqs)
    except KVMemoryDoesNotFitError as exc:
        print(json.dumps(exc.report, indent=2, default=str) if ns.json
              else format_kv_memory(exc.report), flush=True)
        raise
    print(json.dumps(report, indent=2, default=str) if ns.json else format_kv_memory(report))
    return 0
