"""Executors run a step plan: the functional one computes real tokens, the timing one does not.

`NumpyExecutor` (in `sim.numpy_executor`, imported only in functional mode) runs the NumPy model
over the step's sequences and samples each finished sequence's next token from its own random
stream. It never reads the clock, so tokens cannot depend on the hardware profile (DESIGN.md
rule 2). `TimingExecutor` returns no token values:
the scheduler only counts.

References: vLLM `vllm/v1/worker/gpu_model_runner.py` (flattened varlen batches).
"""

from __future__ import annotations

from typing import Protocol

from batching.base import TIMING_RESULT, StepPlan, StepResult
from sim.request import Request


class Executor(Protocol):
    def run(self, plan: StepPlan) -> StepResult: ...

    def release(self, request: Request) -> None:
        """Drop whatever the executor holds for a request that has ended."""
        ...


class TimingExecutor:
    """Token counts only: no model runs (the `mode="timing"` executor)."""

    def run(self, plan: StepPlan) -> StepResult:
        return TIMING_RESULT

    def release(self, request: Request) -> None:
        return None
