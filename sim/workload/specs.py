"""Workloads: the stream of requests (arrival time, prompt length, true output length) a run serves.

`make_workload` returns a `Workload`: a lazy, re-iterable stream of `RequestSpec`s (each pass
starts over from the seed and yields the same specs, so a second `engine.run(workload)` serves
the whole workload again rather than silently serving nothing). It draws arrivals, prompt lengths, output
lengths and prompt token ids from four independent child streams of `SeedSequence(seed)`, so that
changing (say) the output-length distribution never shifts the arrivals, and it generates them in
chunks (4096 by default) so a million-request timing-only run never holds them all at once. The
chunk size does not change the values: the same seed gives identical specs for any chunking.
`workload_from_trace` replays an Azure trace (its timestamps, or a synthetic rate) with its lengths.

The arrival processes and length distributions live in `sim.workload.distributions`, the Azure trace loader
in `sim.workload.azure_trace`; both are re-exported here.

References:
    vLLM `benchmarks/benchmark_serving.py` (request rate / burstiness semantics, fixed seed);
    Patel et al., "Splitwise", ISCA 2024 (the Azure LLM inference traces).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from sim.core.errors import InfersimError
from sim.workload.azure_trace import AzureTrace, load_azure_trace
from sim.workload.distributions import (
    AllAtOnce,
    ArrivalProcess,
    ConstantArrivals,
    FixedLength,
    GammaArrivals,
    LengthDistribution,
    LognormalLength,
    PoissonArrivals,
    TraceArrivals,
    TraceLengths,
    UniformLength,
    arrivals_from_rate,
    check_burstiness,
)

__all__ = [
    "AllAtOnce",
    "ArrivalProcess",
    "AzureTrace",
    "ConstantArrivals",
    "FixedLength",
    "GammaArrivals",
    "LengthDistribution",
    "LognormalLength",
    "PoissonArrivals",
    "RequestSpec",
    "TraceArrivals",
    "TraceLengths",
    "UniformLength",
    "Workload",
    "arrivals_from_rate",
    "check_burstiness",
    "load_azure_trace",
    "make_workload",
    "workload_from_trace",
]

DEFAULT_CHUNK_SIZE = 4096
#: prompt token ids drawn at once (one chunk of specs): 2**26 ids are 0.5 GiB as int64 and
#: a few GiB as the specs' tuples, so a larger chunk is refused before it is drawn
MAX_CHUNK_PROMPT_TOKENS = 2**26
#: requests arriving at once (an infinite rate): specs stream lazily, so at a finite rate any
#: number streams through, but arriving together they all wait in one queue (~1 KiB each)
MAX_NUM_REQUESTS_AT_ONCE = 10**6


def _as_count(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise InfersimError(f"{what} must be an integer, got {value!r}")
    return int(value)


@dataclass(frozen=True, slots=True)
class RequestSpec:
    """One request as the workload describes it, before the engine sees it.

    `output_len` is the true output length: the timing executor stops the request there, and no
    scheduler may read it. `prompt_token_ids`, when given, has `prompt_len` entries.
    """

    request_id: str
    arrival_s: float
    prompt_len: int
    output_len: int
    prompt_token_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        arrival_s = self.arrival_s
        if isinstance(arrival_s, bool) or not isinstance(arrival_s, int | float | np.floating):
            raise InfersimError(
                f"request {self.request_id!r}: arrival_s must be a number of seconds, "
                f"got {arrival_s!r}"
            )
        if not (math.isfinite(arrival_s) and arrival_s >= 0):
            raise InfersimError(
                f"request {self.request_id!r}: arrival_s must be finite and >= 0 seconds, "
                f"got {arrival_s!r}"
            )
        for name in ("prompt_len", "output_len"):
            value = _as_count(getattr(self, name), f"request {self.request_id!r}: {name}")
            if value < 1:
                raise InfersimError(
                    f"request {self.request_id!r}: {name} must be >= 1 token, got {value}"
                )
            object.__setattr__(self, name, value)
        object.__setattr__(self, "arrival_s", float(arrival_s))
        ids = self.prompt_token_ids
        if ids is not None and len(ids) != self.prompt_len:
            raise InfersimError(
                f"request {self.request_id!r}: prompt_token_ids has {len(ids)} tokens but "
                f"prompt_len is {self.prompt_len}; they must agree"
            )


class Workload:
    """A re-iterable, lazy stream of `num_requests` request specs.

    `iter(workload)` calls `make_specs()` afresh, so every pass is a new generator over the same
    seeded values: a workload can be served twice (e.g. two engines compared on one workload)
    without being materialised. `len(workload)` is the number of specs one pass yields.
    """

    __slots__ = ("_make_specs", "num_requests")

    def __init__(self, make_specs: Callable[[], Iterator[RequestSpec]], num_requests: int):
        self._make_specs = make_specs
        self.num_requests = num_requests

    def __iter__(self) -> Iterator[RequestSpec]:
        return self._make_specs()

    def __len__(self) -> int:
        return self.num_requests

    def __repr__(self) -> str:
        return f"Workload(num_requests={self.num_requests})"


def _as_length(value: LengthDistribution | int, what: str) -> LengthDistribution:
    if isinstance(value, bool):
        raise InfersimError(f"{what} must be a length distribution or an integer, got {value!r}")
    if isinstance(value, int | np.integer):
        return FixedLength(int(value))
    if not isinstance(value, LengthDistribution):
        raise InfersimError(
            f"{what} must be a length distribution (FixedLength, UniformLength, "
            f"LognormalLength, TraceLengths) or an integer, got {value!r}"
        )
    return value


def _as_arrival(value: ArrivalProcess | float, burstiness: float) -> ArrivalProcess:
    """A rate (with its burstiness) through `arrivals_from_rate`; a process as it is."""
    if isinstance(value, bool):
        raise InfersimError(f"arrival must be an arrival process or a rate, got {value!r}")
    if isinstance(value, int | float | np.integer | np.floating):
        return arrivals_from_rate(float(value), burstiness)
    if check_burstiness(burstiness) != 1.0:
        raise InfersimError(
            f"burstiness ({burstiness!r}) shapes the gaps of a rate, but arrival is already an "
            f"arrival process ({value!r}); pass the rate in requests/s with the burstiness, or "
            "leave burstiness at 1"
        )
    if not isinstance(value, ArrivalProcess):
        raise InfersimError(
            f"arrival must be an arrival process (PoissonArrivals, GammaArrivals, "
            f"ConstantArrivals, AllAtOnce, TraceArrivals) or a rate in requests/s, got {value!r}"
        )
    return value


def make_workload(
    num_requests: int,
    arrival: ArrivalProcess | float,
    input_len: LengthDistribution | int,
    output_len: LengthDistribution | int,
    seed: int = 0,
    vocab_size: int | None = None,
    id_prefix: str = "req",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    burstiness: float = 1.0,
) -> Workload:
    """A lazy, seeded, re-iterable stream of `num_requests` request specs, in arrival order.

    `arrival` may be a rate in requests/s, whose gaps are gamma with shape `burstiness` (1 =
    Poisson; inf = all at once; see `arrivals_from_rate`), or an arrival process (then
    `burstiness` must stay 1); lengths may be plain integers (fixed). With `vocab_size`, each
    spec carries uniform random prompt token ids in [0, vocab_size). Request ids are
    `f"{id_prefix}-{i}"`.
    """
    num_requests = _as_count(num_requests, "num_requests")
    if num_requests < 0:
        raise InfersimError(f"num_requests must be >= 0, got {num_requests}")
    chunk_size = _as_count(chunk_size, "chunk_size")
    if chunk_size < 1:
        raise InfersimError(f"chunk_size must be >= 1, got {chunk_size}")
    if vocab_size is not None and _as_count(vocab_size, "vocab_size") < 1:
        raise InfersimError(f"vocab_size must be >= 1, got {vocab_size}")
    seed = _as_count(seed, "seed")
    if seed < 0:
        raise InfersimError(f"seed must be >= 0, got {seed}")
    process = _as_arrival(arrival, burstiness)
    if isinstance(process, AllAtOnce) and num_requests > MAX_NUM_REQUESTS_AT_ONCE:
        raise InfersimError(
            f"num_requests={num_requests:,} arriving at once is more than the "
            f"{MAX_NUM_REQUESTS_AT_ONCE:,} one simulated run holds in its queue; simulate "
            "fewer, or give a finite request rate to stream them")
    if isinstance(process, TraceArrivals) and num_requests > len(process):
        raise InfersimError(
            f"num_requests ({num_requests}) exceeds the {len(process)} arrival times in the "
            "trace; ask for fewer requests or use a request rate instead"
        )
    input_dist = _as_length(input_len, "input_len")
    output_dist = _as_length(output_len, "output_len")
    return Workload(
        lambda: _generate(
            num_requests, process, input_dist, output_dist, seed, vocab_size, id_prefix,
            chunk_size,
        ),
        num_requests,
    )


def check_token_budget(prompt_lens: np.ndarray, start: int = 0) -> None:
    """Refuse to draw the token ids of a chunk of prompts (`prompt_lens` `[num]`, the first being
    request `start`) when they are more than `MAX_CHUNK_PROMPT_TOKENS`: the number is named
    before anything that size is allocated."""
    total = int(prompt_lens.astype(np.float64).sum())  # float: no int64 overflow at 1e23
    if total > MAX_CHUNK_PROMPT_TOKENS:
        longest = int(prompt_lens.max())
        raise InfersimError(
            f"requests {start}..{start + prompt_lens.size - 1} have {total:,} prompt tokens "
            f"(the longest {longest:,}), more than the {MAX_CHUNK_PROMPT_TOKENS:,} token ids "
            "this simulator draws at once; lower the input length (no model's context is "
            "that long) or use timing-only token counts")


def _generate(
    num_requests: int,
    process: ArrivalProcess,
    input_dist: LengthDistribution,
    output_dist: LengthDistribution,
    seed: int,
    vocab_size: int | None,
    id_prefix: str,
    chunk_size: int,
) -> Iterator[RequestSpec]:
    arrival_ss, input_ss, output_ss, token_ss = np.random.SeedSequence(seed).spawn(4)
    arrival_rng = np.random.default_rng(arrival_ss)
    input_rng = np.random.default_rng(input_ss)
    output_rng = np.random.default_rng(output_ss)
    token_rng = np.random.default_rng(token_ss)
    last_s = 0.0
    for start in range(0, num_requests, chunk_size):
        num = min(chunk_size, num_requests - start)
        arrivals_s = process.chunk_times_s(num, arrival_rng, start=start, last_s=last_s)  # [num]
        prompt_lens = input_dist.sample(num, input_rng, start=start)  # [num]
        output_lens = output_dist.sample(num, output_rng, start=start)  # [num]
        if arrivals_s.shape != (num,) or prompt_lens.shape != (num,) or output_lens.shape != (
            num,
        ):
            raise InfersimError("an arrival process or length distribution returned a bad shape")
        last_s = float(arrivals_s[-1])
        tokens: list[tuple[int, ...] | None] = [None] * num
        if vocab_size is not None:
            check_token_budget(prompt_lens, start)
            flat = token_rng.integers(0, vocab_size, size=int(prompt_lens.sum()))  # [sum(len)]
            pieces = np.split(flat, np.cumsum(prompt_lens)[:-1])  # num x [prompt_len]
            tokens = [tuple(piece.tolist()) for piece in pieces]
        arrival_list = arrivals_s.tolist()
        prompt_list = prompt_lens.tolist()
        output_list = output_lens.tolist()
        for i in range(num):
            yield RequestSpec(
                f"{id_prefix}-{start + i}",
                arrival_list[i],
                prompt_list[i],
                output_list[i],
                tokens[i],
            )


def workload_from_trace(
    trace: AzureTrace,
    num_requests: int | None = None,
    request_rate: float | None = None,
    seed: int = 0,
    burstiness: float = 1.0,
    max_prompt_len: int | None = None,
    max_output_len: int | None = None,
    vocab_size: int | None = None,
    id_prefix: str = "req",
) -> Workload:
    """Requests (re-iterable, see `Workload`) with the trace's lengths (in order), arriving at
    the trace's own times, or at `request_rate` requests/s (Poisson, or gamma with
    `burstiness`; inf = all at once).

    `num_requests` defaults to the whole trace; with a request rate it may exceed the trace,
    and the lengths then cycle. `max_prompt_len` / `max_output_len` clip the lengths (e.g. to
    a model's context window).
    """
    if not isinstance(trace, AzureTrace):
        raise InfersimError(f"trace must be an AzureTrace (see load_azure_trace), got {trace!r}")
    num = len(trace) if num_requests is None else _as_count(num_requests, "num_requests")
    prompt_lens = trace.prompt_len
    output_lens = trace.output_len
    if max_prompt_len is not None:
        if _as_count(max_prompt_len, "max_prompt_len") < 1:
            raise InfersimError(f"max_prompt_len must be >= 1, got {max_prompt_len}")
        prompt_lens = np.minimum(prompt_lens, max_prompt_len)  # [num_trace]
    if max_output_len is not None:
        if _as_count(max_output_len, "max_output_len") < 1:
            raise InfersimError(f"max_output_len must be >= 1, got {max_output_len}")
        output_lens = np.minimum(output_lens, max_output_len)  # [num_trace]
    arrival: ArrivalProcess
    if request_rate is None:
        check_burstiness(burstiness, shapes_gaps=False)  # no rate: nothing for it to shape
        arrival = TraceArrivals(trace.arrival_s)
    else:
        arrival = arrivals_from_rate(request_rate, burstiness)
    return make_workload(
        num,
        arrival,
        TraceLengths(prompt_lens),
        TraceLengths(output_lens),
        seed=seed,
        vocab_size=vocab_size,
        id_prefix=id_prefix,
    )
