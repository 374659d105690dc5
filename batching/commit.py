"""Committing a completed step: move progress counters, append sampled tokens, check stops.

Shared by every scheduler so that stop rules are identical across policies (vLLM's
`check_stop`): EOS (unless `ignore_eos`, and not before `min_tokens`), a stop token id,
`max_tokens`, or reaching `max_model_len`. A stopping token stays in `token_ids`, as in vLLM.

References: vLLM `vllm/v1/core/sched/utils.py` (check_stop).
"""

from __future__ import annotations

from dataclasses import dataclass

from sim.core.request import Logprob, Request, Status
from sim.core.step import StepPlan, StepResult


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
    """Apply a completed step to its requests; returns those that stopped generating.

    A speculative step (`result.emitted`) may emit several tokens per sequence: they are
    appended in order, each checked against the stop rules, and the rest are dropped at the
    first stop. KV then exists for the committed tokens plus the accepted drafts, so
    `num_computed` moves by the accepted count (rejected drafts' KV is stale, overwritten next).
    """
    tokens = result.token_ids
    emitted = result.emitted
    if tokens is None and emitted is None:
        return _commit_counts(plan, now_s, retains_kv, stop)
    stopped = []
    for i, seq in enumerate(plan.seqs):
        req = seq.request
        if not seq.samples:
            req.num_computed = seq.end if retains_kv else 0
            continue
        if emitted is not None:
            new_tokens = emitted[i]
            entries = None if result.emitted_logprobs is None else result.emitted_logprobs[i]
        else:
            new_tokens = (-1 if tokens is None else tokens[i],)
            entries = None if result.logprobs is None else (result.logprobs[i],)
        num_accepted = len(new_tokens) - 1
        end = seq.end - seq.num_spec_tokens + num_accepted
        for j, token in enumerate(new_tokens):
            _append(req, token, None if entries is None else entries[j], now_s)
            reason = stop.check(req, token)
            if reason is not None:
                req.finish_reason, req.stop_reason = reason
                stopped.append(req)
                break
        req.num_computed = min(end, req.num_tokens - 1) if retains_kv else 0
    return stopped


def _commit_counts(plan: StepPlan, now_s: float, retains_kv: bool,
                   stop: StopCriteria) -> list[Request]:
    """`commit_step` of a timing-only step without drafts: no token values, one new token per
    sequence that reached its end (the same counters, times and stop rules, without the
    per-token bookkeeping a value would need; the goldens hold the two paths equal)."""
    stopped = []
    for seq in plan.seqs:
        req = seq.request
        end = seq.start + seq.num_new_tokens
        committed = end - seq.num_spec_tokens  # (no drafts without `emitted`: 0 in practice)
        if committed != req.num_tokens:  # a prompt chunk: nothing sampled
            req.num_computed = end if retains_kv else 0
            continue
        _append(req, -1, None, now_s)
        reason = stop.check(req, -1)
        if reason is not None:
            req.finish_reason, req.stop_reason = reason
            stopped.append(req)
        req.num_computed = min(committed, req.num_tokens - 1) if retains_kv else 0
    return stopped


def _append(req: Request, token: int,
            entry: tuple[float, dict[int, Logprob]] | None, now_s: float) -> None:
    req.num_output_tokens += 1
    if req.keep_tokens:
        req.output_token_ids.append(token)
        if entry is not None:
            logprob, entries = entry
            req.cumulative_logprob += logprob
            if req.logprobs is not None:
                req.logprobs.append(entries)
    if req.num_output_tokens == 1:
        req.first_token_s = now_s
    req.token_times_s.append(now_s)


def finish(request: Request, now_s: float) -> None:
    request.status = Status.FINISHED
    request.finished_s = now_s
