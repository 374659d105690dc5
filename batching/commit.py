"""Committing a completed step: move progress counters, append sampled tokens, check stops.

Shared by every scheduler so that stop rules are identical across policies (vLLM's
`check_stop`): EOS (unless `ignore_eos`, and not before `min_tokens`), a stop token id,
`max_tokens`, or reaching `max_model_len`. A stopping token stays in `token_ids`, as in vLLM.

References: vLLM `vllm/v1/core/sched/utils.py` (check_stop).
"""

from __future__ import annotations

from dataclasses import dataclass

from batching.base import StepPlan, StepResult
from sim.request import Request, Status


@dataclass(frozen=True)
class StopCriteria:
    eos_token_ids: frozenset[int]
    max_model_len: int

    def check(self, request: Request, token_id: int) -> tuple[str, int | None] | None:
        """(finish_reason, stop_reason) once `token_id` was appended, else None."""
        params = request.sampling
        if token_id >= 0 and request.num_output_tokens > params.min_tokens - 1:
            if not params.ignore_eos and token_id in self.eos_token_ids:
                return "stop", None
            if token_id in params.stop_token_ids:
                return "stop", token_id
        if params.max_tokens is not None and request.num_output_tokens >= params.max_tokens:
            return "length", None
        if request.num_tokens >= self.max_model_len:
            return "length", None
        return None


def commit_step(
    plan: StepPlan, result: StepResult, now_s: float, retains_kv: bool, stop: StopCriteria
) -> list[Request]:
    """Apply a completed step to its requests; returns those that stopped generating."""
    stopped = []
    tokens = result.token_ids
    for i, seq in enumerate(plan.seqs):
        req = seq.request
        req.num_computed = seq.end if retains_kv else 0
        if not seq.samples:
            continue
        token = -1 if tokens is None else tokens[i]
        req.num_output_tokens += 1
        if req.keep_tokens:
            req.output_token_ids.append(token)
            entry = None if result.logprobs is None else result.logprobs[i]
            if entry is not None:
                logprob, entries = entry
                req.cumulative_logprob += logprob
                if req.logprobs is not None:
                    req.logprobs.append(entries)
        if req.num_output_tokens == 1:
            req.first_token_s = now_s
        req.token_times_s.append(now_s)
        reason = stop.check(req, token)
        if reason is not None:
            req.finish_reason, req.stop_reason = reason
            stopped.append(req)
    return stopped


def finish(request: Request, now_s: float) -> None:
    request.status = Status.FINISHED
    request.finished_s = now_s
