"""The timing side: the seconds one engine step takes for a target model on a target GPU.

Each operator (see `sim.timing.roofline`) is priced on its own roofline,

    compute = flops / (peak_flops * flops efficiency),  memory = bytes / (hbm_bytes_per_s * bw eff.)
    time = (compute^p + memory^p)^(1/p) + kernels * fixed kernel time

a roofline with a soft corner (p = `roofline.ROOFLINE_P`, >= the hard max) plus a fixed time per
kernel (`roofline.LATENCY_UNITS` x the profile's kernel_launch_s), the efficiencies coming from
the hardware profile's `[efficiency]` table (calibrated against measured kernel times, see
`sim.timing.calibration`). `roofline_bound_s` is the physical floor no step is priced below. A fixed
`step_overhead_s` per step stands for the CPU work around the forward (scheduling, input
preparation, sampling bookkeeping). The price depends only on the step's shape, never on token
values, and permuting sequences never changes it.

A sequence with one new token is priced in the decode attention kernel, one with more in the
prefill kernel, each kernel on its own roofline over all its sequences. So the cost is monotone in
context, in sequences and in the new tokens of a prefill, but turning a long-context decode into a
2-token step can cost less attention time when the prefill kernel is compute-bound (its memory
traffic then overlaps the compute).

KV eviction (`cache.kv_eviction`) is a cap on the cached context one sequence's attention reads
(`kv_context_cap_tokens`), applied in `features`, the one place every price goes through, so
`step_cost`, `step_time_s`, `roofline_bound_s`, `stage_times_s` and the `layer_op_*` numbers
all see the same step: a capped step costs exactly what the step with every context replaced
by `min(context, cap)` costs uncapped.

Tensor parallelism divides the per-GPU work; the `comm` part is 0 here:
`parallel.cost.ParallelCostModel` wraps this model and prices the collectives. Both satisfy
`sim.core.protocols.Pricer`, what the engine needs from a step pricer (this one as a 1-stage
pipeline).

References: Williams et al. 2009 (roofline); Yuan et al. 2024 (LLM-Viewer, roofline analysis of
LLM inference); Agrawal et al. 2024 (Vidur, operator-level simulation of LLM serving).
"""

from __future__ import annotations

import numpy as np

from sim.core.dtypes import FloatArray, IntArray, canonical_dtype, dtype_bytes
from sim.core.errors import ConfigError
from sim.core.model_config import ModelConfig
from sim.core.quantization import QuantSpec
from sim.core.step_shape import StepCost, StepShape
from sim.timing.hardware import HardwareProfile
from sim.timing.roofline import (
    ATTENTION,
    ELEMENTWISE,
    F_DEC_KV,
    GEMM,
    LATENCY_UNITS,
    NUM_FEATURES,
    ROOFLINE_P,
    Dims,
    Op,
    layer_ops,
)

__all__ = ["DEFAULT_EFFICIENCY", "DEFAULT_STEP_OVERHEAD_S", "CostModel", "StepCost", "StepShape"]

# CPU time per engine step outside the GPU kernels (scheduler, input tensors, detokenisation).
# vLLM-class engines spend on the order of a millisecond here per step (Vidur models the same
# term as "CPU overhead"); set 0 to price GPU time only.
DEFAULT_STEP_OVERHEAD_S = 1e-3

# Used when a profile's [efficiency] table lacks a key (fractions of the datasheet peak).
DEFAULT_EFFICIENCY: dict[str, float] = {
    "matmul_flops": 0.7,
    "memory_bandwidth": 0.8,
    "elementwise_bandwidth": 0.7,
    "attention_flops": 0.5,
    "attention_bandwidth": 0.8,
}
# keys a profile may lack, read as another key (the profile format fixes its key set)
_FALLBACK = {"attention_bandwidth": "memory_bandwidth"}
_ACT_DTYPES = ("float32", "float16", "bfloat16")
_BOUND = {True: "compute", False: "memory"}
_PART_ORDER = ("qkv_proj", "attn_prefill", "attn_decode", "o_proj", "mlp", "moe", "norms",
               "rope", "elementwise", "quant", "lm_head", "sampling")


def efficiency(hardware: HardwareProfile, key: str) -> float:
    """`hardware.efficiency[key]`, falling back to `DEFAULT_EFFICIENCY` for keys it lacks."""
    table = hardware.efficiency
    value = table.get(key, table.get(_FALLBACK.get(key, key)))
    return float(DEFAULT_EFFICIENCY[key] if value is None else value)


def _per_gpu_kv_heads(model: ModelConfig, tp: int) -> float:
    if model.n_kv_head % tp == 0:
        return model.n_kv_head / tp
    if tp % model.n_kv_head == 0:
        return 1.0  # each KV head replicated on tp / n_kv_head GPUs
    raise ConfigError(
        f"tensor_parallel_size {tp} must divide n_kv_head ({model.n_kv_head}) or be a multiple "
        f"of it for {model.name}"
    )


class CostModel:
    """Prices `StepShape`s for `model` on `hardware` (a `sim.timing.hardware.HardwareProfile`).

    `dtype` is the weight/activation dtype (default: the model's); it picks the GEMM peak FLOP/s
    and the weight bytes (weight-only int4 computes in 16 bit). `kv_cache_dtype` (default: the
    activation dtype) sets the KV bytes. `quantization` (a `sim.core.quantization.QuantSpec`,
    already resolved for `hardware`) prices quantized weights, int8/fp8 GEMMs and
    (de)quantization work on top of the 16-bit `dtype` (see `sim.timing.quantization`).

    `kv_context_cap_tokens` (None: no cap) is the most cached tokens of one sequence that the
    step's attention reads, the KV eviction budget (`cache.kv_eviction.KVEviction.budget`):
    each sequence is priced with context `min(context, cap)`, its new tokens attending to that
    capped context and, causally, to each other (the model's own `sliding_window` then applies
    on top). Per policy, with `budget` the positions it keeps per sequence (and layer):

    - H2O (Zhang et al. 2023) keeps at most `budget` positions; a new token reads the kept set
      plus itself, so a decode reads `min(context, budget) + 1` keys: the cap is exact.
    - Sliding window (Jiang et al. 2023) and StreamingLLM (Xiao et al. 2023: sinks + window)
      let a query read its window *including itself*, so a decode reads
      `min(context, budget - 1) + 1` keys; the cap prices one key more per sequence, an upper
      bound within 1/budget of the attention reads.
    - A prefill chunk's KV is all resident during its step (the manager holds it, evictions
      follow the step) and it is priced as a dense causal block over the capped context plus
      the chunk; the functional model lets each of its queries read at most `budget` keys, so
      for a chunk longer than the budget this is an upper bound on the kernel's work.
    """

    def __init__(self, model: ModelConfig, hardware: HardwareProfile, dtype: str | None = None,
                 kv_cache_dtype: str | None = None, tensor_parallel_size: int = 1,
                 step_overhead_s: float = DEFAULT_STEP_OVERHEAD_S,
                 quantization: QuantSpec | None = None,
                 kv_context_cap_tokens: int | None = None) -> None:
        tp = int(tensor_parallel_size)
        if tp < 1 or model.n_head % tp:
            raise ConfigError(
                f"tensor_parallel_size must be a positive divisor of n_head ({model.n_head}) "
                f"for {model.name}, got {tensor_parallel_size}"
            )
        if step_overhead_s < 0:
            raise ConfigError(f"step_overhead_s must be >= 0, got {step_overhead_s}")
        cap = kv_context_cap_tokens
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
            raise ConfigError(f"kv_context_cap_tokens must be None (no KV eviction) or a "
                              f"positive number of tokens (the eviction budget), got {cap!r}")
        #: most cached tokens per sequence that attention reads (None: the whole context)
        self.kv_context_cap_tokens = cap
        self.model, self.hardware, self.tensor_parallel_size = model, hardware, tp
        self.quantization = quantization
        self.dtype = canonical_dtype(dtype or model.dtype)
        self.act_dtype = self.dtype if self.dtype in _ACT_DTYPES else (
            model.dtype if model.dtype in _ACT_DTYPES else "float16")
        if self.dtype == "float64":
            self.act_dtype = "float32"
        self.kv_cache_dtype = canonical_dtype(kv_cache_dtype or self.act_dtype)
        self.step_overhead_s = float(step_overhead_s)
        peaks = hardware.peak_flops
        gemm_dtype = self.dtype if self.dtype in peaks else self.act_dtype
        self.gemm_peak_flops = float(hardware.peak_flops_for(gemm_dtype))
        if quantization is not None:
            from sim.timing.quantization import gemm_peak_flops

            self.gemm_peak_flops = gemm_peak_flops(quantization, hardware, self.act_dtype)
        self.attn_peak_flops = float(hardware.peak_flops_for(self.act_dtype))
        self.hbm_bytes_per_s = float(hardware.hbm_bytes_per_s)
        self.dims = self._dims()
        n_moe = model.num_moe_layers
        self.ops: list[Op] = layer_ops(self.dims, model.n_layer, model.n_layer - n_moe, n_moe)
        if quantization is not None:
            from sim.timing.quantization import quantized_ops

            self.ops = quantized_ops(self.ops, self.dims, quantization, hardware, self.act_dtype,
                                     model.n_layer, min(1.0, efficiency(hardware, "matmul_flops")))
        self._build_tables()

    # ------------------------------------------------------------------ construction
    def _dims(self) -> Dims:
        m, tp = self.model, self.tensor_parallel_size
        ab = 4.0 if self.act_dtype == "float32" else 2.0
        if self.dtype == "float64":
            ab = 8.0
        return Dims(
            n_embd=m.n_embd, n_head_gpu=m.n_head / tp, n_kv_head_gpu=_per_gpu_kv_heads(m, tp),
            d_head=m.d_head, n_inner_gpu=m.n_inner / tp, moe_n_inner_gpu=m.moe_n_inner / tp,
            shared_n_inner_gpu=m.shared_expert_n_inner / tp, n_vocab_gpu=m.n_vocab / tp,
            n_vocab=m.n_vocab, n_expert=m.n_expert, n_expert_per_tok=m.n_expert_per_tok,
            gated=m.gated_mlp, act_bytes=ab, weight_bytes=dtype_bytes(self.dtype)
            if self.quantization is None else self.quantization.weight_bytes_per_param(m.n_embd),
            head_bytes=max(ab, dtype_bytes(self.dtype)), kv_bytes=dtype_bytes(self.kv_cache_dtype),
        )

    def _build_tables(self) -> None:
        hw, ops = self.hardware, self.ops
        eff = {k: min(1.0, efficiency(hw, k)) for k in DEFAULT_EFFICIENCY}
        flops_eff = {GEMM: eff["matmul_flops"], ATTENTION: eff["attention_flops"],
                     ELEMENTWISE: 1.0}
        bw_eff = {GEMM: eff["memory_bandwidth"], ATTENTION: eff["attention_bandwidth"],
                  ELEMENTWISE: eff["elementwise_bandwidth"]}
        n_op = len(ops)
        counts = np.array([op.count for op in ops], dtype=float)  # [n_op]
        flops = np.stack([op.flops for op in ops]) * counts[:, None]  # [n_op, NUM_FEATURES]
        nbytes = np.stack([op.bytes for op in ops]) * counts[:, None]  # [n_op, NUM_FEATURES]
        peak = np.array([self.attn_peak_flops if op.kind == ATTENTION else self.gemm_peak_flops
                         for op in ops])  # [n_op]
        s_per_flop = 1.0 / (peak * np.array([flops_eff[op.kind] for op in ops]))  # [n_op]
        s_per_byte = 1.0 / (self.hbm_bytes_per_s * np.array(
            [min(1.0, bw_eff[op.kind] * op.bw_scale) for op in ops]))  # [n_op]
        # one matrix-vector product gives, per op, compute seconds and memory seconds, and in
        # the last two rows the step's total FLOPs and bytes
        extra_s = np.stack([np.zeros(NUM_FEATURES) if op.extra_compute_s is None
                            else op.extra_compute_s for op in ops]) * counts[:, None]
        self._matrix = np.concatenate([
            flops * s_per_flop[:, None] + extra_s, nbytes * s_per_byte[:, None],
            flops.sum(axis=0, keepdims=True), nbytes.sum(axis=0, keepdims=True),
        ])  # [2 * n_op + 2, NUM_FEATURES]
        # the decode-KV column apart: it is the only feature that moves along a stretch of
        # plain decodes, so a stretch sums the other columns once (`decode_stretch_s`)
        self._matrix_kv = self._matrix[:, F_DEC_KV].copy()  # [2 * n_op + 2]
        self._matrix[:, F_DEC_KV] = 0.0
        self._n_op = n_op
        self._op_flops, self._op_bytes = flops / counts[:, None], nbytes / counts[:, None]
        self.kernel_launch_s = float(hw.kernel_launch_s)
        # fixed kernel time of each op, paid when its activity feature is > 0
        self._latency = np.zeros((n_op, NUM_FEATURES))  # [n_op, NUM_FEATURES]
        for i, op in enumerate(ops):
            self._latency[i, op.active] = (op.count * op.launches * LATENCY_UNITS[op.kind]
                                           * self.kernel_launch_s)
        present = [p for p in _PART_ORDER if any(op.part == p for op in ops)]
        self.part_names: tuple[str, ...] = (*present, "comm", "overhead")
        self._agg = np.array([[op.part == p for op in ops] for p in present],
                             dtype=float)  # [n_part, n_op]
        self._roof_peak_flops = max(self.gemm_peak_flops, self.attn_peak_flops)
        m = self.model
        self._window = m.sliding_window
        self._n_expert, self._top_k = m.n_expert, m.n_expert_per_tok

    # ------------------------------------------------------------------ pricing
    def features(self, shape: StepShape) -> np.ndarray:
        """The feature vector [NUM_FEATURES] of a step (sums over sequences: order-free)."""
        return self._features(shape.num_new_tokens, shape.num_context_tokens,
                              shape.total_logits)

    def _features(self, new: tuple[int, ...], ctx: tuple[int, ...], num_logits: int) -> np.ndarray:
        cap = self.kv_context_cap_tokens
        if cap is not None and max(ctx) > cap:  # KV eviction: attention reads <= cap cached
            ctx = tuple([min(c, cap) for c in ctx])
        num_seq = len(new)
        num_dec = new.count(1)
        window = self._window
        if window is not None and max(ctx) + max(new) > window:
            total_new = sum(new)
            pairs, kv_read, dec_kv = _windowed(new, ctx, window)
        elif num_dec == num_seq:  # pure decode: one query per sequence over context + 1 keys
            total_new = num_seq
            pairs = kv_read = dec_kv = sum(ctx) + num_seq
        else:  # decode sequences are summed wholesale; the (few) prefill ones one by one
            prefill = [(n, c) for n, c in zip(new, ctx, strict=True) if n != 1]
            pre_ctx = sum([c for _, c in prefill])
            pre_new = sum([n for n, _ in prefill])
            total_new = pre_new + num_dec
            dec_kv = sum(ctx) - pre_ctx + num_dec
            # causal: query i (0-based) of a sequence sees ctx + i + 1 keys
            pairs = dec_kv + sum([n * c + n * (n + 1) // 2 for n, c in prefill])
            kv_read = dec_kv + pre_ctx + pre_new
        experts = (self._n_expert * (1.0 - (1.0 - self._top_k / self._n_expert) ** total_new)
                   if self._n_expert else 0.0)
        return np.array([
            1.0, total_new, num_logits, pairs - dec_kv, kv_read - dec_kv, total_new - num_dec,
            dec_kv, num_dec, experts, num_seq - num_dec,
        ])  # [NUM_FEATURES] in the order of the F_* indices

    def _terms(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, float]:
        """Per op: total seconds, compute seconds, memory seconds; and step FLOPs, bytes."""
        # (the decode-KV column added last, apart from the row sums: `decode_stretch_s` sums
        # the rest once for a whole stretch and gets the same floats as step by step)
        y = (self._matrix * x).sum(axis=1) + self._matrix_kv * x[F_DEC_KV]  # [2 * n_op + 2]
        n = self._n_op
        compute_s, memory_s = y[:n], y[n:2 * n]  # [n_op] each
        p = ROOFLINE_P
        times = ((compute_s**p + memory_s**p) ** (1.0 / p)
                 + (self._latency * (x > 0)).sum(axis=1))  # [n_op]
        return times, compute_s, memory_s, float(y[2 * n]), float(y[2 * n + 1])

    def decode_stretch_s(self, context_tokens: IntArray, num_steps: int) -> FloatArray:
        """[num_steps] times of consecutive plain-decode steps (`sim.core.protocols.Pricer`):
        the features of step k are those of `step_time_s((1,) * n, context + k)` (linear in k),
        all but the decode-KV column summed once, that column added per step as `_terms` does."""
        num_seqs = len(context_tokens)
        cap, window = self.kv_context_cap_tokens, self._window
        if cap is not None or window is not None:  # capped reads: priced step by step
            ones = (1,) * num_seqs
            return np.array([self.step_time_s(ones, tuple((context_tokens + k).tolist()),
                                              num_seqs) for k in range(num_steps)])
        x = self._features((1,) * num_seqs, tuple(context_tokens.tolist()),
                           num_seqs)  # [NUM_FEATURES] of the first step
        # pure decode: one query per sequence over context + 1 keys, so step k reads k * n more
        dec_kv = float(int(context_tokens.sum()) + num_seqs) + np.arange(
            num_steps) * float(num_seqs)  # [num_steps] (exact integers)
        y = ((self._matrix * x).sum(axis=1)[None, :]
             + self._matrix_kv[None, :] * dec_kv[:, None])  # [num_steps, 2 n_op + 2]
        n = self._n_op
        compute_s, memory_s = y[:, :n], y[:, n:2 * n]  # [num_steps, n_op] each
        p = ROOFLINE_P
        latency = (self._latency * (x > 0)).sum(axis=1)  # [n_op], the same every step
        times = (compute_s**p + memory_s**p) ** (1.0 / p) + latency[None, :]  # [num_steps, n_op]
        return times.sum(axis=1) + self.step_overhead_s


    def step_cost(self, shape: StepShape) -> StepCost:
        """Seconds, per part, that `shape` takes; see the module docstring for the model."""
        x = self.features(shape)
        times, compute_s, memory_s, flops, nbytes = self._terms(x)
        names = self.part_names
        parts = dict(zip(names, (self._agg @ times).tolist(), strict=False))  # n_part entries
        is_compute = (self._agg @ (compute_s - memory_s) > 0).tolist()  # [n_part]
        bound = dict(zip(names, [_BOUND[c] for c in is_compute], strict=False))
        # comm: the tensor-parallel all-reduce is priced by parallel/ (a later issue); 0 here
        parts["comm"] = 0.0
        parts["overhead"] = self.step_overhead_s
        bound["comm"] = bound["overhead"] = "latency"
        total = float(times.sum()) + self.step_overhead_s
        return StepCost(total_s=total, parts=parts, bound=bound, flops=flops, bytes=nbytes)

    def step_time_s(self, num_new_tokens: tuple[int, ...], num_context_tokens: tuple[int, ...],
                    num_logits: int | None = None) -> float:
        """`step_cost(StepShape(new, ctx)).total_s` without building the breakdown (fast path;
        tuples of ints, `num_logits` the total LM-head rows, default one per sequence; no
        validation)."""
        lg = len(num_new_tokens) if num_logits is None else num_logits
        times = self._terms(self._features(num_new_tokens, num_context_tokens, lg))[0]
        return float(times.sum()) + self.step_overhead_s

    def roofline_bound_s(self, shape: StepShape) -> float:
        """The physical lower bound of a step: max(flops / peak, bytes / peak bandwidth), with no
        efficiencies, latencies or overhead."""
        _, _, _, flops, nbytes = self._terms(self.features(shape))
        return max(flops / self._roof_peak_flops, nbytes / self.hbm_bytes_per_s)

    def stage_times_s(self, shape: StepShape) -> list[float]:
        """Busy seconds of each pipeline stage: one stage here, the step without its overhead
        (`sim.core.protocols.Pricer`; `parallel.cost.ParallelCostModel` splits the layers)."""
        return [float(self._terms(self.features(shape))[0].sum())]

    def send_recv_s(self, shape: StepShape) -> float:
        """Seconds of one stage-boundary transfer: 0, a single stage has no boundary."""
        return 0.0

    def layer_op_times_s(self, num_tokens: int) -> dict[str, float]:
        """Seconds of one instance of each operator for a prefill of `num_tokens` tokens from an
        empty cache (what calibration compares with measured per-layer kernel times)."""
        times = self._terms(self.features(StepShape.prefill((num_tokens,))))[0]
        return {op.name: float(t) / op.count for op, t in zip(self.ops, times, strict=True)}

    def layer_op_work(self, num_tokens: int) -> dict[str, tuple[float, float]]:
        """(FLOPs, bytes) of one instance of each operator for a prefill of `num_tokens` tokens
        from an empty cache (independent of the efficiencies: calibration fits those)."""
        x = self.features(StepShape.prefill((num_tokens,)))
        flops, nbytes = self._op_flops @ x, self._op_bytes @ x  # [n_op] each
        return {op.name: (float(f), float(b))
                for op, f, b in zip(self.ops, flops, nbytes, strict=True)}

    def describe(self) -> str:
        m = self.model
        quant = "" if self.quantization is None else f" {self.quantization.describe()}"
        cap = self.kv_context_cap_tokens
        kv = self.kv_cache_dtype + ("" if cap is None else f", context <= {cap} tokens")
        return (f"timing: {m.name} {self.dtype}{quant} (kv {kv}) on "
                f"{self.hardware.display_name} "
                f"x{self.tensor_parallel_size}")


def _windowed(new: tuple[int, ...], ctx: tuple[int, ...],
              window: int) -> tuple[int, int, int]:
    """Query-key pairs, KV tokens read, and decode KV reads under a sliding window: query i of a
    sequence (0-based among its new tokens) sees min(ctx + i + 1, window) keys."""
    pairs = kv_read = dec_kv = 0
    for n, c in zip(new, ctx, strict=True):
        m = max(0, min(n, window - c))  # queries whose key span is below the window
        seq_pairs = m * c + m * (m + 1) // 2 + (n - m) * window
        pairs += seq_pairs
        kv_read += min(c + n, window)
        if n == 1:
            dec_kv += seq_pairs
    return pairs, kv_read, dec_kv
