"""`infersim plans`: every feasible parallel plan on N GPUs, simulated on one workload.

For a model, a GPU profile and a GPU count N, every (tp, pp, ep, dp) with tp x pp x dp = N whose
shapes divide (`parallel.plan.candidate_plans`) is checked for memory; each plan that fits is
simulated timing-only on the same synthetic workload (default: 200 requests of 512 prompt and
128 output tokens, all arriving at once), and reported with its KV capacity, throughput,
latency and the share of communication in a mid-size decode step. Plans that do not fit are
listed with the reason.

References: Narayanan et al. 2021 (choosing tensor x pipeline x data degrees); Zhong et al. 2024
(DistServe: searching parallel plans per workload with a simulator); vLLM ParallelConfig.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from cache import KV_CACHES
from parallel.plan import ParallelPlan, candidate_plans
from sim.core.errors import InfersimError
from sim.core.step_shape import StepShape
from sim.engine.args import MAX_NUM_GPUS, EngineArgs
from sim.engine.engine import Engine
from sim.model.zoo import resolve_model
from sim.workload.specs import make_workload

#: requests each plan is simulated on: every candidate plan runs them all, timing-only
MAX_PLAN_PROMPTS = 100_000


@dataclass(frozen=True)
class PlanResult:
    """One plan's predicted performance on the workload (None fields: it did not fit)."""

    tp: int
    pp: int
    ep: int
    dp: int
    fits: bool
    reason: str = ""
    num_kv_tokens: int = 0
    output_throughput: float = math.nan  # tokens/s over all replicas
    request_throughput: float = math.nan  # requests/s
    mean_ttft_ms: float = math.nan
    mean_tpot_ms: float = math.nan
    mean_e2e_ms: float = math.nan
    decode_comm_share: float = math.nan  # comm / step time of a 64-sequence decode step
    bubble_fraction: float = math.nan

    @property
    def plan(self) -> ParallelPlan:
        return ParallelPlan(self.tp, self.pp, self.ep, self.dp)


def evaluate_plan(model: str, hardware: str, plan: ParallelPlan, num_prompts: int = 200,
                  input_len: int = 512, output_len: int = 128, request_rate: float = math.inf,
                  seed: int = 0) -> PlanResult:
    """Simulate `plan` (timing-only) on the workload; a plan that cannot run is reported."""
    kv_cache = "paged" if "paged" in KV_CACHES else "contiguous"
    head: dict[str, Any] = {"tp": plan.tp, "pp": plan.pp, "ep": plan.ep, "dp": plan.dp}
    try:
        args = EngineArgs(model=model, hardware=hardware, mode="timing", kv_cache=kv_cache,
                          seed=seed, tensor_parallel_size=plan.tp,
                          pipeline_parallel_size=plan.pp, data_parallel_size=plan.dp,
                          enable_expert_parallel=plan.ep > 1,
                          data_parallel_router="least_outstanding")
        engine = Engine(args)
    except InfersimError as exc:
        return PlanResult(**head, fits=False, reason=str(exc).split(";")[0])
    workload = make_workload(num_prompts, request_rate, input_len, output_len, seed=seed)
    try:  # a pool the lanes cannot hold is refused when the run builds them
        result = engine.run(workload, keep_requests=False)
    except InfersimError as exc:
        return PlanResult(**head, fits=False, reason=str(exc).split(";")[0])
    s = {key: math.nan if value is None else value  # None: no request finished
         for key, value in result.summary.to_benchmark_json().items()}
    shape = StepShape.decode([input_len + output_len // 2] * 64)
    cost = engine.cost_model.step_cost(shape)
    stats = engine.parallel_stats
    return PlanResult(
        **head, fits=True, num_kv_tokens=engine.memory.num_kv_tokens,
        output_throughput=float(s["output_throughput"]),
        request_throughput=float(s["request_throughput"]),
        mean_ttft_ms=float(s["mean_ttft_ms"]), mean_tpot_ms=float(s["mean_tpot_ms"]),
        mean_e2e_ms=float(s.get("mean_e2el_ms", math.nan)),
        decode_comm_share=(cost.parts.get("comm", 0.0) + cost.parts.get("comm_launch", 0.0))
        / cost.total_s,  # transfers and the per-call (launch/graph) term
        bubble_fraction=stats.bubble_fraction() if stats is not None and plan.pp > 1 else 0.0,
    )


def evaluate_plans(model: str, hardware: str, num_gpus: int, **workload: Any
                   ) -> list[PlanResult]:
    """Every candidate plan on `num_gpus` GPUs, feasible ones first by output throughput."""
    if isinstance(num_gpus, bool) or not isinstance(num_gpus, int) or not (
            1 <= num_gpus <= MAX_NUM_GPUS):
        raise InfersimError(f"--num-gpus {num_gpus!r} must be an integer in 1..{MAX_NUM_GPUS} "
                            "(the most GPUs one simulated run spans)")
    num_prompts = workload.get("num_prompts", 200)
    if isinstance(num_prompts, bool) or not isinstance(num_prompts, int) or not (
            1 <= num_prompts <= MAX_PLAN_PROMPTS):
        raise InfersimError(f"--num-prompts {num_prompts!r} must be an integer in "
                            f"1..{MAX_PLAN_PROMPTS:,}: every plan simulates them")
    config = resolve_model(model)
    seq_len = workload.get("input_len", 512) + workload.get("output_len", 128)
    if seq_len > config.max_position_embeddings:
        raise InfersimError(
            f"--input-len + --output-len = {seq_len:,} tokens is more than {config.name}'s "
            f"max_position_embeddings ({config.max_position_embeddings:,}): every request "
            "would be rejected on every plan; shorten them")
    results = [evaluate_plan(model, hardware, p, **workload)
               for p in candidate_plans(config, num_gpus)]
    if not results:
        raise InfersimError(f"no (tp, pp, dp) split of {num_gpus} GPUs divides {config.name}; "
                            "try a power of two")
    return sorted(results, key=lambda r: (not r.fits, -r.output_throughput
                                          if r.fits else 0.0, r.tp, r.pp))


def format_plans(results: list[PlanResult]) -> str:
    rows = []
    for r in results:
        if r.fits:
            rows.append(f"{r.tp:>3} {r.pp:>3} {r.ep:>3} {r.dp:>3}  {r.num_kv_tokens:>10,}  "
                        f"{r.output_throughput:>10,.0f}  {r.mean_ttft_ms:>9.1f}  "
                        f"{r.mean_tpot_ms:>8.2f}  {r.mean_e2e_ms:>9.1f}  "
                        f"{100 * r.decode_comm_share:>5.1f}%  {100 * r.bubble_fraction:>5.1f}%")
        else:
            rows.append(f"{r.tp:>3} {r.pp:>3} {r.ep:>3} {r.dp:>3}  does not fit: {r.reason}")
    head = (" tp  pp  ep  dp   KV tokens   out tok/s    TTFT ms   TPOT ms     E2E ms   comm  "
            "bubble")
    return "\n".join([head, *rows])
