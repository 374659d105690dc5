"""A parallel plan (tp, pp, ep, dp): how a model is split over GPUs, and whether it fits.

- **tp** tensor parallelism (Megatron-LM): every layer's matrices split over `tp` GPUs; query
  heads divided evenly, KV heads divided too or, when `tp > n_kv_head`, each KV head replicated
  on `tp / n_kv_head` GPUs (as vLLM does); the vocabulary padded to a multiple of `tp`
  (vLLM pads the embedding rows, so any vocabulary works).
- **pp** pipeline parallelism: contiguous layer stages, split as vLLM's `get_pp_indices` does
  (layers // pp each, the remainder going to the stages just before the last, which also holds
  the LM head); needs `pp <= n_layer`.
- **ep** expert parallelism (vLLM `enable_expert_parallel`): the experts of each MoE layer
  placed whole over the `ep = tp` GPUs of the tensor-parallel group (attention stays
  tensor-parallel); needs `n_expert % ep == 0`.
- **dp** data parallelism: `dp` independent replicas of the (tp x pp) model behind a router.

GPUs used: tp x pp x dp. `check` validates divisibility and sizes one GPU's memory (the stage
with the least KV room binds), raising `DoesNotFitError` that says by how much and which plans
on up to 8 GPUs would fit.

References: Shoeybi et al. 2019 (Megatron-LM); Narayanan et al. 2021 (PTD-P: tensor x pipeline
x data); Lepikhin et al. 2021 (GShard, expert parallelism); vLLM `vllm/config.py`
(ParallelConfig), `vllm/distributed/utils.py` (get_pp_indices).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sim.core.dtypes import canonical_dtype, dtype_bytes
from sim.core.errors import ConfigError, DoesNotFitError
from sim.core.model_config import ModelConfig
from sim.timing.hardware import HardwareProfile
from sim.timing.memory_plan import (
    DEFAULT_MAX_NUM_BATCHED_TOKENS,
    DEFAULT_MAX_NUM_SEQS,
    GIB,
    MemoryPlan,
    activation_dtype,
    activation_peak_bytes,
    plan_memory,
)

MAX_NODE_GPUS = 8  # plans suggested in "does not fit" messages stay within one 8-GPU node


def stage_layers(n_layer: int, pp: int) -> list[range]:
    """The layers of each pipeline stage (vLLM's get_pp_indices partition)."""
    if not 1 <= pp <= n_layer:
        raise ConfigError(f"pipeline_parallel_size {pp} must be between 1 and n_layer ({n_layer})"
                          "; every stage needs at least one layer")
    sizes = [n_layer // pp] * pp
    for i in range(2, n_layer % pp + 2):
        sizes[-i] += 1
    starts = [sum(sizes[:i]) for i in range(pp)]
    return [range(s, s + n) for s, n in zip(starts, sizes, strict=True)]


@dataclass(frozen=True)
class PlanMemory:
    """One GPU's memory under a plan: the binding stage's `MemoryPlan` plus every stage's."""

    plan: ParallelPlan
    binding: MemoryPlan  # the stage with the fewest KV tokens (that stage limits the batch)
    stages: tuple[MemoryPlan, ...]

    @property
    def num_kv_tokens(self) -> int:
        return self.binding.num_kv_tokens

    def format(self) -> str:
        head = f"{self.plan.describe()}: per GPU (stage with least KV room)"
        return head + "\n" + self.binding.format()


@dataclass(frozen=True)
class ParallelPlan:
    """(tp, pp, ep, dp); `ep` is 1 (experts tensor-parallel) or `tp` (experts placed whole)."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    dp: int = 1

    def __post_init__(self) -> None:
        for key in ("tp", "pp", "ep", "dp"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"ParallelPlan.{key} must be a positive integer, got {value!r}")
        if self.ep not in (1, self.tp):
            raise ConfigError(
                f"ParallelPlan.ep={self.ep}: experts are placed over the tensor-parallel group, "
                f"so ep must be 1 or tp ({self.tp}); use enable_expert_parallel with "
                "tensor_parallel_size for more expert ranks")

    @classmethod
    def from_args(cls, tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1,
                  data_parallel_size: int = 1, enable_expert_parallel: bool = False
                  ) -> ParallelPlan:
        """From vLLM's engine-argument names."""
        tp = int(tensor_parallel_size)
        return cls(tp=tp, pp=int(pipeline_parallel_size),
                   ep=tp if enable_expert_parallel else 1, dp=int(data_parallel_size))

    @property
    def num_gpus(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def is_trivial(self) -> bool:
        return self.num_gpus == 1

    def describe(self) -> str:
        return f"tp={self.tp} pp={self.pp} ep={self.ep} dp={self.dp} ({self.num_gpus} GPUs)"

    # ------------------------------------------------------------------ divisibility
    def check_shapes(self, model: ModelConfig) -> None:
        """Raise `ConfigError` naming the dimension that `model` cannot be split along."""
        tp, name = self.tp, model.name
        if model.n_head % tp:
            raise ConfigError(f"tensor_parallel_size {tp} must divide n_head ({model.n_head}) of "
                              f"{name}; use one of {divisors(model.n_head)}")
        if model.n_kv_head % tp and tp % model.n_kv_head:
            raise ConfigError(f"tensor_parallel_size {tp} must divide n_kv_head "
                              f"({model.n_kv_head}) of {name} or be a multiple of it (KV heads "
                              "are then replicated)")
        dense = model.num_moe_layers < model.n_layer
        if dense and model.n_inner % tp:
            raise ConfigError(f"tensor_parallel_size {tp} must divide the MLP width "
                              f"({model.n_inner}) of {name}")
        if self.ep > 1 and not model.is_moe:
            raise ConfigError(f"expert parallelism needs a mixture-of-experts model; {name} is "
                              "dense (drop enable_expert_parallel)")
        if model.is_moe:
            if self.ep > 1 and model.n_expert % self.ep:
                raise ConfigError(f"expert parallel size {self.ep} must divide n_expert "
                                  f"({model.n_expert}) of {name}")
            if self.ep == 1 and model.moe_n_inner % tp:
                raise ConfigError(f"tensor_parallel_size {tp} must divide the expert width "
                                  f"({model.moe_n_inner}) of {name}; or enable expert "
                                  "parallelism to place experts whole")
            if model.shared_expert_n_inner % tp:
                raise ConfigError(f"tensor_parallel_size {tp} must divide the shared expert "
                                  f"width ({model.shared_expert_n_inner}) of {name}")
        stage_layers(model.n_layer, self.pp)

    # ------------------------------------------------------------------ memory
    def weight_bytes_per_gpu(self, model: ModelConfig, dtype: str, stage: int) -> float:
        """Weights one GPU of `stage` holds: its layers' shard (+ replicated KV projections when
        tp > n_kv_head, + replicated norms), plus the vocab-parallel embedding on the first
        stage and LM head on the last (kept at >= 16 bit)."""
        dtype = canonical_dtype(dtype)
        tp, m = self.tp, model
        layers = stage_layers(m.n_layer, self.pp)[stage]
        wb = dtype_bytes(dtype)
        head_b = max(wb, dtype_bytes(activation_dtype(m, dtype)))
        kv_rep = max(1.0, m.n_kv_head / tp) - m.n_kv_head / tp  # extra KV heads from replication
        attn = m.attn_params_per_layer() / tp + 2 * kv_rep * m.d_head * m.n_embd
        body = 0.0
        for i in layers:
            mlp = m.moe_params_per_layer() if m.is_moe_layer(i) else m.dense_mlp_params(m.n_inner)
            body += attn + mlp / tp + 2 * m.norm_params()
        vocab = padded_vocab(m.n_vocab, tp) / tp * m.n_embd
        head = 0.0
        if stage == 0:
            head += vocab
        if stage == self.pp - 1:
            head += vocab + m.norm_params()
            if m.tie_word_embeddings and self.pp == 1:
                head -= vocab  # one array serves both
        return body * wb + head * head_b

    def check(self, model: ModelConfig, hardware: HardwareProfile, *, dtype: str | None = None,
              kv_cache_dtype: str | None = None, gpu_memory_utilization: float = 0.9,
              max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS,
              max_num_seqs: int = DEFAULT_MAX_NUM_SEQS, block_size: int = 16) -> PlanMemory:
        """Validate the split and size one GPU of every stage; raises `ConfigError` (shapes) or
        `DoesNotFitError` (memory: by how much, and which plans would fit)."""
        self.check_shapes(model)
        if not 0 < gpu_memory_utilization <= 1:
            raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got "
                              f"{gpu_memory_utilization}")
        dtype = canonical_dtype(dtype or model.dtype)
        kv_dtype = canonical_dtype(kv_cache_dtype or activation_dtype(model, dtype))
        budget = gpu_memory_utilization * float(hardware.mem_bytes)
        act = activation_peak_bytes(model, dtype, max_num_batched_tokens, max_num_seqs, self.tp)
        kv_heads = max(1.0, model.n_kv_head / self.tp)
        stages = []
        for s, layers in enumerate(stage_layers(model.n_layer, self.pp)):
            weights = self.weight_bytes_per_gpu(model, dtype, s)
            kv_per_tok = 2.0 * len(layers) * kv_heads * model.d_head * dtype_bytes(kv_dtype)
            pool = budget - weights - act
            blocks = int(max(0.0, pool) // (kv_per_tok * block_size))
            if blocks < 1:
                short = weights + act + kv_per_tok * block_size - budget
                raise DoesNotFitError(self._not_fit(model, hardware, dtype, s, weights, act,
                                                    budget, short, kv_cache_dtype=kv_dtype,
                                                    gpu_memory_utilization=gpu_memory_utilization,
                                                    max_num_batched_tokens=max_num_batched_tokens,
                                                    max_num_seqs=max_num_seqs,
                                                    block_size=block_size))
            stages.append(MemoryPlan(
                model_name=model.name, hardware_name=hardware.name, dtype=dtype,
                kv_cache_dtype=kv_dtype, tensor_parallel_size=self.tp,
                gpu_memory_utilization=gpu_memory_utilization, block_size=block_size,
                capacity_bytes=float(hardware.mem_bytes), budget_bytes=budget,
                weight_bytes=weights, activation_peak_bytes=act, kv_pool_bytes=pool,
                kv_bytes_per_token=kv_per_tok, num_kv_tokens=blocks * block_size,
                num_kv_blocks=blocks))
        binding = min(stages, key=lambda p: p.num_kv_tokens)
        return PlanMemory(self, binding, tuple(stages))

    def fits(self, model: ModelConfig, hardware: HardwareProfile, **kwargs: Any) -> bool:
        try:
            self.check(model, hardware, **kwargs)
        except (ConfigError, DoesNotFitError):
            return False
        return True

    def _not_fit(self, model: ModelConfig, hardware: HardwareProfile, dtype: str, stage: int,
                 weights: float, act: float, budget: float, short: float,
                 **kwargs: Any) -> str:
        where = (f"one {hardware.name}" if self.is_trivial
                 else f"{self.num_gpus // self.dp} x {hardware.name} ({self.describe()})")
        head = (f"{model.name} in {dtype} does not fit on {where}: one GPU"
                + (f" of pipeline stage {stage}" if self.pp > 1 else "")
                + f" needs {weights / GIB:.1f} GiB of weights + {act / GIB:.1f} GiB of "
                f"activations + one KV block, {short / GIB:.1f} GiB more than its "
                f"{budget / GIB:.1f} GiB budget")
        fitting = [p for p in candidate_plans(model, MAX_NODE_GPUS, max_gpus=True)
                   if p.num_gpus > self.num_gpus // self.dp
                   and p.fits(model, hardware, dtype=dtype, **kwargs)]
        if not fitting:
            return (f"{head}; no plan on up to {MAX_NODE_GPUS} GPUs fits: use a smaller weight "
                    "dtype, a device with more memory, or lower max_num_batched_tokens")
        fewest = min(p.num_gpus for p in fitting)
        best = [p.describe() for p in fitting if p.num_gpus == fewest]
        others = [p.describe() for p in fitting if p.num_gpus != fewest]
        return (f"{head}; plans that fit: {'; '.join(best)}"
                + (f" (also {'; '.join(others)})" if others else ""))

def padded_vocab(n_vocab: int, tp: int) -> int:
    """Vocabulary rows after padding to a multiple of `tp` (each rank holds the same count)."""
    return -(-n_vocab // tp) * tp


def divisors(n: int) -> list[int]:
    return [d for d in (1, 2, 4, 8, 16) if n % d == 0]


def candidate_plans(model: ModelConfig, num_gpus: int, max_gpus: bool = False
                    ) -> Iterator[ParallelPlan]:
    """Every (tp, pp, ep, dp) with tp x pp x dp == `num_gpus` (or <= when `max_gpus`, with
    dp = 1) whose shapes divide; tp and pp powers of two, ep in {1, tp} for MoE models."""
    for n in (range(1, num_gpus + 1) if max_gpus else (num_gpus,)):
        for tp in (1, 2, 4, 8, 16):
            for pp in (1, 2, 4, 8, 16):
                if n % (tp * pp):
                    continue
                dp = n // (tp * pp)
                if max_gpus and dp != 1:
                    continue
                for ep in ((1, tp) if model.is_moe and tp > 1 else (1,)):
                    plan = ParallelPlan(tp, pp, ep, dp)
                    try:
                        plan.check_shapes(model)
                    except ConfigError:
                        continue
                    yield plan


def plan_gpu_memory(plan: ParallelPlan, model: ModelConfig, hardware: HardwareProfile,
                    **kwargs: Any) -> MemoryPlan:
    """One GPU's `MemoryPlan` under `plan` (`sim.timing.memory_plan.plan_memory` for one GPU per
    replica, the binding stage of `plan.check` otherwise); a model that does not fit on one GPU
    raises `DoesNotFitError` listing the plans that fit."""
    if plan.tp * plan.pp > 1:
        return plan.check(model, hardware, **kwargs).binding
    try:
        return plan_memory(model, hardware, **kwargs)
    except DoesNotFitError as exc:
        fitting = [p for p in candidate_plans(model, MAX_NODE_GPUS, max_gpus=True)
                   if p.num_gpus > 1 and p.fits(model, hardware, **kwargs)]
        fewest = min((p.num_gpus for p in fitting), default=0)
        names = [f"tensor_parallel_size={p.tp}, pipeline_parallel_size={p.pp}"
                 + (", enable_expert_parallel" if p.ep > 1 else "")
                 for p in fitting if p.num_gpus == fewest]
        if not names:
            raise
        raise DoesNotFitError(f"{exc}. Parallel plans that fit on {fewest} GPUs: "
                              f"{'; '.join(names)} (`infersim plans` compares them)") from None
