"""The timing-only executor: no model runs, no token values; the scheduler only counts.

The functional executor (`sim.executor.functional`, imported only in functional mode) runs the
NumPy model; both satisfy `sim.core.protocols.Executor`.

References: vLLM `vllm/v1/worker/gpu_model_runner.py` (flattened varlen batches).
"""

from __future__ import annotations

from sim.core.request import Request
from sim.core.step import TIMING_RESULT, StepPlan, StepResult


class TimingExecutor:
    """Token counts only: no model runs (the `mode="timing"` executor)."""

    def run(self, plan: StepPlan) -> StepResult:
        return TIMING_RESULT

    def release(self, request: Request) -> None:
        return None
