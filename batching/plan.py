"""Building a step plan: the scheduler's sequences plus their KV side, taken from its manager.

Every scheduler ends `schedule()` here, so the plan is the whole contract to the executor and
the pricer (as vLLM v1's `SchedulerOutput`, whose workers never touch the KV manager): each
sequence's block table and filled slots, and the step's KV block work (copies in order, their
counts), are taken from the manager once per plan. The manager keeps whatever it queued until
a plan takes it, so a preemption in a `schedule()` that planned nothing rides in the next plan.

References: vLLM `vllm/v1/core/sched/scheduler.py` (`SchedulerOutput` built at the end of
`schedule()`), vLLM v0 `SchedulerOutputs` (`blocks_to_swap_in/out`, `blocks_to_copy`).
"""

from __future__ import annotations

from collections.abc import Sequence

from sim.core.protocols import KVCacheManager
from sim.core.step import ScheduledSeq, StepPlan, shape_of
from sim.core.step_shape import StepShape


def build_plan(kv: KVCacheManager, seqs: Sequence[ScheduledSeq],
               shape: StepShape | None = None) -> StepPlan:
    """The plan of `seqs` (already allocated in `kv`), priced as `shape` (default: exactly
    these sequences, `shape_of`), with the KV side `kv` queued for it."""
    planned, step_kv = kv.take_step_kv(tuple(seqs))
    return StepPlan(planned, shape_of(planned) if shape is None else shape, step_kv)
