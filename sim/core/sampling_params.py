"""`SamplingParams`: how one request samples and when it stops, in vLLM's names and rules.

Every field is checked when the object is made (types, ranges, NaN/inf, cross-field rules), each
refusal a `ConfigError` naming the field, the value and the fix. Temperatures below
`SAMPLING_EPS` are greedy, as in vLLM.

References: vLLM `vllm/sampling_params.py`; vLLM v1 `vllm/v1/sample/sampler.py` (the order the
logits processors run in, `sim.model.sampling`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

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
