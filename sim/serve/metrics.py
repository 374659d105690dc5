"""`/metrics`: the served engine's counters in Prometheus text format, under vLLM's names.

The names, kinds and histogram buckets are vLLM v1's (`vllm/v1/metrics/loggers.py`,
`PrometheusStatLogger`), so a Grafana dashboard or an autoscaler written for vLLM reads a
simulated deployment unchanged. Every latency is in *simulated* seconds: what the simulator
predicts the named model on the named GPU would show, whatever `--time-scale` paces the
release at. Each series carries the label `model_name` (the served model's name), as vLLM's do.

Histograms are cumulative (`_bucket{le=...}`, `_sum`, `_count`), counters end in `_total`, as
the exposition format (version 0.0.4) writes them; no client library is needed to produce it.

References: vLLM `vllm/v1/metrics/loggers.py` (names, buckets); Prometheus "Exposition
formats" (text format 0.0.4).
"""

from __future__ import annotations

import bisect
import math
import threading
from collections import Counter
from dataclasses import dataclass, field

from sim.core.request import Request, Status

#: vLLM v1's buckets (seconds)
TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                  5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS_S = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS_S = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
                             40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)

#: metric name -> (help, buckets) of the histograms, in exposition order
HISTOGRAMS: dict[str, tuple[str, tuple[float, ...]]] = {
    "vllm:time_to_first_token_seconds": ("Histogram of time to first token in seconds.",
                                         TTFT_BUCKETS_S),
    "vllm:inter_token_latency_seconds": ("Histogram of inter-token latency in seconds.",
                                         ITL_BUCKETS_S),
    "vllm:e2e_request_latency_seconds": ("Histogram of e2e request latency in seconds.",
                                         REQUEST_LATENCY_BUCKETS_S),
    "vllm:request_queue_time_seconds": ("Histogram of time spent in WAITING phase for request.",
                                        REQUEST_LATENCY_BUCKETS_S),
    "vllm:request_prefill_time_seconds": ("Histogram of time spent in PREFILL phase for "
                                          "request.", REQUEST_LATENCY_BUCKETS_S),
    "vllm:request_decode_time_seconds": ("Histogram of time spent in DECODE phase for request.",
                                         REQUEST_LATENCY_BUCKETS_S),
}


@dataclass
class Histogram:
    """A cumulative Prometheus histogram over fixed upper bounds (+Inf implied)."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)  # [len(bounds) + 1], not cumulative
    total: float = 0.0
    num: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        if not math.isfinite(value):
            return
        # `le` is inclusive: a value equal to a bound falls in that bound's bucket
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.num += 1

    def lines(self, name: str, labels: str) -> list[str]:
        out, running = [], 0
        for bound, count in zip((*self.bounds, math.inf), self.counts, strict=True):
            running += count
            le = "+Inf" if bound == math.inf else repr(float(bound))
            out.append(f'{name}_bucket{{{labels},le="{le}"}} {running}')
        out.append(f"{name}_sum{{{labels}}} {self.total!r}")
        out.append(f"{name}_count{{{labels}}} {self.num}")
        return out


class ServeMetrics:
    """The server's counters and histograms; observed from the engine's thread, rendered from
    the HTTP side (one lock)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.histograms = {name: Histogram(buckets) for name, (_, buckets) in HISTOGRAMS.items()}
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0
        self.finished: Counter[str] = Counter()  # finish reason -> requests
        self.num_rejected = 0

    def observe_tokens(self, req: Request, num_released: int) -> None:
        """`req`'s tokens past the first `num_released` reach its client: its TTFT (with the
        first) and the inter-token gaps, in simulated seconds."""
        times_s = req.token_times_s
        with self._lock:
            if num_released == 0 and times_s:
                self.histograms["vllm:time_to_first_token_seconds"].observe(
                    req.first_token_s - req.arrival_s)
                self.num_prompt_tokens += req.num_prompt_tokens
            itl = self.histograms["vllm:inter_token_latency_seconds"]
            for i in range(max(num_released, 1), len(times_s)):
                itl.observe(times_s[i] - times_s[i - 1])
            self.num_generation_tokens += len(times_s) - num_released

    def observe_finished(self, req: Request) -> None:
        """`req` ended (the engine loop's `on_finish`): its request-level latencies."""
        with self._lock:
            if req.status is Status.REJECTED:
                self.num_rejected += 1
                return
            reason = req.finish_reason if req.finish_reason in ("length", "stop") else "abort"
            self.finished[reason] += 1
            h = self.histograms
            h["vllm:e2e_request_latency_seconds"].observe(req.finished_s - req.arrival_s)
            h["vllm:request_queue_time_seconds"].observe(req.first_scheduled_s - req.arrival_s)
            h["vllm:request_prefill_time_seconds"].observe(req.first_token_s
                                                           - req.first_scheduled_s)
            last_s = req.token_times_s[-1] if req.token_times_s else req.first_token_s
            h["vllm:request_decode_time_seconds"].observe(last_s - req.first_token_s)

    def render(self, model_name: str, num_running: int, num_waiting: int, kv_usage: float,
               num_preemptions: int, simulated_now_s: float) -> str:
        """The exposition text (format 0.0.4), with the engine's gauges as given."""
        labels = f'model_name="{_escape(model_name)}"'

        def scalar(name: str, kind: str, help_text: str, value: float | int) -> list[str]:
            base = name.removesuffix("_total") if kind == "counter" else name
            return [f"# HELP {base} {help_text}", f"# TYPE {base} {kind}",
                    f"{name}{{{labels}}} {value!r}"]

        with self._lock:
            lines = [
                *scalar("vllm:num_requests_running", "gauge",
                        "Number of requests in model execution batches.", num_running),
                *scalar("vllm:num_requests_waiting", "gauge",
                        "Number of requests waiting to be processed.", num_waiting),
                *scalar("vllm:kv_cache_usage_perc", "gauge",
                        "KV-cache usage. 1 means 100 percent usage.", float(kv_usage)),
                *scalar("vllm:num_preemptions_total", "counter",
                        "Cumulative number of preemption from the engine.", num_preemptions),
                *scalar("vllm:prompt_tokens_total", "counter",
                        "Number of prefill tokens processed.", self.num_prompt_tokens),
                *scalar("vllm:generation_tokens_total", "counter",
                        "Number of generation tokens processed.", self.num_generation_tokens),
                "# HELP vllm:request_success Count of successfully processed requests.",
                "# TYPE vllm:request_success counter",
            ]
            for reason in ("stop", "length", "abort"):
                lines.append(f'vllm:request_success_total{{{labels},finished_reason="{reason}"}} '
                             f"{self.finished[reason]}")
            lines += scalar("infersim:num_requests_rejected_total", "counter",
                            "Requests the engine refused at arrival (with a reason).",
                            self.num_rejected)
            lines += scalar("infersim:simulated_time_seconds", "gauge",
                            "The engine's simulated clock.", float(simulated_now_s))
            for name, (help_text, _) in HISTOGRAMS.items():
                lines += [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
                lines += self.histograms[name].lines(name, labels)
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    """A label value as the text format wants it (backslash, quote and newline escaped)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
