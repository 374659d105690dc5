"""What a run records: step counters, the result object, and per-request bookkeeping.

`request_times` turns a finished (or rejected) request into the metrics collector's record;
`record_step` appends one engine step to the per-step series.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from parallel.expert import ExpertLoadSummary
from sim.core.protocols import KVCacheManager, Scheduler
from sim.core.request import Request, Status
from sim.core.step import StepPlan
from sim.metrics.collector import MetricsCollector, RequestTimes, Summary
from sim.metrics.step_series import StepSeries
from speculative.decoding import SpeculationSummary


@dataclass
class StepStats:
    """Counters over the whole run (conservation checks and simulation speed)."""

    num_steps: int = 0
    busy_s: float = 0.0
    num_tokens_computed: int = 0
    num_tokens_priced: int = 0
    num_preemptions: int = 0
    swap_s: float = 0.0  # KV swap transfers over the host link (included in busy_s)
    draft_s: float = 0.0  # speculative draft-model steps (included in busy_s)
    num_copied_blocks: int = 0  # copy-on-write KV block copies (forked samples and beams)

    # the one place the counters move: a dispatched step's charge, or a coasted stretch
    def charge(self, plan: StepPlan, charge: StepCharge) -> None:
        """Count one dispatched step: its compute (and draft) time, its tokens, then the KV
        moves it needed (swaps over the host link, copy-on-write copies in device memory)."""
        self.draft_s += charge.draft_s
        self.num_steps += 1
        self.busy_s += charge.busy_s
        self.num_tokens_computed += plan.num_new_tokens
        self.num_tokens_priced += plan.shape.total_new_tokens
        if charge.swap_s or charge.copy_s or charge.num_copied_blocks:
            self.swap_s += charge.swap_s
            self.num_copied_blocks += charge.num_copied_blocks
            self.busy_s += charge.swap_s + charge.copy_s

    @classmethod
    def merged(cls, parts: list[StepStats]) -> StepStats:
        """The counters of several lanes together (added in the given order)."""
        total = cls()
        for name in cls.__dataclass_fields__:
            setattr(total, name, sum(getattr(p, name) for p in parts))
        return total

    def charge_coasted(self, step_times_s: list[float], num_seqs: int) -> None:
        """Count a coasted stretch: plain decodes of `num_seqs` sequences, one per step time."""
        for step_s in step_times_s:  # (added one by one: the same sum as step by step)
            self.busy_s += step_s
        self.num_steps += len(step_times_s)
        self.num_tokens_computed += num_seqs * len(step_times_s)
        self.num_tokens_priced += num_seqs * len(step_times_s)


@dataclass(frozen=True, slots=True)
class StepCharge:
    """What one dispatched step costs the replica: `busy_s` its compute (the draft model's
    `draft_s` included; with pipeline stages, dispatch to last stage done), then the KV moves:
    `swap_s` over the host link and `copy_s` for `num_copied_blocks` copy-on-write copies."""

    busy_s: float
    draft_s: float = 0.0
    swap_s: float = 0.0
    copy_s: float = 0.0
    num_copied_blocks: int = 0

    @property
    def kv_move_s(self) -> float:
        return self.swap_s + self.copy_s


@dataclass
class SimulationResult:
    summary: Summary
    metrics: MetricsCollector
    requests: list[Request]
    stats: StepStats
    wall_s: float
    description: str
    steps: StepSeries | None = None
    speculation: SpeculationSummary | None = None  # acceptance counts (speculative decoding)
    #: every lane's KV manager as the run left it (conservation checks: all KV freed)
    kv_managers: tuple[KVCacheManager, ...] = ()
    #: functional expert-parallel runs: the real router's per-step expert-rank imbalance
    expert_load: ExpertLoadSummary | None = None


def record_step(steps: StepSeries, plan: StepPlan, start_s: float, end_s: float,
                scheduler: Scheduler, kv: KVCacheManager, lane: int = 0) -> None:
    decode = sum(1 for s in plan.seqs if s.num_new_tokens == 1 and s.start > 0)
    computed = plan.num_new_tokens
    held = kv.num_used_tokens() if kv.retains_kv else 0  # distinct: a shared prefix counts once
    steps.add(start_s, end_s, len(plan.seqs), computed - decode, decode,
              scheduler.num_waiting, held, kv.num_reserved_tokens(), lane)
    work = plan.kv
    steps.add_kv_events(lane, start_s, scheduler.num_preemptions, work.num_swapped_out_blocks,
                        work.num_swapped_in_blocks, work.num_copied_blocks)


def request_times(req: Request) -> RequestTimes:
    rejected = req.status is Status.REJECTED
    nan = math.nan
    return RequestTimes(
        request_id=req.request_id,
        arrival_s=req.arrival_s,
        first_scheduled_s=nan if rejected else req.first_scheduled_s,
        first_token_s=nan if rejected else req.first_token_s,
        finished_s=nan if rejected else req.finished_s,
        token_times_s=req.token_times_s,
        num_prompt_tokens=req.num_prompt_tokens,
        num_output_tokens=req.num_output_tokens,
        num_cached_prompt_tokens=0 if rejected else min(req.num_cached_tokens,
                                                        req.num_prompt_tokens),
        finish_reason=req.finish_reason or "aborted",
        reject_reason=req.reject_reason,
        returned_s=math.nan if rejected else req.returned_s,
    )

