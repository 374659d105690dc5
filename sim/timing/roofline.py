"""The operators of one forward pass as roofline terms, linear in a few step features.

Every operator of a decoder layer (and the head and sampler) is written as FLOPs and HBM bytes
that are *linear* in a short feature vector of the step (total new tokens, logit rows, attention
query-key pairs, KV tokens read, expected experts hit, ...). The cost model then prices a step
with two small matrix-vector products instead of a loop over layers: identical layers are one row
with a multiplicity.

Conventions, per GPU under tensor parallelism t (Megatron-LM sharding, as vLLM does it):
- a GEMM of weight [K, N] on T tokens does 2*T*K*N FLOPs and moves K*N weight bytes (read once
  per step, so batch-1 decode is bound by weight bytes) plus T*(K+N) activation bytes;
- column-parallel QKV / gate+up and row-parallel O / down split K or N by t; query heads split
  by t, KV heads too, replicated when t > n_kv_head; norms, residual adds and the router are
  replicated on every GPU;
- attention: 4*n_head*d_head FLOPs per query-key pair (QK^T and PV); decode reads each
  sequence's whole KV (memory-bound), prefill is compute-bound;
- MoE: the expert GEMMs do the work of top-k experts per token and read the weights of the
  experts actually hit, E*(1-(1-k/E)^T) of them in expectation for T tokens;
- element-wise kernels (activation, norms, RoPE, adds, sampling) move bytes only.

References: Williams, Waterman, Patterson 2009 (roofline model); Shoeybi et al. 2019
(Megatron-LM tensor parallelism); Dao et al. 2022 (FlashAttention FLOP count); Kwon et al. 2023
(vLLM PagedAttention decode); Fedus et al. 2022 (Switch/top-k routing); Vidur (Agrawal et al.
2024) for the per-operator split that calibration compares against.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Step features (indices into the feature vector x of a step).
F_ONE = 0  # 1: terms paid once per step (weight reads)
F_TOK = 1  # total new tokens T
F_LOGIT = 2  # LM-head rows
F_PRE_PAIRS = 3  # query-key pairs of prefill sequences
F_PRE_KV = 4  # KV tokens read by prefill sequences (context + new)
F_PRE_TOK = 5  # new tokens of prefill sequences
F_DEC_KV = 6  # KV tokens read by decode sequences (= their query-key pairs)
F_DEC_SEQ = 7  # decode sequences (= their new tokens)
F_EXPERTS = 8  # expected distinct routed experts hit per MoE layer
F_PRE_SEQ = 9  # prefill sequences
NUM_FEATURES = 10

# Efficiency classes: which (flops, bandwidth) efficiency pair prices an op.
GEMM, ATTENTION, ELEMENTWISE = "gemm", "attention", "elementwise"

# Constants fitted jointly on Vidur's A100 and A40 kernel times (`sim.timing.calibration`), device-
# independent; the per-device factors live in the profiles' [efficiency] tables.
# Fixed GPU time of one kernel in units of the profile's `kernel_launch_s`: a GEMM ~1.4 (launch
# plus tile prologue/epilogue and wave tail, ~5.5 us), a small element-wise kernel ~0.6 (~2.3 us).
# Attention kernels are GEMM-like.
LATENCY_UNITS: dict[str, float] = {GEMM: 1.4, ATTENTION: 1.4, ELEMENTWISE: 0.6}
# The roofline's corner is soft: time = (compute^p + memory^p)^(1/p) >= max(compute, memory), as
# a kernel near the ridge point neither fully overlaps nor fully serialises its loads and math.
ROOFLINE_P = 1.5
# Achieved bandwidth of some element-wise kernels relative to `elementwise_bandwidth` (same fit):
# RMSNorm's row reduction runs slower than a plain map, a residual add streams near peak.
NORM_BW_SCALE = 0.75
ADD_BW_SCALE = 2.0


@dataclass(frozen=True)
class Op:
    """One operator: FLOPs and bytes of one instance as coefficient rows over the features."""

    name: str
    part: str  # the StepCost part it is charged to
    count: int  # instances per step (layers that have it)
    launches: int  # kernels per instance (each pays the per-kernel latency)
    kind: str  # GEMM, ATTENTION or ELEMENTWISE
    active: int  # feature that must be > 0 for the op to run at all
    flops: np.ndarray  # [NUM_FEATURES]
    bytes: np.ndarray  # [NUM_FEATURES]
    bw_scale: float = 1.0  # achieved bandwidth relative to its class (efficiency capped at 1)
    # seconds per feature added to the compute side (work off the tensor cores, such as weight
    # dequantization; see sim.timing.quantization), or None
    extra_compute_s: np.ndarray | None = None  # [NUM_FEATURES]


@dataclass(frozen=True)
class Dims:
    """Per-GPU dimensions and element sizes that the operator table needs."""

    n_embd: int
    n_head_gpu: float  # query heads per GPU
    n_kv_head_gpu: float  # KV heads per GPU (>= 1: replicated when t > n_kv_head)
    d_head: int
    n_inner_gpu: float
    moe_n_inner_gpu: float
    shared_n_inner_gpu: float
    n_vocab_gpu: float
    n_vocab: int
    n_expert: int
    n_expert_per_tok: int
    gated: bool
    weight_bytes: float  # bytes per weight element
    act_bytes: float  # bytes per activation element
    head_bytes: float  # bytes per embedding / LM-head weight (kept unquantised)
    kv_bytes: float  # bytes per KV-cache element


FEATURE_INDEX: dict[str, int] = {
    "F_ONE": F_ONE, "F_TOK": F_TOK, "F_LOGIT": F_LOGIT, "F_PRE_PAIRS": F_PRE_PAIRS,
    "F_PRE_KV": F_PRE_KV, "F_PRE_TOK": F_PRE_TOK, "F_DEC_KV": F_DEC_KV, "F_DEC_SEQ": F_DEC_SEQ,
    "F_EXPERTS": F_EXPERTS, "F_PRE_SEQ": F_PRE_SEQ,
}


def _row(**terms: float) -> np.ndarray:
    """A coefficient row over the features, e.g. `_row(F_ONE=weight_bytes, F_TOK=bytes_per_tok)`."""
    row = np.zeros(NUM_FEATURES)  # [NUM_FEATURES]
    for key, value in terms.items():
        row[FEATURE_INDEX[key]] += value
    return row


def gemm(name: str, part: str, count: int, k: float, n: float, dims: Dims, *,
         rows: str = "F_TOK", w_bytes: float | None = None, launches: int = 1) -> Op:
    """A [rows, k] x [k, n] GEMM whose weight is read once per step."""
    wb = dims.weight_bytes if w_bytes is None else w_bytes
    ab = dims.act_bytes
    return Op(name, part, count, launches, GEMM, FEATURE_INDEX[rows],
              _row(**{rows: 2.0 * k * n}),
              _row(F_ONE=k * n * wb, **{rows: (k + n) * ab}))


def elementwise(name: str, part: str, count: int, read: float, write: float, dims: Dims, *,
                rows: str = "F_TOK", fixed_bytes: float = 0.0, launches: int = 1,
                elem_bytes: float | None = None, bw_scale: float = 1.0) -> Op:
    """A memory-bound kernel reading `read` and writing `write` elements per row."""
    eb = dims.act_bytes if elem_bytes is None else elem_bytes
    return Op(name, part, count, launches, ELEMENTWISE, FEATURE_INDEX[rows], _row(),
              _row(F_ONE=fixed_bytes, **{rows: (read + write) * eb}), bw_scale)


def attention_ops(dims: Dims, n_layer: int) -> list[Op]:
    """Prefill (FlashAttention-style) and decode (PagedAttention-style) kernels of all layers."""
    qo = 2.0 * dims.n_head_gpu * dims.d_head * dims.act_bytes  # read Q, write O, per token
    kv = 2.0 * dims.n_kv_head_gpu * dims.d_head * dims.kv_bytes  # K and V of one token
    pair_flops = 4.0 * dims.n_head_gpu * dims.d_head
    prefill = Op("attn_prefill", "attn_prefill", n_layer, 2, ATTENTION, F_PRE_SEQ,
                 _row(F_PRE_PAIRS=pair_flops),
                 # read the KV of context + new tokens; write the new tokens' KV; Q in, O out
                 _row(F_PRE_KV=kv, F_PRE_TOK=qo + kv))
    decode = Op("attn_decode", "attn_decode", n_layer, 2, ATTENTION, F_DEC_SEQ,
                _row(F_DEC_KV=pair_flops),
                _row(F_DEC_KV=kv, F_DEC_SEQ=qo + kv))
    return [prefill, decode]


def layer_ops(dims: Dims, n_layer: int, n_dense: int, n_moe: int) -> list[Op]:
    """All operators of a step, grouped by identical layers."""
    e, d = dims.n_embd, dims.d_head
    q_dim, kv_dim = dims.n_head_gpu * d, dims.n_kv_head_gpu * d
    up_mult = 2.0 if dims.gated else 1.0  # fused gate+up GEMM
    act_read = up_mult  # gated: read gate and up; plain: read one
    ops = [
        elementwise("embed", "elementwise", 1, e, e, dims),
        elementwise("input_layernorm", "norms", n_layer, e, e, dims, fixed_bytes=e * 2.0,
                    bw_scale=NORM_BW_SCALE),
        gemm("attn_pre_proj", "qkv_proj", n_layer, e, q_dim + 2 * kv_dim, dims),
        elementwise("attn_rope", "rope", n_layer, q_dim + kv_dim, q_dim + kv_dim, dims),
        *attention_ops(dims, n_layer),
        gemm("attn_post_proj", "o_proj", n_layer, q_dim, e, dims),
        elementwise("post_attention_layernorm", "norms", n_layer, e, e, dims,
                    fixed_bytes=e * 2.0, bw_scale=NORM_BW_SCALE),
        # two residual adds per layer
        elementwise("add", "elementwise", 2 * n_layer, 2 * e, e, dims, bw_scale=ADD_BW_SCALE),
    ]
    if n_dense:
        inner = dims.n_inner_gpu
        ops += [
            gemm("mlp_up_proj", "mlp", n_dense, e, up_mult * inner, dims),
            elementwise("mlp_act", "mlp", n_dense, act_read * inner, inner, dims),
            gemm("mlp_down_proj", "mlp", n_dense, inner, e, dims),
        ]
    if n_moe:
        ops += moe_ops(dims, n_moe)
    ops += [
        elementwise("final_norm", "norms", 1, e, e, dims, fixed_bytes=e * 2.0,
                    bw_scale=NORM_BW_SCALE),
        gemm("lm_head", "lm_head", 1, e, dims.n_vocab_gpu, dims, rows="F_LOGIT",
             w_bytes=dims.head_bytes),
        # fp32 logits of the full vocabulary: softmax reads and writes, sampling reads again
        elementwise("sampling", "sampling", 1, 2.0 * dims.n_vocab, 1.0 * dims.n_vocab, dims,
                    rows="F_LOGIT", launches=4, elem_bytes=4.0),
    ]
    return ops


def moe_ops(dims: Dims, n_moe: int) -> list[Op]:
    """Router, routed experts (grouped GEMMs) and the optional shared expert of MoE layers."""
    e, k = dims.n_embd, dims.n_expert_per_tok
    inner = dims.moe_n_inner_gpu
    up_mult = 2.0 if dims.gated else 1.0
    wb, ab = dims.weight_bytes, dims.act_bytes
    ops = [
        # router GEMM + softmax/top-k (replicated on every GPU)
        gemm("moe_router", "moe", n_moe, e, dims.n_expert, dims, w_bytes=ab, launches=3),
        Op("moe_up_proj", "moe", n_moe, 1, GEMM, F_TOK,
           _row(F_TOK=2.0 * k * e * up_mult * inner),
           _row(F_EXPERTS=e * up_mult * inner * wb, F_TOK=k * (e + up_mult * inner) * ab)),
        elementwise("moe_act", "moe", n_moe, k * up_mult * inner, k * inner, dims),
        Op("moe_down_proj", "moe", n_moe, 1, GEMM, F_TOK,
           _row(F_TOK=2.0 * k * inner * e),
           _row(F_EXPERTS=inner * e * wb, F_TOK=k * (inner + e) * ab)),
    ]
    shared = dims.shared_n_inner_gpu
    if shared:
        ops += [
            gemm("shared_up_proj", "moe", n_moe, e, up_mult * shared + 1, dims),
            elementwise("shared_act", "moe", n_moe, up_mult * shared, shared, dims),
            gemm("shared_down_proj", "moe", n_moe, shared, e, dims),
        ]
    return ops


def expected_experts_hit(num_tokens: float, n_expert: int, top_k: int) -> float:
    """Expected distinct experts hit when `num_tokens` tokens each pick `top_k` of `n_expert`
    uniformly: E * (1 - (1 - k/E)^T)."""
    if n_expert == 0 or num_tokens <= 0:
        return 0.0
    return n_expert * (1.0 - (1.0 - top_k / n_expert) ** num_tokens)
