"""Committing a completed step: move progress counters, append sampled tokens, check stops.

Shared by every scheduler so that stop rules are identical across policies (vLLM's
`check_stop`): EOS (unless `ignore_eos`, and not before `min_tokens`), a stop token id,
`max_tokens`, or reaching `max_model_len`. A stopping token stays in `token_ids`, as in vLLM.

Stop strings (`SamplingParams.stop`, functional mode only) are checked after those, on the text
detokenized incrementally (each new token decodes only a short window of ids, as vLLM and HF
TGI do, so a long output costs linear, not quadratic, work): the search covers only the
characters the new token added (plus a stop string's length of overlap), and not before
`min_tokens`; the text is cut before the stop string, or after it with
`include_stop_str_in_output`. `_commit_counts` (timing-only) has no text and never sees them.

References: vLLM `vllm/v1/core/sched/utils.py` (check_stop), `vllm/v1/engine/detokenizer.py`
(`check_stop_strings`, incremental detokenization).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from sim.core.request import Logprob, Request, Status
from sim.core.step import StepPlan, StepResult


class Decoder(Protocol):
    """What stop strings need of a tokenizer (`sim.model.tokenizer.Tokenizer` has it)."""

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


@dataclass(frozen=True)
class StopCriteria:
    eos_token_ids: frozenset[int]
    max_model_len: int
    #: detokenizes outputs for stop strings (functional mode; None: no text, no stop strings)
    tokenizer: Decoder | None = None

    def check_text(self, request: Request) -> str | None:
        """The stop string the request's newest token completed, else None; the request's
        `output_text` is then cut as vLLM cuts it."""
        params = request.sampling
        if not params.stop or self.tokenizer is None or not request.keep_tokens:
            return None
        delta = _detokenize_next(request, self.tokenizer)
        if not delta or request.num_output_tokens <= params.min_tokens:
            return None
        text = request.output_text
        for stop_str in params.stop:
            # only where the new characters could complete it: len(delta) + len - 1 back
            at = text.find(stop_str, max(0, len(text) - len(delta) - len(stop_str) + 1))
            if at == -1:
                continue
            end = at + len(stop_str) if params.include_stop_str_in_output else at
            request.output_text = text[:end]
            return stop_str
        return None

    def check(self, request: Request, token_id: int) -> tuple[str, int | str | None] | None:
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
            if reason is None and req.sampling.stop:
                stop_str = stop.check_text(req)
                reason = None if stop_str is None else ("stop", stop_str)
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
    max_model_len = stop.max_model_len
    for seq in plan.seqs:
        req = seq.request
        end = seq.start + seq.num_new_tokens
        committed = end - seq.num_spec_tokens  # (no drafts without `emitted`: 0 in practice)
        num_tokens = req.num_prompt_tokens + req.num_output_tokens  # before this step's token
        if committed != num_tokens:  # a prompt chunk: nothing sampled
            req.num_computed = end if retains_kv else 0
            continue
        if req.keep_tokens:
            _append(req, -1, None, now_s)
        else:  # `_append` without values, inlined: the hot loop of timing-only runs
            req.num_output_tokens += 1
            if req.num_output_tokens == 1:
                req.first_token_s = now_s
            req.token_times_s.append(now_s)
        # `StopCriteria.check` for a token without a value (no EOS or stop id can match it):
        # only max_tokens and max_model_len stop it
        max_tokens = req.sampling.max_tokens
        if ((max_tokens is not None and req.num_output_tokens >= max_tokens)
                or num_tokens + 1 >= max_model_len):
            req.finish_reason, req.stop_reason = "length", None
            stopped.append(req)
        req.num_computed = min(committed, num_tokens) if retains_kv else 0
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


def _detokenize_next(req: Request, tokenizer: Decoder) -> str:
    """The text the newest output token adds to `req.output_text` (appended there), "" while
    it ends inside a multi-byte character. Decoding the window from `detok_prefix_offset` and
    subtracting the text of the ids before `detok_read_offset` keeps word-boundary spaces that
    a tokenizer only renders next to the preceding token (HF TGI / vLLM's incremental
    detokenizer)."""
    ids = req.output_token_ids
    skip = req.sampling.skip_special_tokens
    before = tokenizer.decode(ids[req.detok_prefix_offset:req.detok_read_offset],
                              skip_special_tokens=skip)
    now = tokenizer.decode(ids[req.detok_prefix_offset:], skip_special_tokens=skip)
    if len(now) <= len(before) or now.endswith("\ufffd"):
        return ""
    delta = now[len(before):]
    req.detok_prefix_offset, req.detok_read_offset = req.detok_read_offset, len(ids)
    req.output_text += delta
    return delta


def finish(request: Request, now_s: float) -> None:
    request.status = Status.FINISHED
    request.finished_s = now_s
