"""The summary of a run's serving metrics: latency statistics, throughput, goodput, and its
rendering as vLLM benchmark_serving's result JSON and as a text table.

Times are seconds inside (`*_s`); milliseconds appear only in the rendered reports, with
vLLM's key names (`mean_ttft_ms`, `p99_itl_ms`, ...), so existing vLLM result tooling can read
a simulated run. NaN (no data, e.g. no request had two output tokens) becomes JSON null.

References:
    vLLM `benchmarks/benchmark_serving.py`: result keys `completed`, `total_input_tokens`,
    `total_output_tokens`, `duration`, `request_throughput`, `request_goodput`,
    `output_throughput`, `total_token_throughput`, and `{mean,median,std,p<N>}_{metric}_ms` for
    metric in ttft, tpot, itl, e2el; its printed "Serving Benchmark Result" layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sim.metrics.quantiles import StreamingQuantiles

PERCENTILES = (50, 90, 99)
_MAX_REASONS_SHOWN = 5  # the table lists the most common reject reasons; the JSON lists all
_METRICS = (
    ("ttft", "Time to First Token"),
    ("tpot", "Time per Output Token (excl. 1st token)"),
    ("itl", "Inter-token Latency"),
    ("e2el", "End-to-end Latency"),
    ("queueing", "Queueing Delay"),
)


@dataclass(frozen=True)
class LatencyStats:
    """Statistics of one latency metric in seconds; NaN when `count` is 0."""

    count: int
    mean_s: float
    median_s: float
    p90_s: float
    p99_s: float
    std_s: float

    @classmethod
    def of(cls, values_s: np.ndarray) -> LatencyStats:
        """Exact statistics: `np.percentile` (linear interpolation) and `np.std` (ddof = 0)."""
        values_s = np.asarray(values_s, dtype=np.float64).reshape(-1)  # [num]
        if values_s.size == 0:
            return cls(0, math.nan, math.nan, math.nan, math.nan, math.nan)
        p50, p90, p99 = np.percentile(values_s, PERCENTILES)
        return cls(
            int(values_s.size),
            float(values_s.mean()),
            float(p50),
            float(p90),
            float(p99),
            float(values_s.std()),
        )

    @classmethod
    def of_stream(cls, stream: StreamingQuantiles) -> LatencyStats:
        """From a streaming structure (quantiles exact or within its relative error)."""
        p50, p90, p99 = (stream.percentile(p) for p in PERCENTILES)
        return cls(stream.count, stream.mean, p50, p90, p99, stream.std)


def _json_number(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


@dataclass(frozen=True)
class Summary:
    """Everything `MetricsCollector.summary` reports. Throughputs are per simulated second."""

    num_completed: int
    num_rejected: int
    rejected_by_reason: dict[str, int]
    num_aborted: int
    total_input_tokens: int
    total_output_tokens: int
    total_cached_prompt_tokens: int
    duration_s: float
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    ttft: LatencyStats
    tpot: LatencyStats
    itl: LatencyStats
    e2el: LatencyStats
    queueing: LatencyStats
    itl_exact: bool = True
    slo_ttft_s: float | None = None
    slo_tpot_s: float | None = None
    request_goodput: float | None = None
    goodput_fraction: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def stats(self, metric: str) -> LatencyStats:
        """`metric` is one of ttft, tpot, itl, e2el, queueing."""
        stats: LatencyStats = getattr(self, metric)
        return stats

    def to_benchmark_json(self) -> dict[str, Any]:
        """A dict with vLLM benchmark_serving's result keys (milliseconds), plus
        `num_rejected`, `rejected_by_reason`, `num_aborted` and queueing-delay statistics."""
        result: dict[str, Any] = {
            "duration": self.duration_s,
            "completed": self.num_completed,
            "failed": self.num_rejected + self.num_aborted,
            "num_rejected": self.num_rejected,
            "rejected_by_reason": dict(self.rejected_by_reason),
            "num_aborted": self.num_aborted,
            "total_input_tokens": self.total_input_tokens,
            "total_output_tokens": self.total_output_tokens,
            "request_throughput": _json_number(self.request_throughput),
            "output_throughput": _json_number(self.output_throughput),
            "total_token_throughput": _json_number(self.total_token_throughput),
        }
        if self.request_goodput is not None:
            result["request_goodput"] = _json_number(self.request_goodput)
            result["goodput_fraction"] = _json_number(self.goodput_fraction)
        for metric, _ in _METRICS:
            stats = self.stats(metric)
            result[f"mean_{metric}_ms"] = _json_number(stats.mean_s * 1e3)
            result[f"median_{metric}_ms"] = _json_number(stats.median_s * 1e3)
            result[f"std_{metric}_ms"] = _json_number(stats.std_s * 1e3)
            result[f"p90_{metric}_ms"] = _json_number(stats.p90_s * 1e3)
            result[f"p99_{metric}_ms"] = _json_number(stats.p99_s * 1e3)
        result.update(self.extra)
        return result

    def format_table(self) -> str:
        """A text table in the layout of vLLM's "Serving Benchmark Result"."""
        width = 50

        def row(label: str, value: object) -> str:
            if isinstance(value, float):
                value = "n/a" if math.isnan(value) else f"{value:.2f}"
            return f"{label:<40} {value!s:<10}"

        def rule(title: str) -> str:
            return f"{title:-^{width}}"

        lines = [
            f"{' Serving Benchmark Result (simulated) ':=^{width}}",
            row("Successful requests:", self.num_completed),
            row("Rejected requests:", self.num_rejected),
        ]
        reasons = sorted(self.rejected_by_reason.items(), key=lambda item: -item[1])
        for reason, num in reasons[:_MAX_REASONS_SHOWN]:
            lines.append(row(f"  rejected ({reason}):", num))
        if len(reasons) > _MAX_REASONS_SHOWN:
            others = sum(num for _, num in reasons[_MAX_REASONS_SHOWN:])
            lines.append(row(f"  rejected ({len(reasons) - _MAX_REASONS_SHOWN} other reasons):",
                             others))
        if self.num_aborted:
            lines.append(row("Aborted requests:", self.num_aborted))
        lines += [
            row("Benchmark duration (s):", self.duration_s),
            row("Total input tokens:", self.total_input_tokens),
            row("Cached prompt tokens:", self.total_cached_prompt_tokens),
            row("Total generated tokens:", self.total_output_tokens),
            row("Request throughput (req/s):", self.request_throughput),
        ]
        if self.request_goodput is not None:
            lines.append(row("Request goodput (req/s):", self.request_goodput))
            lines.append(row("Requests meeting SLOs (%):", 100.0 * (self.goodput_fraction or 0)))
        lines += [
            row("Output token throughput (tok/s):", self.output_throughput),
            row("Total token throughput (tok/s):", self.total_token_throughput),
        ]
        for metric, title in _METRICS:
            stats = self.stats(metric)
            name = {"e2el": "E2EL", "queueing": "queueing"}.get(metric, metric.upper())
            note = "" if metric != "itl" or self.itl_exact else " (sketch)"
            lines.append(rule(title + note))
            lines.append(row(f"Mean {name} (ms):", stats.mean_s * 1e3))
            lines.append(row(f"Median {name} (ms):", stats.median_s * 1e3))
            lines.append(row(f"P90 {name} (ms):", stats.p90_s * 1e3))
            lines.append(row(f"P99 {name} (ms):", stats.p99_s * 1e3))
        if self.extra:  # baseline accounting: return latency, padding, KV fragmentation
            lines.append(rule("Baseline accounting"))
            lines += [row(f"{key}:", value) for key, value in self.extra.items()]
        lines.append("=" * width)
        return "\n".join(line.rstrip() for line in lines)


# --- baseline accounting: the keys `Summary.extra` carries for request-level batching and
# contiguous KV (result JSON and the table's "Baseline accounting" block) ---


def return_latency_keys(return_latencies_s: np.ndarray) -> dict[str, float | None]:
    """`{mean,median,p99}_return_latency_ms`: arrival to the whole result returned, for a server
    that does not stream (a static batch returns every member at the batch end); empty when no
    request was returned apart from its tokens."""
    values_s = np.asarray(return_latencies_s, dtype=np.float64).reshape(-1)  # [num_returned]
    if values_s.size == 0:
        return {}
    stats = LatencyStats.of(values_s)
    return {"mean_return_latency_ms": _json_number(stats.mean_s * 1e3),
            "median_return_latency_ms": _json_number(stats.median_s * 1e3),
            "p99_return_latency_ms": _json_number(stats.p99_s * 1e3)}


def padding_keys(num_padded_token_steps: int, num_useful_token_steps: int) -> dict[str, Any]:
    """Padding waste of a padded (request-level) batch: the token-steps priced against those
    that computed a real token, and the wasted share."""
    waste = (1.0 - num_useful_token_steps / num_padded_token_steps
             if num_padded_token_steps else 0.0)
    return {"padded_token_steps": num_padded_token_steps,
            "useful_token_steps": num_useful_token_steps,
            "padding_waste_fraction": waste}


def fragmentation_keys(breakdown_tokens: dict[str, int]) -> dict[str, Any]:
    """The KV pool breakdown (used / reserved-unused / internal / external / free tokens) as
    `kv_<part>` keys, plus the share of held memory that stores real tokens."""
    keys: dict[str, Any] = {f"kv_{part}": num for part, num in breakdown_tokens.items()}
    held = sum(breakdown_tokens.get(part, 0) for part in
               ("used_tokens", "reserved_unused_tokens", "internal_frag_tokens"))
    keys["kv_real_token_fraction"] = breakdown_tokens.get("used_tokens", 0) / held if held else 1.0
    return keys
