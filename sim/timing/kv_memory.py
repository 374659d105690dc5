"""How much memory the KV cache takes: the classic back-of-the-envelope, step by step.

Every layer keeps a key and a value vector per KV head for every token, so

    per token   = 2 (K and V) x n_layer x n_kv_head x d_head x bytes per element
    per request = per token x seq_len
    per batch   = per request x batch_size

With a hardware profile, the memory plan (`sim.timing.memory_plan`) says how many tokens and blocks fit
next to the weights and how many requests of `seq_len` tokens can be resident at once. This is the
report behind `infersim kv-memory`.

References: Pope et al. 2022 (Efficiently scaling Transformer inference: KV-cache size);
Kwon et al. 2023 (vLLM / PagedAttention: block-granular KV allocation); Ainslie et al. 2023
(GQA: fewer KV heads, smaller cache).
"""

from __future__ import annotations

from typing import Any

from sim.core.dtypes import canonical_dtype, dtype_bytes
from sim.core.errors import ConfigError
from sim.core.model_config import ModelConfig
from sim.model.zoo import resolve_model
from sim.timing.hardware import HardwareProfile, load_profile
from sim.timing.memory_plan import plan_memory


def _human(num_bytes: float) -> str:
    """`524,288 B (512.0 KiB)`: exact bytes, then the largest binary unit that reads well."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if num_bytes >= size:
            return f"{num_bytes:,.0f} B ({num_bytes / size:,.2f} {unit})"
    return f"{num_bytes:,.0f} B"


def kv_memory_report(model: ModelConfig | str, seq_len: int, batch_size: int,
                     dtype: str | None = None, hardware: HardwareProfile | str | None = None,
                     block_size: int = 16, gpu_memory_utilization: float = 0.9, *,
                     kv_cache_dtype: str | None = None,
                     tensor_parallel_size: int = 1) -> dict[str, Any]:
    """KV bytes per token / request / batch for `model` in `dtype` (weights and, unless
    `kv_cache_dtype` is given, the KV cache; default the model's dtype), and with `hardware` the
    memory plan and how many requests of `seq_len` tokens fit at once."""
    cfg = resolve_model(model) if isinstance(model, str) else model
    for key, value in (("seq_len", seq_len), ("batch_size", batch_size),
                       ("block_size", block_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{key} must be a positive integer, got {value!r}")
    weight_dtype = canonical_dtype(dtype or cfg.dtype)
    kv_dtype = canonical_dtype(kv_cache_dtype or weight_dtype)
    elem = dtype_bytes(kv_dtype)
    per_token = cfg.kv_bytes_per_token(kv_dtype)
    per_request = per_token * seq_len
    total = per_request * batch_size
    report: dict[str, Any] = {
        "model": cfg.name, "dtype": weight_dtype, "kv_cache_dtype": kv_dtype,
        "seq_len": seq_len, "batch_size": batch_size,
        "n_layer": cfg.n_layer, "n_kv_head": cfg.n_kv_head, "n_head": cfg.n_head,
        "d_head": cfg.d_head, "bytes_per_element": elem,
        "kv_bytes_per_token": per_token, "kv_bytes_per_request": per_request,
        "total_kv_bytes": total,
        "kv_mib_per_token": per_token / 2**20, "kv_gib_per_request": per_request / 2**30,
        "total_kv_gib": total / 2**30,
        "block_size": block_size, "kv_bytes_per_block": per_token * block_size,
        "blocks_per_request": -(-seq_len // block_size),
        # paged: the unfilled tail of the last block; contiguous pays max_model_len - seq_len
        "paged_waste_tokens_per_request": -(-seq_len // block_size) * block_size - seq_len,
    }
    if hardware is not None:
        hw = load_profile(hardware) if isinstance(hardware, str) else hardware
        plan = plan_memory(cfg, hw, dtype=weight_dtype, kv_cache_dtype=kv_dtype,
                           gpu_memory_utilization=gpu_memory_utilization, block_size=block_size,
                           tensor_parallel_size=tensor_parallel_size)
        max_requests = plan.max_concurrent_requests(seq_len)
        report.update({
            "hardware": hw.name, "tensor_parallel_size": tensor_parallel_size,
            "memory_plan": plan.to_dict(), "memory_plan_text": plan.format(),
            "num_kv_tokens": plan.num_kv_tokens, "num_kv_blocks": plan.num_kv_blocks,
            "block_size": block_size, "max_concurrent_requests": max_requests,
            "batch_fits": batch_size <= max_requests,
        })
    return report


def format_kv_memory(report: dict[str, Any]) -> str:
    """The report as text, with the numbers plugged into each formula."""
    r = report
    elem = r["bytes_per_element"]
    elem_text = f"{elem:g} B"
    lines = [
        f"KV cache of {r['model']} ({r['kv_cache_dtype']})",
        f"  per token   = 2 (K and V) x {r['n_layer']} layers x {r['n_kv_head']} KV heads x "
        f"{r['d_head']} head dim x {elem_text}",
        f"              = 2 x {r['n_layer']} x {r['n_kv_head']} x {r['d_head']} x {elem_text} = "
        f"{_human(r['kv_bytes_per_token'])} = {r['kv_bytes_per_token'] / 2**20:.2f} MiB",
        f"  per request = per token x {r['seq_len']:,} tokens = {_human(r['kv_bytes_per_request'])}",
        f"  per batch   = per request x {r['batch_size']:,} requests = "
        f"{_human(r['total_kv_bytes'])}",
        f"  paged       = {r['blocks_per_request']:,} blocks of {r['block_size']} tokens per "
        f"request ({_human(r['kv_bytes_per_block'])} per block; "
        f"{r['paged_waste_tokens_per_request']} slots unused in the last block)",
    ]
    if r["n_kv_head"] != r["n_head"]:
        lines.append(f"  (grouped-query attention: {r['n_kv_head']} KV heads for {r['n_head']} "
                     f"query heads, {r['n_head'] // r['n_kv_head']}x smaller than MHA)")
    if "hardware" in r:
        lines.append("")
        lines.append(r["memory_plan_text"])
        verdict = "fits" if r["batch_fits"] else "does NOT fit"
        lines.append(
            f"  at {r['seq_len']:,} tokens per request ({-(-r['seq_len'] // r['block_size'])} "
            f"blocks): up to {r['max_concurrent_requests']:,} requests at once; a batch of "
            f"{r['batch_size']:,} {verdict}")
    return "\n".join(lines)
