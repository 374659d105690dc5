"""Requests and their outputs, in vLLM's shapes and names.

`RequestOutput`, `CompletionOutput`, `RequestMetrics` and `Logprob` mirror vLLM's classes (and
`SamplingParams`, in `sim.core.sampling_params`) so code written against vLLM's offline API runs
here (times are simulated seconds).
`Request` is the engine's mutable per-request state: progress is one counter, `num_computed`
(KV exists for the first `num_computed` tokens), as in vLLM v1; prefill, chunked prefill, prefix
hits, preemption and speculation all just move it.

References: vLLM `vllm/sampling_params.py`, `vllm/outputs.py`, `vllm/v1/request.py`.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from sim.core.sampling_params import SamplingParams


@dataclass(frozen=True, slots=True)
class Logprob:
    """One token's log-probability under the model's raw distribution (vLLM's `Logprob`)."""

    logprob: float
    rank: int
    decoded_token: str | None = None


@dataclass(slots=True)
class RequestMetrics:
    """vLLM's per-request times, in simulated seconds since the simulation started.

    The first six are vLLM v0's `RequestMetrics`; the rest are vLLM v1's names for the same
    clock (`vllm/v1/metrics/stats.py`: `RequestStateStats`'s timestamps and counts, and the
    intervals `FinishedRequestStats` derives from them), so code written against either reads
    its own names. v1's `queued_ts` is when the engine core queued the request: the arrival
    here (no front-end process). Intervals of a request that never ran are 0, as in v1.
    """

    arrival_time: float
    last_token_time: float
    first_scheduled_time: float | None
    first_token_time: float | None
    time_in_queue: float | None
    finished_time: float | None
    # vLLM v1 (`RequestStateStats`)
    num_generation_tokens: int = 0
    queued_ts: float = 0.0
    scheduled_ts: float = 0.0
    first_token_ts: float = 0.0
    last_token_ts: float = 0.0
    first_token_latency: float = 0.0
    # vLLM v1 (`FinishedRequestStats`)
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    e2e_latency: float = 0.0
    queued_time: float = 0.0
    prefill_time: float = 0.0
    decode_time: float = 0.0
    inference_time: float = 0.0
    mean_time_per_output_token: float = 0.0


@dataclass(slots=True)
class CompletionOutput:
    """One sampled sequence of a prompt (vLLM's `CompletionOutput`)."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    lora_request: None = None  # vLLM's field; adapters are not simulated

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestOutput:
    """One prompt's outputs (vLLM's `RequestOutput`). `prompt_logprobs` (with
    `SamplingParams.prompt_logprobs`) has one entry per prompt token, None for the first (no
    token precedes it), as in vLLM."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int] | None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    num_cached_tokens: int = 0
    # infersim: why the engine refused the request (None when it ran)
    reject_reason: str | None = None
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    lora_request: None = None  # vLLM's field; adapters are not simulated


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    REJECTED = "rejected"


class BeamState(Protocol):
    """What the scheduler reads of a beam search's group (`cache.beam_search.BeamGroup`)."""

    #: a beam was preempted: the whole search restarts once the step is done
    restart_pending: bool

    def num_seats(self) -> int:
        """Seats of `max_num_seqs` the group's leader takes until its beams fork."""
        ...

    def waits(self, request: Request) -> bool:
        """Whether this beam already proposed this round (it waits for its siblings)."""
        ...


@dataclass(slots=True, eq=False)
class Request:
    """Engine-side state of one request.

    `prompt_token_ids` is None in timing-only mode (only lengths matter there); output token ids
    are kept only when `keep_tokens` (functional mode). `num_output_tokens` counts either way.
    """

    request_id: str
    index: int
    num_prompt_tokens: int
    sampling: SamplingParams
    arrival_s: float
    rng: np.random.Generator | None = None
    prompt_token_ids: list[int] | None = None
    prompt: str | None = None
    keep_tokens: bool = True
    output_token_ids: list[int] = field(default_factory=list)
    num_output_tokens: int = 0
    num_computed: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at first admission
    num_preemptions: int = 0
    priority: int = 0  # scheduling_policy="priority": lower runs first (vLLM's convention)
    status: Status = Status.WAITING
    first_scheduled_s: float = math.nan
    first_token_s: float = math.nan
    finished_s: float = math.nan
    #: when the whole result reaches the client if the server does not stream (a static batch
    #: returns every member at the batch end); NaN: streamed, returned as each token is made
    returned_s: float = math.nan
    token_times_s: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    reject_reason: str | None = None
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float = 0.0
    # speculative decoding: drafts verified and accepted at each of the request's steps
    spec_proposed: list[int] = field(default_factory=list)
    spec_accepted: list[int] = field(default_factory=list)
    # parallel sampling (`SamplingParams.n > 1`): which sample this sequence is, and (on sample
    # 0 until its prompt is computed) the other samples, which then fork its prompt KV
    sample_index: int = 0
    forks: list[Request] = field(default_factory=list)
    # beam search (`use_beam_search=True`): the prompt's `cache.beam_search.BeamGroup`, on the
    # submitted request and on every beam forked from it
    beam: BeamState | None = None
    # `SamplingParams.bad_words` as token sequences (tokenized once when the request is made)
    bad_words_token_ids: tuple[tuple[int, ...], ...] = ()
    # `SamplingParams.stop` strings (functional mode): the text detokenized so far, and the
    # incremental detokenizer's offsets into `output_token_ids` (see `batching.commit`)
    output_text: str = ""
    detok_prefix_offset: int = 0
    detok_read_offset: int = 0

    @property
    def num_tokens(self) -> int:
        """Prompt plus output tokens so far."""
        return self.num_prompt_tokens + self.num_output_tokens

    def max_len(self, max_model_len: int) -> int:
        """The longest this request may grow: prompt + max_tokens, capped by max_model_len."""
        if self.sampling.max_tokens is None:
            return max_model_len
        return min(max_model_len, self.num_prompt_tokens + self.sampling.max_tokens)

    @property
    def num_seats(self) -> int:
        """Seats of `max_num_seqs` the sequence takes while it runs: one, or for a leader whose
        samples (`n > 1`) or beams have not forked yet, one per sequence it will become (vLLM
        v0's `SequenceGroup.get_max_num_running_seqs`), so that they can join it later."""
        if self.beam is not None:
            return self.beam.num_seats()
        return 1 + len(self.forks)

    @property
    def num_uncomputed(self) -> int:
        """Tokens whose KV does not exist yet (the work the next step must do)."""
        return self.num_tokens - self.num_computed

    @property
    def is_finished(self) -> bool:
        return self.status in (Status.FINISHED, Status.REJECTED)

    def token_ids_slice(self, start: int, end: int) -> list[int]:
        """Token ids `[start, end)` of prompt + output (functional mode only)."""
        if self.prompt_token_ids is None:
            raise RuntimeError("token ids are not kept in timing-only mode")
        n_prompt = self.num_prompt_tokens
        if end <= n_prompt:
            return self.prompt_token_ids[start:end]
        if start >= n_prompt:
            return self.output_token_ids[start - n_prompt : end - n_prompt]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n_prompt]


def reject(req: Request, reason: str) -> None:
    """End a request that can never run, with its reason."""
    req.status = Status.REJECTED
    req.finish_reason = "rejected"
    req.reject_reason = reason
