"""Request arrival processes and length distributions for synthetic workloads.

Arrivals are a renewal process: request 0 arrives at exactly 0 s and request `i` arrives one
inter-arrival gap after request `i - 1`. The gaps are i.i.d. exponential (Poisson process), gamma
(bursty or smoothed traffic with a chosen coefficient of variation), or constant; `AllAtOnce` puts
every request at 0 s (an offline batch, request rate = inf) and `TraceArrivals` replays recorded
times. Lengths are fixed, uniform (inclusive), log-normal (clipped) or replayed from a trace.

Every draw is element-wise sequential on an explicit `np.random.Generator`, and every class can
produce any contiguous slice of its stream (`chunk_times_s(start, ...)`, `sample(..., start=)`), so
generating a workload in chunks gives bit-identical values to generating it all at once.

References:
    vLLM `benchmarks/benchmark_serving.py`: `--request-rate` (inf = all at once) and
    `--burstiness` (gamma inter-arrival gaps of shape `burstiness`, mean `1 / rate`).
    Wang et al., "BurstGPT: A Real-world Workload Dataset to Optimize LLM Serving Systems" (2024):
    production LLM arrivals are well fit by gamma gaps with cv > 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from sim.core.errors import InfersimError


def _check_rate(rate_per_s: float, what: str) -> None:
    if not (isinstance(rate_per_s, int | float) and math.isfinite(rate_per_s) and rate_per_s > 0):
        raise InfersimError(
            f"{what}: rate_per_s must be a finite number > 0 (requests per second), got "
            f"{rate_per_s!r}; use AllAtOnce() for an infinite rate"
        )


def _check_num(num: int) -> None:
    if isinstance(num, bool) or not isinstance(num, int | np.integer) or num < 0:
        raise InfersimError(f"number of samples must be an integer >= 0, got {num!r}")


def _times_from_gaps(gaps_s: np.ndarray, start: int, last_s: float) -> np.ndarray:
    """Arrival times of requests start.. from their gaps; request 0 arrives at exactly 0 s."""
    if start == 0 and gaps_s.size:
        gaps_s[0] = 0.0
    # Sequential accumulation from the previous arrival: bit-identical however it is chunked.
    return np.cumsum(np.concatenate(([last_s], gaps_s)))[1:]  # [num]


@runtime_checkable
class ArrivalProcess(Protocol):
    """Anything that gives ascending arrival times in seconds."""

    def times_s(self, num: int, rng: np.random.Generator) -> np.ndarray: ...

    def chunk_times_s(
        self, num: int, rng: np.random.Generator, start: int, last_s: float
    ) -> np.ndarray: ...


class _GapArrivals:
    """Shared code of the renewal processes: subclasses draw `num` i.i.d. gaps in seconds."""

    def gaps_s(self, num: int, rng: np.random.Generator) -> np.ndarray:
        raise NotImplementedError

    def times_s(self, num: int, rng: np.random.Generator) -> np.ndarray:
        """Arrival times of the first `num` requests, ascending from 0 s."""
        return self.chunk_times_s(num, rng, start=0, last_s=0.0)

    def chunk_times_s(
        self, num: int, rng: np.random.Generator, start: int, last_s: float
    ) -> np.ndarray:
        """Arrival times of requests `start .. start + num - 1`; `last_s` is request start-1's."""
        _check_num(num)
        return _times_from_gaps(self.gaps_s(num, rng), start, last_s)  # [num]


@dataclass(frozen=True)
class PoissonArrivals(_GapArrivals):
    """Poisson process: exponential gaps with mean `1 / rate_per_s` (cv = 1)."""

    rate_per_s: float

    def __post_init__(self) -> None:
        _check_rate(self.rate_per_s, "PoissonArrivals")

    def gaps_s(self, num: int, rng: np.random.Generator) -> np.ndarray:
        return rng.exponential(1.0 / self.rate_per_s, size=num)  # [num]


@dataclass(frozen=True)
class GammaArrivals(_GapArrivals):
    """Gamma renewal process: mean gap `1 / rate_per_s`, coefficient of variation `cv`.

    shape = 1 / cv^2, scale = cv^2 / rate. cv > 1 is burstier than Poisson, cv < 1 smoother,
    cv = 1 is exactly exponential. `from_burstiness` builds it from vLLM's shape parameter.
    """

    rate_per_s: float
    cv: float
    # Derived from cv, except that `from_burstiness` keeps the shape it was given bit for bit
    # (1 / (1 / sqrt(b))^2 can be off by an ulp, and then so would every gamma draw).
    shape: float = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_rate(self.rate_per_s, "GammaArrivals")
        if not (isinstance(self.cv, int | float) and math.isfinite(self.cv) and self.cv > 0):
            raise InfersimError(
                f"GammaArrivals: cv (coefficient of variation of the gaps) must be a finite "
                f"number > 0, got {self.cv!r}; cv = 1 is a Poisson process, cv > 1 is bursty"
            )
        object.__setattr__(self, "shape", 1.0 / self.cv**2)

    @classmethod
    def from_burstiness(cls, rate_per_s: float, burstiness: float) -> GammaArrivals:
        """Gaps Gamma(shape = burstiness, scale = 1 / (rate x burstiness)), as vLLM draws them."""
        shape = check_burstiness(burstiness)
        arrivals = cls(rate_per_s, cv=1.0 / math.sqrt(shape))
        object.__setattr__(arrivals, "shape", shape)
        return arrivals

    def gaps_s(self, num: int, rng: np.random.Generator) -> np.ndarray:
        return rng.gamma(self.shape, 1.0 / (self.shape * self.rate_per_s), size=num)  # [num]


@dataclass(frozen=True)
class ConstantArrivals(_GapArrivals):
    """A request exactly every `1 / rate_per_s` seconds (draws nothing from the generator)."""

    rate_per_s: float

    def __post_init__(self) -> None:
        _check_rate(self.rate_per_s, "ConstantArrivals")

    def gaps_s(self, num: int, rng: np.random.Generator) -> np.ndarray:
        return np.full(num, 1.0 / self.rate_per_s)  # [num]


@dataclass(frozen=True)
class AllAtOnce(_GapArrivals):
    """Every request arrives at 0 s (request rate = inf: an offline batch)."""

    def gaps_s(self, num: int, rng: np.random.Generator) -> np.ndarray:
        return np.zeros(num)  # [num]


@dataclass(frozen=True, eq=False)
class TraceArrivals:
    """Replay recorded arrival times in seconds (finite, >= 0, non-decreasing)."""

    times: np.ndarray = field(repr=False)

    def __post_init__(self) -> None:
        times = np.array(self.times, dtype=np.float64).reshape(-1)  # [num_trace]
        if times.size == 0:
            raise InfersimError("TraceArrivals: the trace has no arrival times")
        if not np.all(np.isfinite(times)) or times.min() < 0:
            raise InfersimError("TraceArrivals: arrival times must be finite seconds >= 0")
        if np.any(np.diff(times) < 0):
            first = int(np.argmax(np.diff(times) < 0)) + 1
            raise InfersimError(
                f"TraceArrivals: arrival times must be non-decreasing; time {first} "
                f"({times[first]} s) is before time {first - 1} ({times[first - 1]} s); sort them"
            )
        times.setflags(write=False)
        object.__setattr__(self, "times", times)

    def __len__(self) -> int:
        return int(self.times.size)

    def times_s(self, num: int, rng: np.random.Generator) -> np.ndarray:
        """The first `num` recorded times (the generator is not used)."""
        return self.chunk_times_s(num, rng, start=0, last_s=0.0)

    def chunk_times_s(
        self, num: int, rng: np.random.Generator, start: int, last_s: float
    ) -> np.ndarray:
        _check_num(num)
        if start + num > self.times.size:
            raise InfersimError(
                f"TraceArrivals: asked for {start + num} arrivals but the trace has only "
                f"{self.times.size}; ask for fewer requests or use a request rate instead"
            )
        return self.times[start : start + num].copy()  # [num]


def _is_number(value: object) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)


def check_burstiness(burstiness: float, *, shapes_gaps: bool = True) -> float:
    """`burstiness` as a float after checking it is a finite number > 0 (the gamma shape).

    With `shapes_gaps=False` the arrivals it would shape do not exist (a trace replays its own
    timestamps, or every request arrives at 0 s at rate inf): any value other than 1 is then an
    error rather than silently ignored, so a "bursty" run is never secretly a Poisson one.
    """
    if not (_is_number(burstiness) and math.isfinite(burstiness) and burstiness > 0):
        raise InfersimError(
            f"burstiness (--burstiness) must be a finite number > 0, got {burstiness!r}: it is "
            "the gamma shape of the inter-arrival gaps (1 = Poisson, < 1 burstier, > 1 "
            "smoother); pass e.g. 0.5 for bursty traffic or 1 for a Poisson process"
        )
    if not shapes_gaps and burstiness != 1:
        raise InfersimError(
            f"burstiness (--burstiness) = {burstiness!r} has no effect here: the arrivals are "
            "not drawn from a rate (a trace's own timestamps, or request rate inf = all at "
            "once); give a finite request rate (--request-rate) or leave burstiness at 1"
        )
    return float(burstiness)


def arrivals_from_rate(rate: float, burstiness: float = 1.0) -> ArrivalProcess:
    """The arrival process of `rate` requests/s with gamma gaps of shape `burstiness`.

    This is the one place a (rate, burstiness) pair becomes arrivals, for the synthetic,
    shared-prefix and re-timed trace workloads alike. It follows vLLM's
    `benchmarks/benchmark_serving.py`: the gap after each request is Gamma(shape = burstiness,
    scale = 1 / (rate x burstiness)), so the mean gap is 1 / rate and the coefficient of
    variation is 1 / sqrt(burstiness); burstiness 1 is exactly the Poisson process (exponential
    gaps), and rate inf sends every request at 0 s. Unlike the newer `vllm bench serve`, the
    arrival times are not rescaled so the last one lands at num / rate: that rescale needs
    every gap before the first arrival, which a chunked stream (and a renewal process) cannot
    have. The rate must be > 0 or inf, the burstiness finite and > 0 (`check_burstiness`).
    """
    if not (_is_number(rate) and rate > 0):  # also rejects nan (every comparison is False)
        raise InfersimError(
            f"request rate (--request-rate) must be > 0 requests/s, or inf for all requests "
            f"at once, got {rate!r}; pass a positive rate such as 4, or inf"
        )
    shape = check_burstiness(burstiness, shapes_gaps=math.isfinite(rate))
    if math.isinf(rate):
        return AllAtOnce()
    if shape == 1.0:
        return PoissonArrivals(float(rate))
    return GammaArrivals.from_burstiness(float(rate), shape)


@runtime_checkable
class LengthDistribution(Protocol):
    """Token counts >= 1; `start` is the index of the first sample within the whole stream."""

    def sample(self, num: int, rng: np.random.Generator, start: int = 0) -> np.ndarray: ...


#: the longest length a distribution may give: 2**31 - 1 tokens is past any model's context
#: (the longest are ~10M), so a larger value is a typo or a unit mistake
MAX_LEN_TOKENS = 2**31 - 1


def _check_len(value: int, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise InfersimError(f"{what} must be an integer number of tokens >= 1, got {value!r}")
    if value > MAX_LEN_TOKENS:
        raise InfersimError(f"{what}={value:,} tokens is more than any model's context "
                            f"(at most {MAX_LEN_TOKENS:,} here); check the units")


@dataclass(frozen=True)
class FixedLength:
    """Always `n` tokens."""

    n: int

    def __post_init__(self) -> None:
        _check_len(self.n, "FixedLength.n")

    def sample(self, num: int, rng: np.random.Generator, start: int = 0) -> np.ndarray:
        _check_num(num)
        return np.full(num, int(self.n), dtype=np.int64)  # [num]


@dataclass(frozen=True)
class UniformLength:
    """Uniform integer in [low, high], both inclusive."""

    low: int
    high: int

    def __post_init__(self) -> None:
        _check_len(self.low, "UniformLength.low")
        _check_len(self.high, "UniformLength.high")
        if self.high < self.low:
            raise InfersimError(
                f"UniformLength: high ({self.high}) must be >= low ({self.low}); swap them"
            )

    def sample(self, num: int, rng: np.random.Generator, start: int = 0) -> np.ndarray:
        _check_num(num)
        return rng.integers(self.low, self.high, size=num, endpoint=True, dtype=np.int64)


@dataclass(frozen=True)
class LognormalLength:
    """Log-normal with the given median (= exp(mu)) and log-space sigma, rounded to an integer
    and clipped to [1, max_len] (no upper clip when `max_len` is None)."""

    median: float
    sigma: float
    max_len: int | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.median, int | float) and math.isfinite(self.median)) or (
            self.median < 1
        ):
            raise InfersimError(f"LognormalLength: median must be >= 1 token, got {self.median!r}")
        if not (isinstance(self.sigma, int | float) and math.isfinite(self.sigma)) or (
            self.sigma < 0
        ):
            raise InfersimError(
                f"LognormalLength: sigma (log-space spread) must be finite and >= 0, "
                f"got {self.sigma!r}"
            )
        if self.max_len is not None:
            _check_len(self.max_len, "LognormalLength.max_len")

    def sample(self, num: int, rng: np.random.Generator, start: int = 0) -> np.ndarray:
        _check_num(num)
        values = rng.lognormal(math.log(self.median), self.sigma, size=num)  # [num]
        upper = np.inf if self.max_len is None else float(self.max_len)
        return np.clip(np.rint(values), 1.0, upper).astype(np.int64)  # [num]


@dataclass(frozen=True, eq=False)
class TraceLengths:
    """Replay recorded lengths in order, cycling back to the first after the last."""

    values: np.ndarray = field(repr=False)

    def __post_init__(self) -> None:
        raw = np.asarray(self.values).reshape(-1)  # [num_trace]
        if raw.size == 0:
            raise InfersimError("TraceLengths: no lengths given")
        if raw.dtype.kind not in "iu" and not (
            raw.dtype.kind == "f" and np.all(np.isfinite(raw)) and np.all(raw == np.rint(raw))
        ):
            raise InfersimError("TraceLengths: lengths must be integers")
        values = raw.astype(np.int64)  # [num_trace]
        if values.min() < 1:
            bad = int(np.argmax(values < 1))
            raise InfersimError(
                f"TraceLengths: lengths must be >= 1 token; value {bad} is {values[bad]}"
            )
        values.setflags(write=False)
        object.__setattr__(self, "values", values)

    def __len__(self) -> int:
        return int(self.values.size)

    def sample(self, num: int, rng: np.random.Generator, start: int = 0) -> np.ndarray:
        _check_num(num)
        index = (start + np.arange(num, dtype=np.int64)) % self.values.size  # [num]
        return self.values[index]  # [num]
