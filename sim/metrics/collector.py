"""Serving metrics: per-request latencies observed at the end of each request, and their summary.

The engine hands `MetricsCollector.record` one `RequestTimes` per finished (or rejected, or
aborted) request. Derived per request, as vLLM's benchmark_serving defines them:

    TTFT  = first_token_s - arrival_s            (time to first token)
    E2E   = finished_s - arrival_s               (end-to-end latency, vLLM's "e2el")
    queue = first_scheduled_s - arrival_s        (queueing delay)
    TPOT  = (finished_s - first_token_s) / (num_output_tokens - 1)
            (undefined for a single output token: such requests are left out of TPOT stats and
            count as meeting any TPOT SLO, as in vLLM)
    ITLs  = diffs of token_times_s               (one per output token after the first; tokens
            committed by the same step, e.g. accepted speculative tokens, are 0 s apart)

Memory is bounded for streaming runs: per-request scalars go to growable float64 arrays (a
million requests ~ 60 MB), and ITLs to `sim.metrics.quantiles.StreamingQuantiles`, exact up to 10^6 ITLs
and after that a log-bucketed sketch with relative error <= 0.5% (mean/std always exact).
Percentiles of the other metrics are exact (`np.percentile`, linear interpolation; std ddof=0).
Metrics only observe: nothing in the engine reads them back.

References:
    vLLM `benchmarks/benchmark_serving.py` (metric definitions, goodput, result JSON keys).
    Zhong et al., "DistServe", OSDI 2024 (goodput: requests/s meeting TTFT and TPOT SLOs).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from sim.core.errors import InfersimError
from sim.metrics.quantiles import StreamingQuantiles
from sim.metrics.summary import LatencyStats, Summary, return_latency_keys

__all__ = ["FINISH_REASONS", "LatencyStats", "MetricsCollector", "RequestTimes", "Summary"]

FINISH_REASONS = ("length", "stop", "rejected", "aborted")

# Columns of the per-request table, in order.
_ARRIVAL, _SCHEDULED, _FIRST, _FINISHED, _PROMPT, _OUTPUT, _CACHED = range(7)
_NUM_COLUMNS = 7


@dataclass(slots=True)
class RequestTimes:
    """What the engine reports for one request (seconds of simulated time).

    A rejected request has NaN times, no tokens, and says why in `reject_reason`.
    """

    request_id: str
    arrival_s: float
    first_scheduled_s: float
    first_token_s: float
    finished_s: float
    token_times_s: list[float] = field(default_factory=list)
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_prompt_tokens: int = 0
    finish_reason: str = "length"
    reject_reason: str | None = None
    #: when the whole result was returned, if the server did not stream it (NaN: streamed)
    returned_s: float = math.nan

    @classmethod
    def rejected(
        cls, request_id: str, arrival_s: float, num_prompt_tokens: int, reason: str
    ) -> RequestTimes:
        """A request the engine refused (e.g. the prompt does not fit in the KV cache)."""
        nan = math.nan
        return cls(request_id, arrival_s, nan, nan, nan, [], num_prompt_tokens, 0, 0,
                   "rejected", reason)

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.arrival_s

    @property
    def e2e_s(self) -> float:
        return self.finished_s - self.arrival_s

    @property
    def queueing_s(self) -> float:
        return self.first_scheduled_s - self.arrival_s

    @property
    def tpot_s(self) -> float:
        """Mean time per output token after the first; NaN for a single output token."""
        if self.num_output_tokens < 2:
            return math.nan
        return (self.finished_s - self.first_token_s) / (self.num_output_tokens - 1)

    def itls_s(self) -> np.ndarray:
        return np.diff(np.asarray(self.token_times_s, dtype=np.float64))  # [num_output - 1]

    def check(self) -> None:
        """Raise `InfersimError` if the times are inconsistent (an engine bug)."""
        rid = self.request_id
        if self.finish_reason not in FINISH_REASONS:
            raise InfersimError(
                f"request {rid!r}: finish_reason {self.finish_reason!r} is not one of "
                f"{', '.join(FINISH_REASONS)}"
            )
        if self.finish_reason in ("rejected", "aborted"):
            return
        times = (self.arrival_s, self.first_scheduled_s, self.first_token_s, self.finished_s)
        if not all(math.isfinite(t) for t in times):
            raise InfersimError(f"request {rid!r}: a completed request needs finite times")
        if not times[0] <= times[1] <= times[2] <= times[3]:
            raise InfersimError(
                f"request {rid!r}: need arrival <= first_scheduled <= first_token <= finished, "
                f"got {times}"
            )
        if self.num_output_tokens < 1 or len(self.token_times_s) != self.num_output_tokens:
            raise InfersimError(
                f"request {rid!r}: num_output_tokens ({self.num_output_tokens}) must be >= 1 "
                f"and equal len(token_times_s) ({len(self.token_times_s)})"
            )
        if self.token_times_s[0] != self.first_token_s or self.token_times_s[-1] > self.finished_s:
            raise InfersimError(
                f"request {rid!r}: token_times_s must start at first_token_s and end by "
                "finished_s"
            )
        if not 0 <= self.num_cached_prompt_tokens <= self.num_prompt_tokens:
            raise InfersimError(
                f"request {rid!r}: num_cached_prompt_tokens must be in [0, num_prompt_tokens]"
            )


class MetricsCollector:
    """Streams `RequestTimes` into bounded-memory storage and summarises them."""

    def __init__(self, itl_exact_limit: int = 1_000_000, itl_relative_error: float = 0.005):
        self._table = np.empty((1024, _NUM_COLUMNS), dtype=np.float64)  # [capacity, columns]
        self._num_completed = 0
        self._itl = StreamingQuantiles(itl_exact_limit, itl_relative_error)
        self.rejected_by_reason: Counter[str] = Counter()
        self.num_aborted = 0
        self._first_arrival_s = math.inf
        self._return_latencies_s: list[float] = []  # non-streamed requests only

    def __len__(self) -> int:
        """Requests recorded: completed, rejected and aborted."""
        return self._num_completed + sum(self.rejected_by_reason.values()) + self.num_aborted

    def record(self, times: RequestTimes) -> None:
        times.check()
        if math.isfinite(times.arrival_s):
            self._first_arrival_s = min(self._first_arrival_s, times.arrival_s)
        if times.finish_reason == "rejected":
            # reasons read "<kind>: <details>"; count by kind
            kind = (times.reject_reason or "unspecified").split(":", 1)[0]
            self.rejected_by_reason[kind] += 1
            return
        if times.finish_reason == "aborted":
            self.num_aborted += 1
            return
        itls_s = times.itls_s()  # [num_output - 1]
        if itls_s.size and itls_s.min() < 0:
            raise InfersimError(
                f"request {times.request_id!r}: token_times_s must be non-decreasing"
            )
        if self._num_completed == self._table.shape[0]:
            grown = np.empty((2 * self._table.shape[0], _NUM_COLUMNS))  # [capacity, columns]
            grown[: self._num_completed] = self._table
            self._table = grown
        self._table[self._num_completed] = (
            times.arrival_s,
            times.first_scheduled_s,
            times.first_token_s,
            times.finished_s,
            times.num_prompt_tokens,
            times.num_output_tokens,
            times.num_cached_prompt_tokens,
        )
        self._num_completed += 1
        self._itl.add(itls_s)
        if not math.isnan(times.returned_s):
            self._return_latencies_s.append(times.returned_s - times.arrival_s)

    def per_request(self) -> dict[str, np.ndarray]:
        """Per completed request, in record order: ttft_s, tpot_s (NaN for 1 token), e2e_s,
        queueing_s, and the token counts (copies; for plots)."""
        table = self._table[: self._num_completed]  # [num_completed, columns]
        num_output = table[:, _OUTPUT]  # [num_completed]
        with np.errstate(divide="ignore", invalid="ignore"):
            tpot_s = np.where(
                num_output > 1,
                (table[:, _FINISHED] - table[:, _FIRST]) / (num_output - 1),
                np.nan,
            )  # [num_completed]
        return {
            "arrival_s": table[:, _ARRIVAL].copy(),
            "ttft_s": table[:, _FIRST] - table[:, _ARRIVAL],
            "tpot_s": tpot_s,
            "e2e_s": table[:, _FINISHED] - table[:, _ARRIVAL],
            "queueing_s": table[:, _SCHEDULED] - table[:, _ARRIVAL],
            "num_prompt_tokens": table[:, _PROMPT].astype(np.int64),
            "num_output_tokens": num_output.astype(np.int64),
            "num_cached_prompt_tokens": table[:, _CACHED].astype(np.int64),
        }

    def summary(
        self,
        duration_s: float | None = None,
        slo_ttft_s: float | None = None,
        slo_tpot_s: float | None = None,
    ) -> Summary:
        """Aggregate everything recorded so far.

        `duration_s` defaults to the last finish minus the first arrival. Goodput counts
        completed requests with TTFT <= slo_ttft_s and TPOT <= slo_tpot_s (each only if given);
        `goodput_fraction` divides by all recorded requests, rejected and aborted included.
        """
        for name, slo in (("slo_ttft_s", slo_ttft_s), ("slo_tpot_s", slo_tpot_s)):
            if slo is not None and not (slo >= 0):
                raise InfersimError(f"{name} must be >= 0 seconds, got {slo!r}")
        columns = self.per_request()
        if duration_s is None:
            last_s = float(self._table[: self._num_completed, _FINISHED].max(initial=-math.inf))
            duration_s = last_s - self._first_arrival_s if self._num_completed else 0.0
        elif not (math.isfinite(duration_s) and duration_s >= 0):
            raise InfersimError(f"duration_s must be finite and >= 0, got {duration_s!r}")
        dur_s = float(duration_s)
        total_input = int(columns["num_prompt_tokens"].sum())
        total_output = int(columns["num_output_tokens"].sum())

        def per_s(amount: float) -> float:
            return amount / dur_s if dur_s > 0 else math.nan

        goodput = fraction = None
        if slo_ttft_s is not None or slo_tpot_s is not None:
            good = np.ones(self._num_completed, dtype=bool)  # [num_completed]
            if slo_ttft_s is not None:
                good &= columns["ttft_s"] <= slo_ttft_s
            if slo_tpot_s is not None:
                good &= np.nan_to_num(columns["tpot_s"], nan=0.0) <= slo_tpot_s
            num_good = int(good.sum())
            goodput = per_s(num_good)
            fraction = num_good / len(self) if len(self) else math.nan
        tpot_s = columns["tpot_s"]  # [num_completed]
        return Summary(
            num_completed=self._num_completed,
            num_rejected=sum(self.rejected_by_reason.values()),
            rejected_by_reason=dict(sorted(self.rejected_by_reason.items())),
            num_aborted=self.num_aborted,
            total_input_tokens=total_input,
            total_output_tokens=total_output,
            total_cached_prompt_tokens=int(columns["num_cached_prompt_tokens"].sum()),
            duration_s=dur_s,
            request_throughput=per_s(self._num_completed),
            output_throughput=per_s(total_output),
            total_token_throughput=per_s(total_input + total_output),
            ttft=LatencyStats.of(columns["ttft_s"]),
            tpot=LatencyStats.of(tpot_s[np.isfinite(tpot_s)]),
            itl=LatencyStats.of_stream(self._itl),
            e2el=LatencyStats.of(columns["e2e_s"]),
            queueing=LatencyStats.of(columns["queueing_s"]),
            itl_exact=self._itl.is_exact,
            slo_ttft_s=slo_ttft_s,
            slo_tpot_s=slo_tpot_s,
            request_goodput=goodput,
            goodput_fraction=fraction,
            extra=return_latency_keys(np.asarray(self._return_latencies_s)),
        )
