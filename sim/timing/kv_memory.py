"""How much memory the KV cache takes: the classic back-of-the-envelope, step by step.

Every layer keeps a key and a value vector per KV head for every token, so

    per token   = 2 (K and V) x n_layer x n_kv_head x d_head x bytes per element
    per request = per token x seq_len
    per batch   = per request x batch_size

Under tensor parallelism over t GPUs (Megatron-LM sharding, as vLLM does it) each GPU keeps
n_kv_head / t KV heads (one replicated head each once t > n_kv_head), so one GPU holds that
share of every token's KV; the GPUs together hold the same number of tokens.

With a hardware profile, the memory plan (`sim.timing.memory_plan`) says how many tokens and
blocks fit next to this GPU's weights and activations, and how many requests of `seq_len` tokens
can be resident at once ("how many users fit"). With a speculative draft model its weights and
its KV (every block holds the draft's KV beside the target's) come out of the same pool, as
vLLM sizes it. The breakdown is computed without the plan, so that a model that does not fit
still shows where the memory goes (`KVMemoryDoesNotFitError.report`). This is the report behind
`infersim kv-memory`.

References: Pope et al. 2022 (Efficiently scaling Transformer inference: KV-cache size);
Kwon et al. 2023 (vLLM / PagedAttention: block-granular KV allocation); Ainslie et al. 2023
(GQA: fewer KV heads, smaller cache); Shoeybi et al. 2019 (Megatron-LM tensor parallelism).
"""

from __future__ import annotations

from typing import Any

from sim.core.dtypes import canonical_dtype, dtype_bytes
from sim.core.errors import ConfigError, DoesNotFitError
from sim.core.model_config import ModelConfig
from sim.model.zoo import resolve_model
from sim.timing.hardware import HardwareProfile, load_profile
from sim.timing.memory_plan import (
    DEFAULT_MAX_NUM_BATCHED_TOKENS,
    DEFAULT_MAX_NUM_SEQS,
    GIB,
    activation_peak_bytes,
    kv_bytes_per_token_per_gpu,
    plan_memory,
    weight_bytes_per_gpu,
    with_draft,
)


class KVMemoryDoesNotFitError(DoesNotFitError):
    """The model (with its draft) does not fit on the device; `report` is the breakdown that
    shows where the memory went, so a caller can print it before the error."""

    def __init__(self, message: str, report: dict[str, Any]) -> None:
        super().__init__(message)
        self.report = report


def _human(num_bytes: float) -> str:
    """`524,288 B (512.0 KiB)`: exact bytes, then the largest binary unit that reads well."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if num_bytes >= size:
            return f"{num_bytes:,.0f} B ({num_bytes / size:,.2f} {unit})"
    return f"{num_bytes:,.0f} B"


def _dtype_or_auto(value: str | None, auto: str) -> str:
    """`value` canonicalised; None or `auto` (vLLM's spelling: the model's own) gives `auto`."""
    return auto if value is None or value == "auto" else canonical_dtype(value)


def _tp_divides(cfg: ModelConfig, tp: int) -> bool:
    """Whether TP degree `tp` splits the query heads evenly and the KV heads evenly or by
    replication (the rule vLLM applies)."""
    return not cfg.n_head % tp and (not cfg.n_kv_head % tp or not tp % cfg.n_kv_head)


def kv_memory_report(model: ModelConfig | str, seq_len: int, batch_size: int,
                     dtype: str | None = None, hardware: HardwareProfile | str | None = None,
                     block_size: int = 16, gpu_memory_utilization: float = 0.9, *,
                     kv_cache_dtype: str | None = None,
                     tensor_parallel_size: int = 1,
                     draft: ModelConfig | str | None = None,
                     draft_tensor_parallel_size: int | None = None,
                     max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS,
                     max_num_seqs: int = DEFAULT_MAX_NUM_SEQS) -> dict[str, Any]:
    """KV bytes per token / request / batch for `model` in `dtype` (weights and, unless
    `kv_cache_dtype` is given, the KV cache; None or "auto": the model's dtype), whole and per GPU
    of `tensor_parallel_size`; with `hardware` the per-GPU breakdown (weights, activations, the
    `draft` model's weights and KV, the KV pool) and how many requests of `seq_len` tokens fit.

    `draft_tensor_parallel_size` None shards the draft like the target (vLLM's default). Raises
    `KVMemoryDoesNotFitError` (a `DoesNotFitError`) carrying the report when no KV block fits."""
    cfg = resolve_model(model) if isinstance(model, str) else model
    draft_cfg = resolve_model(draft) if isinstance(draft, str) else draft
    for key, value in (("seq_len", seq_len), ("batch_size", batch_size),
                       ("block_size", block_size), ("tensor_parallel_size", tensor_parallel_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{key} must be a positive integer, got {value!r}")
    tp = tensor_parallel_size
    if not _tp_divides(cfg, tp):
        good = [str(t) for t in (1, 2, 4, 8, 16) if _tp_divides(cfg, t)]
        raise ConfigError(
            f"tensor_parallel_size {tp} must divide n_head ({cfg.n_head}) and divide or be a "
            f"multiple of n_kv_head ({cfg.n_kv_head}) for {cfg.name}; use one of "
            f"{', '.join(good)}")
    weight_dtype = _dtype_or_auto(dtype, canonical_dtype(cfg.dtype))
    kv_dtype = _dtype_or_auto(kv_cache_dtype, weight_dtype)
    elem = dtype_bytes(kv_dtype)
    per_token = cfg.kv_bytes_per_token(kv_dtype)
    per_request = per_token * seq_len
    total = per_request * batch_size
    # per GPU: the KV heads are split over TP (replicated once tp > n_kv_head)
    per_token_gpu = kv_bytes_per_token_per_gpu(cfg, kv_dtype, tp)
    report: dict[str, Any] = {
        "model": cfg.name, "dtype": weight_dtype, "kv_cache_dtype": kv_dtype,
        "seq_len": seq_len, "batch_size": batch_size,
        "n_layer": cfg.n_layer, "n_kv_head": cfg.n_kv_head, "n_head": cfg.n_head,
        "d_head": cfg.d_head, "bytes_per_element": elem,
        "kv_bytes_per_token": per_token, "kv_bytes_per_request": per_request,
        "total_kv_bytes": total,
        "kv_mib_per_token": per_token / 2**20, "kv_gib_per_request": per_request / 2**30,
        "total_kv_gib": total / 2**30,
        "tensor_parallel_size": tp, "kv_heads_per_gpu": max(1.0, cfg.n_kv_head / tp),
        "kv_bytes_per_token_per_gpu": per_token_gpu,
        "total_kv_bytes_per_gpu": per_token_gpu * seq_len * batch_size,
        "block_size": block_size, "kv_bytes_per_block": per_token * block_size,
        "blocks_per_request": -(-seq_len // block_size),
        # paged: the unfilled tail of the last block; contiguous pays max_model_len - seq_len
        "paged_waste_tokens_per_request": -(-seq_len // block_size) * block_size - seq_len,
    }
    dtp = tp if draft_tensor_parallel_size is None else draft_tensor_parallel_size
    if draft_cfg is not None:
        report.update({
            "draft_model": draft_cfg.name, "draft_tensor_parallel_size": dtp,
            "draft_kv_bytes_per_token": draft_cfg.kv_bytes_per_token(kv_dtype),
            "draft_kv_bytes_per_token_per_gpu": kv_bytes_per_token_per_gpu(draft_cfg, kv_dtype,
                                                                           dtp),
        })
    if hardware is None:
        return report
    hw = load_profile(hardware) if isinstance(hardware, str) else hardware
    if not 0 < gpu_memory_utilization <= 1:
        raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got "
                          f"{gpu_memory_utilization}; use e.g. 0.9")
    # The breakdown, from the same terms the plan uses but without its fit check, so that a
    # model that does not fit still shows where its memory goes.
    budget = gpu_memory_utilization * float(hw.mem_bytes)
    weights = weight_bytes_per_gpu(cfg, weight_dtype, tp)
    act = activation_peak_bytes(cfg, weight_dtype, max_num_batched_tokens, max_num_seqs, tp)
    draft_weights = 0.0 if draft_cfg is None else weight_bytes_per_gpu(draft_cfg, weight_dtype,
                                                                       dtp)
    kv_block_gpu = (per_token_gpu + report.get("draft_kv_bytes_per_token_per_gpu", 0.0)) \
        * block_size
    left = budget - weights - draft_weights - act
    report.update({
        "hardware": hw.name, "capacity_bytes": float(hw.mem_bytes),
        "gpu_memory_utilization": gpu_memory_utilization, "budget_bytes": budget,
        "weight_bytes_per_gpu": weights, "draft_weight_bytes_per_gpu": draft_weights,
        "activation_peak_bytes": act, "kv_pool_bytes_per_gpu": left,
        "kv_block_bytes_per_gpu": kv_block_gpu,
        "max_num_batched_tokens": max_num_batched_tokens, "max_num_seqs": max_num_seqs,
    })
    try:
        plan = plan_memory(cfg, hw, dtype=weight_dtype, kv_cache_dtype=kv_dtype,
                           gpu_memory_utilization=gpu_memory_utilization, block_size=block_size,
                           tensor_parallel_size=tp, max_num_batched_tokens=max_num_batched_tokens,
                           max_num_seqs=max_num_seqs)
        if draft_cfg is not None:
            plan = with_draft(plan, draft_cfg, dtype=weight_dtype,
                              draft_tensor_parallel_size=dtp)
    except DoesNotFitError as exc:
        report.update({"fits": False, "batch_fits": False, "max_concurrent_requests": 0,
                       "num_kv_tokens": 0, "num_kv_blocks": 0, "error": str(exc)})
        raise KVMemoryDoesNotFitError(str(exc), report) from exc
    max_requests = plan.max_concurrent_requests(seq_len)
    report.update({
        "fits": True, "memory_plan": plan.to_dict(), "memory_plan_text": plan.format(),
        "num_kv_tokens": plan.num_kv_tokens, "num_kv_blocks": plan.num_kv_blocks,
        "max_concurrent_requests": max_requests, "batch_fits": batch_size <= max_requests,
    })
    return report


def format_kv_memory(report: dict[str, Any]) -> str:
    """The report as text, with the numbers plugged into each formula; with a device, the
    per-GPU breakdown (also when the model does not fit: then the verdict says so)."""
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
    tp = r["tensor_parallel_size"]
    if tp > 1:
        heads = r["kv_heads_per_gpu"]
        lines.append(
            f"  per GPU of TP={tp}: {heads:g} KV head{'s' if heads != 1 else ''} each "
            f"({'replicated past ' + str(r['n_kv_head']) if tp > r['n_kv_head'] else 'split'}) "
            f"= {_human(r['kv_bytes_per_token_per_gpu'])} per token, "
            f"{_human(r['total_kv_bytes_per_gpu'])} for the batch")
    if "draft_model" in r:
        lines.append(
            f"  draft {r['draft_model']}: {_human(r['draft_kv_bytes_per_token'])} of KV per "
            f"token beside the target's ({_human(r['draft_kv_bytes_per_token_per_gpu'])} per "
            f"GPU at draft TP={r['draft_tensor_parallel_size']})")
    if "hardware" not in r:
        return "\n".join(lines)
    lines.append("")
    where = f"per GPU of TP={tp}" if tp > 1 else "one GPU"
    rows = [
        ("capacity", r["capacity_bytes"]),
        (f"budget ({r['gpu_memory_utilization']:g} x capacity)", r["budget_bytes"]),
        (f"- weights ({r['dtype']})", r["weight_bytes_per_gpu"]),
    ]
    if "draft_model" in r:
        rows.append(("- draft weights", r["draft_weight_bytes_per_gpu"]))
    rows += [
        (f"- activation peak ({r['max_num_batched_tokens']} tok)", r["activation_peak_bytes"]),
        (f"= left for the KV pool ({r['kv_cache_dtype']})", r["kv_pool_bytes_per_gpu"]),
    ]
    lines.append(f"memory plan: {r['model']} on {r['hardware']}, {where}")
    lines += [f"  {label:<36} {value / GIB:>9.2f} GiB" for label, value in rows]
    if not r["fits"]:
        lines.append(f"  a KV block needs {_human(r['kv_block_bytes_per_gpu'])}: no block fits, "
                     f"so no request does")
        return "\n".join(lines)
    lines.append(f"  KV capacity                          {r['num_kv_tokens']:>9,} tokens = "
                 f"{r['num_kv_blocks']:,} blocks of {r['block_size']}")
    verdict = "fits" if r["batch_fits"] else "does NOT fit"
    lines.append(
        f"  at {r['seq_len']:,} tokens per request ({r['blocks_per_request']} blocks): up to "
        f"{r['max_concurrent_requests']:,} requests at once; a batch of {r['batch_size']:,} "
        f"{verdict}")
    return "\n".join(lines)
