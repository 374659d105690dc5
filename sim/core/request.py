"""Requests and their outputs, in vLLM's shapes and names.

`SamplingParams`, `RequestOutput`, `CompletionOutput`, `RequestMetrics` and `Logprob` mirror vLLM's
classes so code written against vLLM's offline API runs here (times are simulated seconds).
`Request` is the engine's mutable per-request state: progress is one counter, `num_computed`
(KV exists for the first `num_computed` tokens), as in vLLM v1; prefill, chunked prefill, prefix
hits, preemption and speculation all just move it.

References: vLLM `vllm/sampling_params.py`, `vllm/outputs.py`, `vllm/v1/request.py`.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from sim.core.errors import ConfigError

#: Temperatures below this are greedy (vLLM's `_SAMPLING_EPS`): dividing float64 logits by a
#: temperature near the smallest float overflows them to inf, and inf - inf draws NaN.
SAMPLING_EPS = 1e-5
#: The most samples one prompt may ask for (vLLM's default `VLLM_MAX_N_SEQUENCES`): every
#: sample is a `Request` built up front, so an unbounded `n` would exhaust memory, not fail.
MAX_N = 16384
#: vLLM clamps each `logit_bias` entry to this magnitude (the OpenAI API's range): a bias of
#: 1e300 would otherwise turn every other token's probability into an exact 0 and NaN the rest.
MAX_LOGIT_BIAS = 100.0


def _int_field(name: str, value: object, fix: str) -> int:
    """`value` as an int, or a `ConfigError` naming the field. bool and float are refused: `True`
    is not a count, and `max_tokens=2.5` is a mistake, not 2 (or 3) tokens."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ConfigError(f"SamplingParams.{name} must be an integer, got {value!r} "
                          f"({type(value).__name__}); {fix}")
    return int(value)


def _float_field(name: str, value: object, fix: str) -> float:
    """`value` as a finite float, or a `ConfigError` naming the field (str, bool, NaN, inf)."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise ConfigError(f"SamplingParams.{name} must be a number, got {value!r} "
                          f"({type(value).__name__}); {fix}")
    as_float = float(value)
    if not math.isfinite(as_float):
        raise ConfigError(f"SamplingParams.{name} must be finite, got {value!r}; {fix}")
    return as_float


def _bool_field(name: str, value: object) -> bool:
    """`value` if it is a bool: a string such as "false" is truthy, so it is refused."""
    if not isinstance(value, bool | np.bool_):
        raise ConfigError(f"SamplingParams.{name} must be True or False, got {value!r} "
                          f"({type(value).__name__})")
    return bool(value)


def _token_ids_field(name: str, value: object) -> tuple[int, ...]:
    """`value` (a sequence of non-negative ints) as a tuple, or a `ConfigError` naming the field."""
    if isinstance(value, str | bytes) or not isinstance(value, Sequence | np.ndarray):
        raise ConfigError(f"SamplingParams.{name} must be a sequence of token ids (ints), got "
                          f"{value!r} ({type(value).__name__}); e.g. {name}=[2]")
    ids: list[int] = []
    for i, token in enumerate(value):
        if isinstance(token, bool) or not isinstance(token, int | np.integer) or token < 0:
            raise ConfigError(f"SamplingParams.{name}[{i}] must be a token id (an int >= 0), "
                              f"got {token!r}")
        ids.append(int(token))
    return tuple(ids)


def _strings_field(name: str, value: object) -> tuple[str, ...]:
    """`value` (None, one string or a sequence of non-empty strings) as a tuple (vLLM accepts a
    lone string for `stop` and `bad_words`)."""
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, Sequence):
        raise ConfigError(f"SamplingParams.{name} must be a string or a list of strings, got "
                          f"{value!r} ({type(value).__name__})")
    out: list[str] = []
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item:
            raise ConfigError(f"SamplingParams.{name}[{i}] must be a non-empty string, got "
                              f"{item!r}; drop empty entries")
        out.append(item)
    return tuple(out)


def _logit_bias_field(value: object) -> dict[int, float]:
    """`logit_bias` as {token id: bias}, each bias clamped to +-`MAX_LOGIT_BIAS` (vLLM, after the
    OpenAI API); keys may be ints or decimal strings (JSON objects have string keys)."""
    if not isinstance(value, Mapping):
        raise ConfigError(f"SamplingParams.logit_bias must be a dict {{token_id: bias}}, got "
                          f"{value!r} ({type(value).__name__})")
    out: dict[int, float] = {}
    for key, bias in value.items():
        token: object = int(key) if isinstance(key, str) and key.isdigit() else key
        if isinstance(token, bool) or not isinstance(token, int | np.integer) or token < 0:
            raise ConfigError(f"SamplingParams.logit_bias: key {key!r} must be a token id (an "
                              "int >= 0)")
        as_float = _float_field(f"logit_bias[{key!r}]", bias, "pass a bias in [-100, 100]")
        out[int(token)] = min(MAX_LOGIT_BIAS, max(-MAX_LOGIT_BIAS, as_float))
    return out


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one request (vLLM's names, defaults and rules).

    `temperature=0` (or anything below `SAMPLING_EPS`, as in vLLM) is greedy. `top_k=-1` (or 0)
    and `top_p=1` disable those filters. `seed` gives the request its own random stream; without
    it the engine derives one from its seed and the request's index, so outputs never depend on
    what else is in the batch. `n > 1` returns `n` samples of one prompt that share its KV blocks
    (`cache.parallel_sampling`); sample `i` draws from seed `seed + i` (vLLM v1), so it equals an
    `n=1` run with that seed.

    `use_beam_search=True` (vLLM v0's switch) keeps the `n` likeliest sequences instead
    (`cache.beam_search`): beams fork each other's KV blocks, copied only when written; it needs
    `temperature=0` and ranks finished beams by cumulative log-probability over
    `length ** length_penalty`.

    Every field is checked when the object is built (vLLM's `SamplingParams._verify_args`): a
    wrong type, NaN, inf or a value out of range is a `ConfigError` naming the field, so a bad
    value never reaches the sampler. Unlike vLLM, temperatures above 2 are allowed (float64
    logits divide by any finite temperature) and small ones are not raised to 1e-2.

    The logits processors follow vLLM v1 (`vllm/v1/sample/sampler.py`), in its order: tokens
    outside `allowed_token_ids` and the last token of each matching `bad_words` sequence are set
    to -inf, `logit_bias` is added, then the penalties: `repetition_penalty` (CTRL, Keskar et
    al. 2019: a positive logit divided by it, a negative one multiplied) on every token seen in
    the prompt or the output, `frequency_penalty` times the token's count in the output and
    `presence_penalty` once per token present in the output are subtracted (OpenAI's
    definitions). Greedy takes the arg-max of those logits; sampling divides by the temperature,
    drops tokens whose probability is below `min_p` times the largest (Nguyen et al. 2024), then
    applies top-k and top-p. Log-probabilities (`logprobs`, `prompt_logprobs`,
    `cumulative_logprob`) stay those of the raw model (vLLM's default `raw_logprobs`).

    `stop` strings end a request once its detokenized text contains one (`finish_reason="stop"`,
    `stop_reason` the string); the text is cut before it, or after it with
    `include_stop_str_in_output`; the token ids keep the token that completed it (vLLM). They
    need text, so they need `mode="functional"`. `best_of` samples that many sequences and
    returns the `n` with the highest cumulative log-probability (vLLM v0); `truncate_prompt_tokens`
    keeps the last `k` prompt tokens (-1: as many as `max_model_len` allows).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    use_beam_search: bool = False
    length_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    stop: tuple[str, ...] = ()
    include_stop_str_in_output: bool = False
    best_of: int | None = None
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: tuple[int, ...] | None = None
    bad_words: tuple[str, ...] = ()
    truncate_prompt_tokens: int | None = None

    def __post_init__(self) -> None:
        def put(name: str, value: object) -> None:  # frozen: normalise in place (np types, ints)
            object.__setattr__(self, name, value)

        n = _int_field("n", self.n, "pass the number of samples per prompt, e.g. n=2")
        if not 1 <= n <= MAX_N:
            raise ConfigError(f"SamplingParams.n (samples per prompt) must be in [1, {MAX_N}], "
                              f"got {n}; use n=1 for one output per prompt")
        put("n", n)
        temperature = _float_field("temperature", self.temperature,
                                   "use 0 for greedy or e.g. 0.8 to sample")
        if temperature < 0:
            raise ConfigError(f"SamplingParams.temperature must be >= 0, got {temperature}; "
                              "use 0 for greedy or e.g. 0.8 to sample")
        put("temperature", temperature)
        top_p = _float_field("top_p", self.top_p, "use 1 to disable nucleus sampling")
        if not 0 < top_p <= 1:
            raise ConfigError(f"SamplingParams.top_p must be in (0, 1], got {top_p}; use 1 to "
                              "disable nucleus sampling")
        put("top_p", top_p)
        top_k = _int_field("top_k", self.top_k, "use -1 (or 0) to disable top-k")
        if top_k < -1:
            raise ConfigError(f"SamplingParams.top_k must be -1 (disabled), 0 (disabled) or "
                              f"positive, got {top_k}")
        put("top_k", top_k)
        if self.seed is not None:
            seed = _int_field("seed", self.seed, "pass a non-negative int, or None")
            if seed < 0:
                raise ConfigError(f"SamplingParams.seed must be >= 0 or None, got {seed}")
            put("seed", seed)
        if self.max_tokens is not None:
            max_tokens = _int_field("max_tokens", self.max_tokens,
                                    "pass a whole number of tokens, or None for up to max_model_len")
            if max_tokens < 1:
                raise ConfigError(f"SamplingParams.max_tokens must be at least 1 (or None), "
                                  f"got {max_tokens}")
            put("max_tokens", max_tokens)
        min_tokens = _int_field("min_tokens", self.min_tokens, "pass a whole number of tokens")
        if min_tokens < 0:
            raise ConfigError(f"SamplingParams.min_tokens must be >= 0, got {min_tokens}")
        if self.max_tokens is not None and min_tokens > self.max_tokens:
            raise ConfigError(f"SamplingParams.min_tokens ({min_tokens}) must be <= max_tokens "
                              f"({self.max_tokens}); lower min_tokens or raise max_tokens")
        put("min_tokens", min_tokens)
        if self.logprobs is not None:
            logprobs = _int_field("logprobs", self.logprobs,
                                  "pass how many top log-probabilities to return, or None")
            if logprobs < 0:
                raise ConfigError(f"SamplingParams.logprobs must be >= 0 or None, got {logprobs}")
            put("logprobs", logprobs)
        put("stop_token_ids", _token_ids_field("stop_token_ids", self.stop_token_ids))
        for name in ("ignore_eos", "skip_special_tokens", "use_beam_search"):
            put(name, _bool_field(name, getattr(self, name)))
        put("length_penalty", _float_field("length_penalty", self.length_penalty,
                                           "use 1.0 to rank beams by mean log-probability"))
        if self.use_beam_search and (not self.greedy or self.top_p != 1
                                     or self.top_k not in (-1, 0)):
            raise ConfigError("beam search is deterministic: use temperature=0 and no top_p / "
                              "top_k with use_beam_search=True")
        if self.use_beam_search and self.min_tokens:
            raise ConfigError("min_tokens is not supported with use_beam_search=True; use "
                              "ignore_eos=True to keep every beam going")
        self._check_vllm_fields(put)

    def _check_vllm_fields(self, put: Callable[[str, object], None]) -> None:
        """The fields vLLM added after the first wave, with its ranges (`_verify_args`)."""
        for name in ("presence_penalty", "frequency_penalty"):
            value = _float_field(name, getattr(self, name), "use 0 to disable it")
            if not -2 <= value <= 2:
                raise ConfigError(f"SamplingParams.{name} must be in [-2, 2], got {value}; use 0 "
                                  "to disable it")
            put(name, value)
        repetition = _float_field("repetition_penalty", self.repetition_penalty,
                                  "use 1 to disable it")
        if repetition <= 0:
            raise ConfigError(f"SamplingParams.repetition_penalty must be > 0, got {repetition}; "
                              "use 1 to disable it (above 1 discourages repeats)")
        put("repetition_penalty", repetition)
        min_p = _float_field("min_p", self.min_p, "use 0 to disable it")
        if not 0 <= min_p <= 1:
            raise ConfigError(f"SamplingParams.min_p must be in [0, 1], got {min_p}; use 0 to "
                              "disable it")
        put("min_p", min_p)
        put("stop", _strings_field("stop", self.stop))
        put("bad_words", _strings_field("bad_words", self.bad_words))
        put("include_stop_str_in_output",
            _bool_field("include_stop_str_in_output", self.include_stop_str_in_output))
        if self.best_of is not None:
            best_of = _int_field("best_of", self.best_of, "pass an int >= n, or None")
            if not self.n <= best_of <= MAX_N:
                raise ConfigError(f"SamplingParams.best_of must be in [n={self.n}, {MAX_N}], got "
                                  f"{best_of}; best_of samples that many and returns the n best")
            if best_of > 1 and self.greedy:
                raise ConfigError(f"SamplingParams.best_of={best_of} needs sampling: greedy "
                                  "(temperature=0) gives best_of equal sequences; use best_of=1 "
                                  "or a temperature > 0")
            put("best_of", best_of)
        if self.prompt_logprobs is not None:
            prompt_logprobs = _int_field("prompt_logprobs", self.prompt_logprobs,
                                         "pass how many top log-probabilities per prompt token")
            if prompt_logprobs < 0:
                raise ConfigError(f"SamplingParams.prompt_logprobs must be >= 0 or None, got "
                                  f"{prompt_logprobs}")
            put("prompt_logprobs", prompt_logprobs)
        if self.logit_bias is not None:
            put("logit_bias", _logit_bias_field(self.logit_bias) or None)
        if self.allowed_token_ids is not None:
            allowed = _token_ids_field("allowed_token_ids", self.allowed_token_ids)
            if not allowed:
                raise ConfigError("SamplingParams.allowed_token_ids is empty: no token could be "
                                  "sampled; pass at least one id, or None for all")
            put("allowed_token_ids", allowed)
        if self.truncate_prompt_tokens is not None:
            keep = _int_field("truncate_prompt_tokens", self.truncate_prompt_tokens,
                              "pass how many trailing prompt tokens to keep")
            if keep < 1 and keep != -1:
                raise ConfigError(f"SamplingParams.truncate_prompt_tokens must be >= 1, -1 "
                                  f"(max_model_len) or None, got {keep}")
            put("truncate_prompt_tokens", keep)
        if self.use_beam_search and (self.processes_logits or self.best_of is not None
                                     or self.stop):
            raise ConfigError("beam search ranks the raw model's log-probabilities: penalties, "
                              "min_p, logit_bias, allowed_token_ids, bad_words, best_of and stop "
                              "strings are not supported with use_beam_search=True")

    @property
    def num_samples(self) -> int:
        """Sequences sampled for the prompt: `best_of` if set, else `n`."""
        return self.n if self.best_of is None else self.best_of

    @property
    def penalizes(self) -> bool:
        """Whether any of the three penalties is on (they need the request's token counts)."""
        return (self.presence_penalty != 0 or self.frequency_penalty != 0
                or self.repetition_penalty != 1)

    @property
    def processes_logits(self) -> bool:
        """Whether any logits processor changes the logits before sampling (all off: the
        sampler sees the model's logits unchanged, bit for bit)."""
        return (self.penalizes or self.min_p > 0 or self.logit_bias is not None
                or self.allowed_token_ids is not None or bool(self.bad_words))

    @property
    def greedy(self) -> bool:
        """Whether this request takes the arg-max: temperature below `SAMPLING_EPS` (vLLM)."""
        return self.temperature < SAMPLING_EPS


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
