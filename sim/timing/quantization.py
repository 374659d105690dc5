"""What quantization changes in the price of a step and in the memory plan.

`CostModel(..., quantization=spec)` calls `quantized_ops` on its operator table:

- **weight bytes**: every quantized projection (QKV, O, MLP, MoE experts, shared expert) reads
  `spec.weight_bytes_per_param()` bytes per weight (int4 + group scales and zero points, int8 +
  scales, fp8 + per-channel scales) instead of 2; embedding, LM head and router stay 16-bit.
- **GEMM peak**: w8a8 runs on the int8 tensor-core peak and fp8 on the fp8 peak
  (`QuantSpec.gemm_dtype`, via `HardwareProfile.peak_flops_for`); weight-only methods run at the
  16-bit peak. GEMMs that stay 16-bit (LM head, router) keep the 16-bit peak.
- **weight dequantization** (weight-only): the kernel converts each weight tile to 16 bit on the
  CUDA cores (int4: unpack, subtract the zero point, scale) once per tile of `DEQUANT_TILE_M`
  tokens, `DEQUANT_OPS_PER_WEIGHT` operations per weight at the profile's fp32 (CUDA-core) peak.
  That work sits on the compute side of the GEMM's roofline, so it hides under the weight stream
  at small batch (memory-bound decode) and shows at large batch (compute-bound prefill).
- **activation quantization** (w8a8, fp8): before each quantized GEMM a per-token kernel reads
  the 16-bit activations and writes 8-bit codes (`act_quant` ops in the `quant` part); the
  output scaling is fused into the GEMM epilogue (free).

`quantized_weight_bytes` gives the weights of one GPU for the memory plan, so the bytes freed by
quantization become KV-cache capacity.

References: Frantar et al. 2024, "MARLIN: Mixed-Precision Auto-Regressive Parallel Inference on
Large Language Models" (int4 x fp16 kernels near the 4x memory bound up to batch ~16-32, tile
dequantization on CUDA cores); Lin et al. 2024 (AWQ kernels); Xiao et al. 2023 (SmoothQuant:
per-token quantization kernels); NVIDIA A100 / H100 whitepapers (int8 and fp8 tensor-core peaks).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from sim.core.quantization import QuantSpec
from sim.timing.roofline import (
    F_EXPERTS,
    F_ONE,
    F_TOK,
    GEMM,
    NUM_FEATURES,
    Dims,
    Op,
    elementwise,
)

# GEMMs whose weights are quantized (names from `sim.timing.roofline.layer_ops`)
QUANTIZED_GEMMS = ("attn_pre_proj", "attn_post_proj", "mlp_up_proj", "mlp_down_proj",
                   "moe_up_proj", "moe_down_proj", "shared_up_proj", "shared_down_proj")
# Assumed: ~2 CUDA-core operations to turn one packed weight into fp16 and scale it (Marlin's
# lop3-based int4 -> fp16 conversion plus a fused multiply), redone for every 64-token tile.
DEQUANT_OPS_PER_WEIGHT = 2.0
DEQUANT_TILE_M = 64


def gemm_peak_flops(spec: QuantSpec, hardware: Any, act_dtype: str) -> float:
    """Peak FLOP/s of the quantized GEMMs on `hardware`."""
    return float(hardware.peak_flops_for(spec.gemm_dtype(act_dtype)))


def quantized_ops(ops: list[Op], dims: Dims, spec: QuantSpec, hardware: Any, act_dtype: str,
                  n_layer: int, matmul_efficiency: float) -> list[Op]:
    """`ops` with the dequantization and activation-quantization work of `spec` (module doc).

    `dims.weight_bytes` must already be the quantized bytes per weight; `n_layer` counts layers.
    """
    gemm_peak = gemm_peak_flops(spec, hardware, act_dtype)
    act_peak = float(hardware.peak_flops_for(act_dtype))
    vector_peak = float(hardware.peak_flops_for("float32"))  # CUDA-core rate
    out: list[Op] = []
    for op in ops:
        extra = np.zeros(NUM_FEATURES)  # [NUM_FEATURES] compute seconds per feature
        if op.kind == GEMM and op.name not in QUANTIZED_GEMMS and gemm_peak != act_peak:
            # a 16-bit GEMM among int8/fp8 ones: top its time up to the 16-bit peak
            extra += op.flops * (1.0 / act_peak - 1.0 / gemm_peak) / matmul_efficiency
        if op.kind == GEMM and op.name in QUANTIZED_GEMMS and spec.weight_only:
            weights = op.bytes / dims.weight_bytes  # weights per feature (F_ONE or F_EXPERTS)
            per_pass = DEQUANT_OPS_PER_WEIGHT / (vector_peak * matmul_efficiency)
            if op.bytes[F_EXPERTS] > 0:  # MoE: each expert hit, plus its tokens' tiles
                extra[F_EXPERTS] += weights[F_EXPERTS] * per_pass
                extra[F_TOK] += (op.flops[F_TOK] / 2.0) * per_pass / DEQUANT_TILE_M
            else:
                extra[F_ONE] += weights[F_ONE] * per_pass
                extra[F_TOK] += weights[F_ONE] * per_pass / DEQUANT_TILE_M
        out.append(replace(op, extra_compute_s=extra) if extra.any() else op)
    if spec.act_format is not None:
        out += act_quant_ops(dims, n_layer)
    return out


def act_quant_ops(dims: Dims, n_layer: int) -> list[Op]:
    """Per-token activation quantization before the four quantized GEMM inputs of each layer:
    read 16-bit, write 8-bit (half the bytes), one kernel each."""
    e = dims.n_embd
    q_dim = dims.n_head_gpu * dims.d_head
    inner = dims.n_inner_gpu if dims.n_inner_gpu else dims.moe_n_inner_gpu * dims.n_expert_per_tok
    width = e + q_dim + e + inner  # QKV, O, gate/up and down inputs per token
    return [elementwise("act_quant", "quant", n_layer, width, width / 2.0, dims, launches=4)]


def quantized_weight_bytes(model: Any, spec: QuantSpec, tensor_parallel_size: int = 1,
                           act_bytes: float = 2.0) -> float:
    """Bytes of one GPU's weights: quantized projections (with scales) + 16-bit embedding, LM
    head, norms and router, all divided over the tensor-parallel GPUs."""
    m = model
    head_params = m.n_vocab * m.n_embd * (1 if m.tie_word_embeddings else 2)
    router = m.num_moe_layers * m.n_expert * m.n_embd
    norms = (2 * m.n_layer + 1) * m.n_embd
    body = m.num_params() - head_params - router - norms
    qbytes = spec.weight_bytes_per_param(m.n_embd)
    return (body * qbytes + (head_params + router + norms) * act_bytes) / tensor_parallel_size


def quantized_memory_plan(plan: Any, model: Any, spec: QuantSpec, tensor_parallel_size: int = 1,
                          pipeline_parallel_size: int = 1) -> Any:
    """`plan` (a `MemoryPlan` sized with `dtype=spec.weight_format`) with the weights recounted
    by `quantized_weight_bytes` (scales included; 16-bit embedding, head, norms, router) and the
    KV pool re-cut from what is left. With pipeline stages the scale bytes are spread evenly over
    the stages (the plan's own stage split is kept). Raises `DoesNotFitError` when nothing is
    left for one KV block."""
    from dataclasses import replace as _replace

    from sim.core.errors import DoesNotFitError
    from sim.timing.memory_plan import GIB

    act_bytes = 4.0 if model.dtype == "float32" else 2.0
    if pipeline_parallel_size == 1:
        weights = quantized_weight_bytes(model, spec, tensor_parallel_size, act_bytes)
    else:
        body = quantized_weight_bytes(model, spec, 1, 0.0) / spec.weight_bytes_per_param(
            model.n_embd)  # quantized parameters
        nominal = 0.5 if spec.weight_format == "int4" else 1.0
        extra = spec.weight_bytes_per_param(model.n_embd) - nominal
        weights = plan.weight_bytes + body * extra / (tensor_parallel_size * pipeline_parallel_size)
    pool = plan.budget_bytes - weights - plan.activation_peak_bytes
    blocks = int(max(0.0, pool) // (plan.kv_bytes_per_token * plan.block_size))
    if blocks < 1:
        raise DoesNotFitError(
            f"{model.name} with {spec.describe()} does not fit on {plan.hardware_name}: "
            f"{weights / GIB:.1f} GiB of weights + {plan.activation_peak_bytes / GIB:.1f} GiB of "
            f"activations + one KV block exceed the {plan.budget_bytes / GIB:.1f} GiB budget; use "
            "more GPUs (tensor_parallel_size), a 4-bit method or a device with more memory")
    return _replace(plan, dtype=f"{spec.method}: {spec.weight_format}", weight_bytes=weights,
                    kv_pool_bytes=pool, num_kv_tokens=blocks * plan.block_size,
                    num_kv_blocks=blocks)
