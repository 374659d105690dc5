"""How one GPU's memory splits between weights, activations and the paged KV cache.

As vLLM sizes its KV cache: the budget is `gpu_memory_utilization x capacity`; the weights (this
GPU's tensor-parallel shard) and the activation peak of the largest forward are taken out, and
what remains is cut into KV blocks of `block_size` tokens. A model that does not fit raises
`DoesNotFitError` saying by how much and what would fit (a smaller dtype, more GPUs, a bigger
device).

Activation peak for a forward of M = max_num_batched_tokens tokens, per GPU (t = TP degree,
a = activation bytes, 2 for 16-bit, 4 for float32):

    hidden  = 2 M n_embd a                                     residual stream + normed input
    attn    = M (2 q + 2 kv) a,  q = n_head d_head / t, kv = n_kv_head d_head / t   QKV + output
    mlp     = M (g + 1) I a,     I = MLP width / t (MoE: k x expert width + shared), g = 2 gated
    logits  = 2 x 4 R n_vocab,   R = min(max_num_seqs, M) rows of fp32 logits and probabilities
    peak    = hidden + max(attn, mlp, logits)

With speculative decoding by a draft model (`with_draft`), the draft's weights (its TP shard, or
all of them on one rank when `draft_tensor_parallel_size=1`) come out of the pool too, and every
KV block holds the draft's KV for its tokens beside the target's (the draft caches the same
context), so a block costs `(kv_target + kv_draft) x block_size` bytes. vLLM sizes its pool the
same way: the draft is loaded before the profiling run and its KV layers share the block table
(`vllm/v1/worker/gpu_model_runner.py`: the drafter is loaded in `load_model`, and its attention
layers get KV cache specs beside the target's). The
draft's activations are not added: it runs before the target's forward, not beside it, and its
peak is below the target's.

Embedding and LM-head weights stay in 16 bit under weight quantisation (as AWQ/GPTQ/fp8
checkpoints keep them); every other weight is divided evenly over the TP GPUs (norms and replicated
KV heads are a rounding error here).

References: Kwon et al. 2023 (vLLM / PagedAttention: block-granular KV cache sized from the
memory left after a profiling forward); Pope et al. 2022 (memory accounting of inference).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from sim.core.dtypes import canonical_dtype, dtype_bytes
from sim.core.errors import ConfigError, DoesNotFitError
from sim.core.model_config import ModelConfig
from sim.timing.hardware import HardwareProfile, list_profiles, load_profile

GIB = float(2**30)
DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048  # vLLM's default token budget per step
DEFAULT_MAX_NUM_SEQS = 256  # vLLM's default
_SMALLER_DTYPES = ("fp8_e4m3", "int8", "int4")
_TP_CHOICES = (2, 4, 8)


def activation_dtype(model: ModelConfig, dtype: str) -> str:
    """The 16/32-bit dtype activations use when weights are stored as `dtype`."""
    if dtype in ("float32", "float16", "bfloat16"):
        return dtype
    if dtype == "float64":
        return "float32"
    return model.dtype if model.dtype in ("float32", "float16", "bfloat16") else "float16"


def weight_bytes_per_gpu(model: ModelConfig, dtype: str, tensor_parallel_size: int = 1) -> float:
    """Bytes of one GPU's weight shard (embedding and LM head kept at >= 16 bit)."""
    dtype = canonical_dtype(dtype)
    head_params = model.n_vocab * model.n_embd * (1 if model.tie_word_embeddings else 2)
    head_bytes = max(dtype_bytes(dtype), dtype_bytes(activation_dtype(model, dtype)))
    body = (model.num_params() - head_params) * dtype_bytes(dtype)
    return (body + head_params * head_bytes) / tensor_parallel_size


def activation_peak_bytes(model: ModelConfig, dtype: str, max_num_batched_tokens: int,
                          max_num_seqs: int, tensor_parallel_size: int = 1) -> float:
    """The activation peak of a forward of `max_num_batched_tokens` tokens (module docstring)."""
    act = dtype_bytes(activation_dtype(model, canonical_dtype(dtype)))
    tp, tokens = tensor_parallel_size, max_num_batched_tokens
    q_dim = model.n_head * model.d_head / tp
    kv_dim = max(1.0, model.n_kv_head / tp) * model.d_head
    up_mult = 2 if model.gated_mlp else 1
    inner = model.n_inner if model.num_moe_layers < model.n_layer else 0
    if model.is_moe:
        routed = model.n_expert_per_tok * model.moe_n_inner + model.shared_expert_n_inner
        inner = max(inner, routed)
    hidden = 2.0 * tokens * model.n_embd * act
    attn = tokens * (2 * q_dim + 2 * kv_dim) * act
    mlp = tokens * (up_mult + 1) * inner / tp * act
    logits = 2.0 * 4.0 * min(max_num_seqs, tokens) * model.n_vocab
    return hidden + max(attn, mlp, logits)


def kv_bytes_per_token_per_gpu(model: ModelConfig, kv_cache_dtype: str,
                               tensor_parallel_size: int = 1) -> float:
    """KV bytes one token takes on one GPU (KV heads split by TP, replicated past n_kv_head)."""
    kv_heads = max(1.0, model.n_kv_head / tensor_parallel_size)
    return 2.0 * model.n_layer * kv_heads * model.d_head * dtype_bytes(kv_cache_dtype)


@dataclass(frozen=True)
class MemoryPlan:
    """One GPU's memory split (all byte counts per GPU)."""

    model_name: str
    hardware_name: str
    dtype: str
    kv_cache_dtype: str
    tensor_parallel_size: int
    gpu_memory_utilization: float
    block_size: int
    capacity_bytes: float
    budget_bytes: float
    weight_bytes: float
    activation_peak_bytes: float
    kv_pool_bytes: float
    kv_bytes_per_token: float
    num_kv_tokens: int
    num_kv_blocks: int
    #: the speculative draft model's share (`with_draft`; zero without one)
    draft_model_name: str = ""
    draft_tensor_parallel_size: int = 1
    draft_weight_bytes: float = 0.0
    draft_kv_bytes_per_token: float = 0.0

    def __post_init__(self) -> None:
        for key in ("capacity_bytes", "budget_bytes", "weight_bytes", "activation_peak_bytes",
                    "kv_bytes_per_token", "num_kv_tokens", "num_kv_blocks",
                    "draft_weight_bytes", "draft_kv_bytes_per_token"):
            if getattr(self, key) < 0:
                raise ConfigError(f"MemoryPlan.{key} must be >= 0, got {getattr(self, key)}")
        if (self.weight_bytes + self.draft_weight_bytes + self.activation_peak_bytes
                + self.kv_pool_bytes > self.budget_bytes * (1 + 1e-12)):
            raise ConfigError("MemoryPlan: weights + draft weights + activations + KV pool "
                              "exceed the budget")

    def max_concurrent_requests(self, seq_len: int) -> int:
        """Requests of `seq_len` tokens whose KV fits at once (whole blocks each)."""
        blocks_per_request = -(-int(seq_len) // self.block_size)
        return self.num_kv_blocks // max(1, blocks_per_request)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        rows = [
            ("capacity", self.capacity_bytes),
            (f"budget ({self.gpu_memory_utilization:g} x capacity)", self.budget_bytes),
            (f"weights ({self.dtype})", self.weight_bytes),
        ]
        if self.draft_model_name:
            rows.append(("draft weights", self.draft_weight_bytes))
        rows += [
            ("activation peak", self.activation_peak_bytes),
            (f"KV pool ({self.kv_cache_dtype})", self.kv_pool_bytes),
        ]
        head = (f"memory plan: {self.model_name} on {self.hardware_name}"
                + (f", per GPU of TP={self.tensor_parallel_size}"
                   if self.tensor_parallel_size > 1 else ""))
        lines = [head] + [f"  {label:<28} {val / GIB:>9.2f} GiB" for label, val in rows]
        lines.append(f"  KV per token                 {self.kv_bytes_per_token / 2**10:>9.1f} KiB")
        if self.draft_model_name:
            where = (f", TP={self.draft_tensor_parallel_size}"
                     if self.draft_tensor_parallel_size > 1
                     else ", whole on this rank" if self.tensor_parallel_size > 1 else "")
            lines.append(f"  draft KV per token           "
                         f"{self.draft_kv_bytes_per_token / 2**10:>9.1f} KiB "
                         f"({self.draft_model_name}{where})")
        lines.append(f"  KV capacity                  {self.num_kv_tokens:>9,} tokens = "
                     f"{self.num_kv_blocks:,} blocks of {self.block_size}")
        return "\n".join(lines)


def plan_memory(model: ModelConfig, hardware: HardwareProfile, *, dtype: str | None = None,
                kv_cache_dtype: str | None = None, gpu_memory_utilization: float = 0.9,
                max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS,
                max_num_seqs: int = DEFAULT_MAX_NUM_SEQS, block_size: int = 16,
                tensor_parallel_size: int = 1) -> MemoryPlan:
    """Split one GPU's memory; raises `DoesNotFitError` (with what would fit) when the weights
    and activations leave no room for even one KV block."""
    if not 0 < gpu_memory_utilization <= 1:
        raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
    for key, value in (("max_num_batched_tokens", max_num_batched_tokens),
                       ("max_num_seqs", max_num_seqs), ("block_size", block_size),
                       ("tensor_parallel_size", tensor_parallel_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{key} must be a positive integer, got {value!r}")
    dtype = canonical_dtype(dtype or model.dtype)
    kv_dtype = canonical_dtype(kv_cache_dtype or activation_dtype(model, dtype))
    tp = tensor_parallel_size
    _check_tp(model, tp)
    capacity = float(hardware.mem_bytes)
    budget = gpu_memory_utilization * capacity
    weights = weight_bytes_per_gpu(model, dtype, tp)
    act = activation_peak_bytes(model, dtype, max_num_batched_tokens, max_num_seqs, tp)
    kv_per_token = kv_bytes_per_token_per_gpu(model, kv_dtype, tp)
    pool = budget - weights - act
    num_blocks = int(max(0.0, pool) // (kv_per_token * block_size))
    if num_blocks < 1:
        short = weights + act + kv_per_token * block_size - budget
        raise DoesNotFitError(_not_fit_message(
            model, hardware, dtype, tp, weights, act, budget, short,
            lambda d, t, cap: _fits(model, d, kv_dtype, t, cap * gpu_memory_utilization,
                                    max_num_batched_tokens, max_num_seqs, block_size)))
    return MemoryPlan(
        model_name=model.name, hardware_name=hardware.name, dtype=dtype, kv_cache_dtype=kv_dtype,
        tensor_parallel_size=tp, gpu_memory_utilization=gpu_memory_utilization,
        block_size=block_size, capacity_bytes=capacity, budget_bytes=budget,
        weight_bytes=weights, activation_peak_bytes=act, kv_pool_bytes=pool,
        kv_bytes_per_token=kv_per_token, num_kv_tokens=num_blocks * block_size,
        num_kv_blocks=num_blocks,
    )


def with_draft(plan: MemoryPlan, draft: ModelConfig, *, dtype: str,
               draft_tensor_parallel_size: int = 1) -> MemoryPlan:
    """`plan` with a speculative draft model's weights taken out of its KV pool and the draft's
    KV per token added to every block (module docstring); the pool is re-cut into fewer blocks.

    `dtype` is the draft's weight dtype; its KV uses the plan's `kv_cache_dtype`. With
    `draft_tensor_parallel_size` 1 this GPU holds the whole draft (the rank the draft runs on:
    the group's binding rank). Raises `DoesNotFitError` when no KV block is left."""
    dtp = draft_tensor_parallel_size
    if draft.n_head % dtp or (draft.n_kv_head % dtp and dtp % draft.n_kv_head):
        raise ConfigError(
            f"draft_tensor_parallel_size {dtp} must divide the draft's n_head ({draft.n_head}) "
            f"and divide or be a multiple of its n_kv_head ({draft.n_kv_head}) for "
            f"{draft.name}; use draft_tensor_parallel_size=1 (the draft on one rank)")
    draft_weights = weight_bytes_per_gpu(draft, dtype, dtp)
    draft_kv = kv_bytes_per_token_per_gpu(draft, plan.kv_cache_dtype, dtp)
    pool = plan.budget_bytes - plan.weight_bytes - draft_weights - plan.activation_peak_bytes
    block_bytes = (plan.kv_bytes_per_token + draft_kv) * plan.block_size
    num_blocks = int(max(0.0, pool) // block_bytes)
    if num_blocks < 1:
        short = block_bytes - pool
        raise DoesNotFitError(
            f"{plan.model_name} with the draft {draft.name} does not fit on "
            f"{plan.hardware_name}: {draft_weights / GIB:.2f} GiB of draft weights leave no "
            f"KV block (short by {short / GIB:.2f} GiB of the {plan.budget_bytes / GIB:.1f} GiB "
            f"budget); use a smaller draft (draft_num_layers or model), raise "
            f"gpu_memory_utilization, shard the draft (draft_tensor_parallel_size) or use "
            f"n-gram speculation (method='ngram', no weights)")
    return replace(plan, kv_pool_bytes=pool, num_kv_tokens=num_blocks * plan.block_size,
                   num_kv_blocks=num_blocks, draft_model_name=draft.name,
                   draft_tensor_parallel_size=dtp, draft_weight_bytes=draft_weights,
                   draft_kv_bytes_per_token=draft_kv)


def _check_tp(model: ModelConfig, tp: int) -> None:
    if model.n_head % tp or (model.n_kv_head % tp and tp % model.n_kv_head):
        raise ConfigError(
            f"tensor_parallel_size {tp} must divide n_head ({model.n_head}) and divide or be a "
            f"multiple of n_kv_head ({model.n_kv_head}) for {model.name}"
        )


def _tp_ok(model: ModelConfig, tp: int) -> bool:
    try:
        _check_tp(model, tp)
    except ConfigError:
        return False
    return True


def _fits(model: ModelConfig, dtype: str, kv_dtype: str, tp: int, budget: float,
          max_num_batched_tokens: int, max_num_seqs: int, block_size: int) -> bool:
    used = (weight_bytes_per_gpu(model, dtype, tp)
            + activation_peak_bytes(model, dtype, max_num_batched_tokens, max_num_seqs, tp)
            + kv_bytes_per_token_per_gpu(model, kv_dtype, tp) * block_size)
    return used <= budget


def _not_fit_message(model: ModelConfig, hardware: HardwareProfile, dtype: str, tp: int,
                     weights: float, act: float, budget: float, short: float,
                     fits: Any) -> str:
    cap = float(hardware.mem_bytes)
    where = f"{hardware.name}" + (f" x TP={tp}" if tp > 1 else "")
    head = (f"{model.name} in {dtype} does not fit on {where}: {weights / GIB:.1f} GiB of weights "
            f"({weights / 1e9:.0f} GB) + {act / GIB:.1f} GiB of activations + one KV block "
            f"exceed the {budget / GIB:.1f} GiB budget by {short / GIB:.1f} GiB")
    options = []
    dtypes = [d for d in _SMALLER_DTYPES
              if dtype_bytes(d) < dtype_bytes(dtype) and fits(d, tp, cap)]
    if dtypes:
        options.append(f"a smaller weight dtype ({', '.join(dtypes)})")
    more_gpus = [t for t in _TP_CHOICES if t > tp and _tp_ok(model, t) and fits(dtype, t, cap)]
    if more_gpus:
        options.append(f"more GPUs (tensor_parallel_size={more_gpus[0]})")
    devices = []
    for name in list_profiles():
        other = load_profile(name)
        if other.mem_bytes > cap and fits(dtype, tp, float(other.mem_bytes)):
            devices.append(name)
    if devices:
        options.append(f"a device with more memory ({', '.join(devices)})")
    if not options:
        options.append("a smaller model, or lower max_num_batched_tokens / max_num_seqs")
    return f"{head}; what would fit: {'; or '.join(options)}"
