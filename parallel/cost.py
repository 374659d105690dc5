"""The timing of a parallel step: per-GPU compute from `CostModel` plus priced communication.

`ParallelCostModel` wraps a `sim.timing.cost_model.CostModel` built with `tensor_parallel_size = tp`
(which already divides every GEMM, head and KV read over the tensor-parallel GPUs) and adds two
parts: `comm`, the transfers of every collective over the profile's `gpu_link`, and
`comm_launch`, the fixed cost of every collective call (the launch/graph term), each collective
run by the implementation vLLM would pick (`parallel.collectives`: the custom all-reduce for
small messages on fully connected GPUs, NCCL ring/tree otherwise; CUDA graphs for steps of at
most `CUDA_GRAPH_MAX_TOKENS` tokens unless `enforce_eager`), with no overlap of communication and
compute (vLLM's default: the all-reduce sits on the critical path).
For a step of T new tokens, R logit rows, a = activation bytes, E = n_embd, V = padded vocab:

- **TP**: one all-reduce of [T, E] after the vocab-parallel embedding, two per layer (after the
  row-parallel attention output and MLP down projections), and an all-gather of the [R, V]
  vocab-parallel logits.
- **EP** (MoE layers, ep = tp): the tokens are split over the EP ranks after attention
  (a reduce-scatter of [T, E] replaces the attention all-reduce, as in Megatron sequence
  parallelism), each rank dispatches its T/ep tokens' k routed copies to the experts' owners
  and gets them back (two all-to-alls of T k E a / ep bytes per rank), then an all-gather of
  [T, E] restores the full batch for the next attention (no MLP all-reduce). The
  expert compute is scaled by the busiest rank's routed tokens / mean (the slowest rank sets
  the step's time): a constant `expert_imbalance`, or per step from `expert_load`
  (`parallel.expert.ExpertImbalanceModel`: Zipf skew or a recorded routing trace, as a function
  of the step's T tokens), which the functional model's real router measures
  (`parallel.expert.ExpertLoad`).
- **PP**: each stage runs its contiguous layers (the LM head and sampler on the last); a
  micro-batch crosses pp - 1 stage boundaries, each a send/recv of the hidden state and the
  residual ([T, E] twice, as vLLM's IntermediateTensors). `stage_times_s` gives each stage's
  busy time, which the engine loop (`sim.engine.lanes.StageClock`) overlaps across micro-batches.

`step_time_s` is one micro-batch's latency through every stage (compute + comm + overhead).
KV eviction's context cap (`kv_context_cap_tokens`) goes to the per-GPU `CostModel`, so every
price here (step, stages, roofline) reads the same capped context; the collectives move only
the new tokens' activations and do not depend on context.

References: Shoeybi et al. 2019 (Megatron-LM: two all-reduces per layer); Narayanan et al. 2021
(pipeline bubble, point-to-point stage transfers); Lepikhin et al. 2021 (GShard all-to-all
dispatch/combine); Rajbhandari et al. 2022 (DeepSpeed-MoE); vLLM `vllm/distributed`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from parallel.collectives import Collectives, CommMode, Priced
from parallel.expert import ExpertImbalanceModel
from parallel.plan import ParallelPlan, padded_vocab, stage_layers
from sim.core.dtypes import FloatArray, IntArray
from sim.core.errors import ConfigError
from sim.core.model_config import ModelConfig
from sim.core.quantization import QuantSpec
from sim.core.step_shape import StepCost, StepShape
from sim.timing.cost_model import DEFAULT_STEP_OVERHEAD_S, CostModel
from sim.timing.hardware import HardwareProfile

_HEAD_PARTS = ("lm_head", "sampling")  # run on the last pipeline stage


@dataclass(frozen=True)
class CommBreakdown:
    """Seconds of each kind of communication in one micro-batch (all stages together): the
    transfers of each kind, and `launch_s`, the fixed cost of every collective call (eager
    launches, or graph-replay handshakes; `parallel.collectives.Priced.call_s`)."""

    tp_all_reduce_s: float
    ep_all_to_all_s: float
    logits_gather_s: float
    pp_send_recv_s: float
    launch_s: float = 0.0
    all_reduce_algorithm: str = "none"  # what the layers' TP all-reduce runs as

    @property
    def transfer_s(self) -> float:
        return (self.tp_all_reduce_s + self.ep_all_to_all_s + self.logits_gather_s
                + self.pp_send_recv_s)

    @property
    def total_s(self) -> float:
        return self.transfer_s + self.launch_s


class ParallelCostModel:
    """Prices `StepShape`s for `model` on `hardware` split by `plan` (one replica: dp ignored).

    A `sim.core.protocols.Pricer`, as `CostModel` is, so the engine uses either.
    `kv_context_cap_tokens` is `CostModel`'s (the KV eviction budget). `comm_mode` says how the
    collectives run (`parallel.collectives.CommMode`: vLLM's default, CUDA graphs and the custom
    all-reduce, unless `enforce_eager` / `disable_custom_all_reduce`).
    """

    def __init__(self, model: ModelConfig, hardware: HardwareProfile, plan: ParallelPlan,
                 dtype: str | None = None, kv_cache_dtype: str | None = None,
                 step_overhead_s: float = DEFAULT_STEP_OVERHEAD_S,
                 expert_imbalance: float = 1.0, quantization: QuantSpec | None = None,
                 kv_context_cap_tokens: int | None = None,
                 comm_mode: CommMode | None = None,
                 expert_load: ExpertImbalanceModel | None = None) -> None:
        plan.check_shapes(model)
        if not expert_imbalance >= 1.0:
            raise ConfigError(f"expert_imbalance is busiest / mean expert-rank load, >= 1; got "
                              f"{expert_imbalance}")
        if expert_load is not None and expert_load.is_uniform:
            expert_load = None  # perfect balance: the constant's price, and its fast path
        if expert_load is not None and expert_imbalance != 1.0:
            raise ConfigError(f"expert_imbalance={expert_imbalance} and expert_load="
                              f"{expert_load.spec.text!r} both set the skew; pass one")
        self.expert_load = expert_load
        self.model, self.hardware, self.plan = model, hardware, plan
        self.base = CostModel(model, hardware, dtype=dtype, kv_cache_dtype=kv_cache_dtype,
                              tensor_parallel_size=plan.tp, step_overhead_s=0.0,
                              quantization=quantization,
                              kv_context_cap_tokens=kv_context_cap_tokens)
        self.step_overhead_s = float(step_overhead_s)
        self.expert_imbalance = float(expert_imbalance)
        self.comm_mode = CommMode() if comm_mode is None else comm_mode
        self.comm = Collectives.gpu_link(hardware, self.comm_mode)
        self.act_bytes = float(self.base.dims.act_bytes)
        self.stages = stage_layers(model.n_layer, plan.pp)
        n_moe = [sum(model.is_moe_layer(i) for i in r) for r in self.stages]
        self._stage_moe = n_moe  # MoE layers per stage
        self._stage_dense = [len(r) - k for r, k in zip(self.stages, n_moe, strict=True)]
        self._vocab = padded_vocab(model.n_vocab, plan.tp)
        # the plain path: no pipeline, no expert imbalance -> base fast path + closed-form comm
        self._simple = plan.pp == 1 and (plan.ep == 1 or (expert_imbalance == 1.0
                                                          and expert_load is None))
        self.part_names = (*self.base.part_names, "comm_launch")

    @property
    def act_dtype(self) -> str:
        """The activation dtype (the per-GPU model's; what the memory plan sizes KV in)."""
        return self.base.act_dtype

    def imbalance(self, num_tokens: int) -> float:
        """The MoE compute's factor for a step of `num_tokens` (1.0 without EP)."""
        if self.plan.ep == 1:
            return 1.0
        if self.expert_load is None:
            return self.expert_imbalance
        return self.expert_load.imbalance(num_tokens)

    # ------------------------------------------------------------------ communication
    def _layer_comm(self, num_tokens: int, stage: int) -> tuple[float, float, float, str]:
        """(TP all-reduce transfer s, EP transfer s, call costs s, all-reduce algorithm) of the
        layers of `stage` for a step of `num_tokens`."""
        tp, ep, c = self.plan.tp, self.plan.ep, self.comm
        if tp == 1:
            return 0.0, 0.0, 0.0, "none"
        graphed = self.comm_mode.graphed(num_tokens)
        hidden = num_tokens * self.model.n_embd * self.act_bytes  # [T, E] bytes
        ar = c.all_reduce(hidden, tp, graphed)
        n_moe, n_dense = self._stage_moe[stage], self._stage_dense[stage]
        if ep == 1:
            n_ar = 2 * (n_moe + n_dense)
            return n_ar * ar.transfer_s, 0.0, n_ar * ar.call_s, ar.algorithm
        routed = hidden * self.model.n_expert_per_tok / ep  # one rank's dispatched copies
        moe = (c.reduce_scatter(hidden, ep, graphed), c.all_to_all(routed, ep, graphed),
               c.all_to_all(routed, ep, graphed), c.all_gather(hidden, ep, graphed))
        ep_transfer = sum(p.transfer_s for p in moe)
        ep_calls = sum(p.call_s for p in moe)
        return (2 * n_dense * ar.transfer_s, n_moe * ep_transfer,
                2 * n_dense * ar.call_s + n_moe * ep_calls, ar.algorithm)

    def _head_comm(self, num_tokens: int, num_logits: int) -> tuple[Priced, Priced]:
        """(the vocab-parallel embedding's all-reduce, the logits' all-gather)."""
        graphed = self.comm_mode.graphed(num_tokens)
        hidden = num_tokens * self.model.n_embd * self.act_bytes
        return (self.comm.all_reduce(hidden, self.plan.tp, graphed),
                self.comm.all_gather(num_logits * self._vocab * self.act_bytes, self.plan.tp,
                                     graphed))

    def comm_breakdown(self, shape: StepShape) -> CommBreakdown:
        return self._comm(shape.total_new_tokens, shape.total_logits)

    def _comm(self, num_tokens: int, num_logits: int) -> CommBreakdown:
        tp_s = ep_s = launch_s = 0.0
        algorithm = "none"
        for s in range(self.plan.pp):
            a, b, calls, algorithm = self._layer_comm(num_tokens, s)
            tp_s, ep_s, launch_s = tp_s + a, ep_s + b, launch_s + calls
        embed, logits = self._head_comm(num_tokens, num_logits)
        tp_s += embed.transfer_s
        launch_s += embed.call_s + logits.call_s
        pp_s = 0.0
        if self.plan.pp > 1:
            send = self.comm.send_recv(2 * num_tokens * self.model.n_embd * self.act_bytes)
            pp_s, launch_s = (self.plan.pp - 1) * send.transfer_s, \
                launch_s + (self.plan.pp - 1) * send.call_s
        return CommBreakdown(tp_s, ep_s, logits.transfer_s, pp_s, launch_s, algorithm)

    # ------------------------------------------------------------------ stages
    def stage_times_s(self, shape: StepShape) -> list[float]:
        """Busy seconds of each pipeline stage for one micro-batch of `shape` (compute + its
        TP/EP collectives with their call costs; the send to the next stage and the step
        overhead excluded)."""
        parts = self.base.step_cost(shape).parts
        head = sum(parts.get(p, 0.0) for p in _HEAD_PARTS)
        body = sum(v for k, v in parts.items() if k not in _HEAD_PARTS)
        n_layer = self.model.n_layer
        T, R = shape.total_new_tokens, shape.total_logits
        if self.plan.ep > 1:
            body += (self.imbalance(T) - 1.0) * parts.get("moe", 0.0)
        embed, logits = self._head_comm(T, R)
        times = []
        for s, layers in enumerate(self.stages):
            a, b, calls, _ = self._layer_comm(T, s)
            t = body * len(layers) / n_layer + a + b + calls
            if s == 0:
                t += embed.total_s
            if s == self.plan.pp - 1:
                t += head + logits.total_s
            times.append(t)
        return times

    def send_recv_s(self, shape: StepShape) -> float:
        """One stage boundary: the hidden state and residual of the micro-batch."""
        return self.comm.send_recv_s(2 * shape.total_new_tokens * self.model.n_embd
                                     * self.act_bytes)

    # ------------------------------------------------------------------ the rest of Pricer
    def step_cost(self, shape: StepShape) -> StepCost:
        base = self.base.step_cost(shape)
        parts = dict(base.parts)
        if self.plan.ep > 1 and "moe" in parts:
            parts["moe"] *= self.imbalance(shape.total_new_tokens)
        comm = self.comm_breakdown(shape)
        parts["comm"] = comm.transfer_s
        parts["comm_launch"] = comm.launch_s
        parts["overhead"] = self.step_overhead_s
        return StepCost(total_s=float(sum(parts.values())), parts=parts, bound=base.bound,
                        flops=base.flops, bytes=base.bytes)

    def step_time_s(self, num_new_tokens: tuple[int, ...], num_context_tokens: tuple[int, ...],
                    num_logits: int | None = None) -> float:
        """One micro-batch's latency through every stage (fast path, no validation)."""
        lg = len(num_new_tokens) if num_logits is None else num_logits
        if self._simple:
            compute = self.base.step_time_s(num_new_tokens, num_context_tokens, lg)
            return compute + self._comm(sum(num_new_tokens), lg).total_s + self.step_overhead_s
        shape = StepShape(num_new_tokens, num_context_tokens,
                          None if num_logits is None else _spread(num_logits, num_new_tokens))
        return self.step_cost(shape).total_s

    def decode_stretch_s(self, context_tokens: IntArray, num_steps: int) -> FloatArray:
        """[num_steps] times of consecutive plain-decode steps (`sim.core.protocols.Pricer`):
        the plain path's per-GPU compute for the stretch at once, plus its communication (the
        same every step: one token per sequence); otherwise step by step."""
        num_seqs = len(context_tokens)
        if self._simple:
            comm_s = self._comm(num_seqs, num_seqs).total_s
            return (self.base.decode_stretch_s(context_tokens, num_steps) + comm_s
                    + self.step_overhead_s)
        ones = (1,) * num_seqs
        return np.array([self.step_time_s(ones, tuple((context_tokens + k).tolist()), num_seqs)
                         for k in range(num_steps)])

    def roofline_bound_s(self, shape: StepShape) -> float:
        """Per-GPU roofline floor of the step (communication only adds to it)."""
        return self.base.roofline_bound_s(shape) / self.plan.pp

    def describe(self) -> str:
        return self.base.describe() + f" [{self.plan.describe()}]"


def _spread(num_logits: int, new: tuple[int, ...]) -> tuple[int, ...]:
    """Per-sequence logit rows adding to `num_logits` (one per sequence first, then the rest in
    order wherever a sequence has new tokens left; fewer rows than sequences leave the last
    ones at 0, as for prompt chunks that do not finish): only the total matters to the price."""
    left = num_logits
    rows: list[int] = []
    for _ in new:
        take = min(max(left, 0), 1)
        rows.append(take)
        left -= take
    for i, n in enumerate(new):
        take = min(max(left, 0), n - rows[i])
        rows[i] += take
        left -= take
    return tuple(rows)
