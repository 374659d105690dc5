"""Tests for sim.metrics.collector, sim.metrics.summary and sim.metrics.quantiles."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.core.errors import InfersimError
from sim.metrics.collector import MetricsCollector, RequestTimes
from sim.metrics.quantiles import LogHistogram, StreamingQuantiles


def _request(
    rid: str, arrival_s: float, scheduled_s: float, token_times_s: list[float], **kw
) -> RequestTimes:
    return RequestTimes(
        rid,
        arrival_s,
        scheduled_s,
        token_times_s[0],
        token_times_s[-1],
        list(token_times_s),
        num_prompt_tokens=kw.pop("num_prompt_tokens", 10),
        num_output_tokens=len(token_times_s),
        **kw,
    )


# ---------------------------------------------------------------- per request


def test_per_request_definitions() -> None:
    times = _request("a", 1.0, 1.5, [2.0, 2.1, 2.4, 2.4, 3.0])
    assert times.ttft_s == pytest.approx(1.0)
    assert times.e2e_s == pytest.approx(2.0)
    assert times.queueing_s == pytest.approx(0.5)
    assert times.tpot_s == pytest.approx(1.0 / 4)
    np.testing.assert_allclose(times.itls_s(), [0.1, 0.3, 0.0, 0.6])
    single = _request("b", 0.0, 0.0, [0.7])
    assert math.isnan(single.tpot_s) and single.itls_s().size == 0


@pytest.mark.parametrize(
    ("times", "match"),
    [
        (_request("a", 1.0, 0.5, [2.0]), "arrival <= first_scheduled"),
        (_request("a", 0.0, 0.5, [2.0], finish_reason="done"), "finish_reason"),
        (_request("a", 0.0, 0.5, [2.0], num_cached_prompt_tokens=11), "cached"),
        (RequestTimes("a", 0.0, 0.1, 0.2, 0.3, [0.2, 0.3], 5, 3), "len\\(token_times_s\\)"),
        (RequestTimes("a", 0.0, 0.1, 0.2, 0.3, [0.25], 5, 1), "start at first_token_s"),
        (RequestTimes("a", 0.0, 0.1, 0.2, 0.3, [0.2, 0.4], 5, 2), "end by finished_s"),
        (RequestTimes("a", 0.0, 0.1, 0.2, 0.3, [0.2, 0.1], 5, 2), "non-decreasing"),
        (RequestTimes("a", 0.0, math.nan, 0.2, 0.3, [0.2], 5, 1), "finite"),
    ],
)
def test_inconsistent_times_raise(times: RequestTimes, match: str) -> None:
    with pytest.raises(InfersimError, match=match):
        MetricsCollector().record(times)


# ---------------------------------------------------------------- summary


def _collector() -> tuple[MetricsCollector, list[RequestTimes]]:
    rng = np.random.default_rng(0)
    collector = MetricsCollector()
    requests = []
    for i in range(50):
        arrival_s = 0.1 * i
        scheduled_s = arrival_s + rng.uniform(0, 0.5)
        num_out = int(rng.integers(1, 20))
        tokens = scheduled_s + 0.2 + np.cumsum(rng.exponential(0.03, num_out))
        requests.append(_request(f"r{i}", arrival_s, scheduled_s, tokens.tolist()))
        collector.record(requests[-1])
    return collector, requests


def test_summary_statistics_match_numpy() -> None:
    collector, requests = _collector()
    summary = collector.summary()
    ttft = np.array([r.ttft_s for r in requests])
    assert summary.ttft.count == 50
    assert summary.ttft.mean_s == pytest.approx(ttft.mean())
    assert summary.ttft.median_s == pytest.approx(np.median(ttft))
    assert summary.ttft.p90_s == pytest.approx(np.percentile(ttft, 90))
    assert summary.ttft.p99_s == pytest.approx(np.percentile(ttft, 99))
    assert summary.ttft.std_s == pytest.approx(ttft.std())
    tpot = np.array([r.tpot_s for r in requests if r.num_output_tokens > 1])
    assert summary.tpot.count == tpot.size < 50  # single-token requests excluded
    assert summary.tpot.p99_s == pytest.approx(np.percentile(tpot, 99))
    itl = np.concatenate([r.itls_s() for r in requests])
    assert summary.itl_exact and summary.itl.count == itl.size
    assert summary.itl.median_s == pytest.approx(np.median(itl))
    assert summary.itl.std_s == pytest.approx(itl.std())
    e2e = np.array([r.e2e_s for r in requests])
    assert summary.e2el.p90_s == pytest.approx(np.percentile(e2e, 90))
    queue = np.array([r.queueing_s for r in requests])
    assert summary.queueing.mean_s == pytest.approx(queue.mean())
    duration_s = max(r.finished_s for r in requests) - 0.0
    assert summary.duration_s == pytest.approx(duration_s)
    out_tokens = sum(r.num_output_tokens for r in requests)
    assert summary.total_output_tokens == out_tokens and summary.total_input_tokens == 500
    assert summary.request_throughput == pytest.approx(50 / duration_s)
    assert summary.output_throughput == pytest.approx(out_tokens / duration_s)
    assert summary.total_token_throughput == pytest.approx((out_tokens + 500) / duration_s)
    assert collector.summary(duration_s=10.0).request_throughput == pytest.approx(5.0)


def test_goodput_and_rejections() -> None:
    collector = MetricsCollector()
    collector.record(_request("fast", 0.0, 0.0, [0.1, 0.12, 0.14]))  # ttft 0.1, tpot 0.02
    collector.record(_request("slow-ttft", 0.0, 0.0, [0.5, 0.51]))  # ttft 0.5
    collector.record(_request("slow-tpot", 0.0, 0.0, [0.1, 0.2]))  # tpot 0.1
    collector.record(_request("one-token", 0.0, 0.0, [0.2]))  # tpot undefined: meets SLO
    collector.record(RequestTimes.rejected("big", 0.0, 10_000, "prompt exceeds KV cache"))
    collector.record(RequestTimes.rejected("big2", 0.0, 20_000, "prompt exceeds KV cache"))
    collector.record(RequestTimes.rejected("odd", 0.0, 10, "other"))
    summary = collector.summary(duration_s=2.0, slo_ttft_s=0.3, slo_tpot_s=0.05)
    assert summary.num_completed == 4 and summary.num_rejected == 3
    assert summary.rejected_by_reason == {"other": 1, "prompt exceeds KV cache": 2}
    assert summary.request_goodput == pytest.approx(2 / 2.0)  # "fast" and "one-token"
    assert summary.goodput_fraction == pytest.approx(2 / 7)  # rejected requests count as misses
    assert summary.total_input_tokens == 40  # rejected prompts are not served tokens
    only_ttft = collector.summary(duration_s=2.0, slo_ttft_s=0.3)
    assert only_ttft.request_goodput == pytest.approx(3 / 2.0)
    assert collector.summary().request_goodput is None
    with pytest.raises(InfersimError, match="slo_ttft_s"):
        collector.summary(slo_ttft_s=-1.0)


def test_empty_collector_summary() -> None:
    summary = MetricsCollector().summary()
    assert summary.num_completed == 0 and math.isnan(summary.ttft.mean_s)
    payload = summary.to_benchmark_json()
    assert payload["mean_ttft_ms"] is None
    json.dumps(payload, allow_nan=False)


def test_storage_grows_past_initial_capacity() -> None:
    collector = MetricsCollector()
    for i in range(3000):
        collector.record(_request(f"r{i}", float(i), float(i), [i + 0.5, i + 0.75]))
    columns = collector.per_request()
    assert columns["ttft_s"].shape == (3000,)
    np.testing.assert_allclose(columns["ttft_s"], 0.5)
    np.testing.assert_allclose(columns["arrival_s"], np.arange(3000.0))


VLLM_KEYS = {
    "duration", "completed", "total_input_tokens", "total_output_tokens", "request_throughput",
    "output_throughput", "total_token_throughput",
} | {
    f"{stat}_{metric}_ms"
    for stat in ("mean", "median", "std", "p90", "p99")
    for metric in ("ttft", "tpot", "itl", "e2el")
}


def test_benchmark_json_keys_and_units() -> None:
    collector, requests = _collector()
    collector.record(RequestTimes.rejected("x", 1.0, 5, "too long"))
    payload = collector.summary(slo_ttft_s=0.5, slo_tpot_s=0.05).to_benchmark_json()
    assert VLLM_KEYS | {"request_goodput", "num_rejected"} <= set(payload)
    assert payload["num_rejected"] == 1 and payload["completed"] == 50
    ttft_ms = 1e3 * np.array([r.ttft_s for r in requests])
    assert payload["median_ttft_ms"] == pytest.approx(np.median(ttft_ms))
    json.dumps(payload, allow_nan=False)
    assert "request_goodput" not in collector.summary().to_benchmark_json()


def test_format_table() -> None:
    collector, requests = _collector()
    table = collector.summary(slo_ttft_s=0.5).format_table()
    assert "Successful requests:" in table and " 50" in table
    assert "Mean TTFT (ms):" in table and "P99 ITL (ms):" in table
    assert "goodput" in table
    median_ms = 1e3 * np.median([r.ttft_s for r in requests])
    assert f"{median_ms:.2f}" in table
    for i in range(8):  # many distinct reasons: the table shows the 5 most common
        for _ in range(i + 1):
            collector.record(RequestTimes.rejected("x", 0.0, 5, f"reason {i}"))
    table = collector.summary().format_table()
    assert "reason 7" in table and "reason 3" in table and "reason 2" not in table
    other_line = next(line for line in table.splitlines() if "3 other reasons" in line)
    assert other_line.split()[-1] == "6"  # 1 + 2 + 3 rejected


# ---------------------------------------------------------------- quantile sketch

positive_values = st.lists(
    st.one_of(st.just(0.0), st.floats(1e-6, 1e4, allow_nan=False, allow_infinity=False)),
    min_size=1,
    max_size=300,
)


@settings(max_examples=200, deadline=None)
@given(values=positive_values, q=st.floats(0.0, 1.0))
def test_log_histogram_relative_error_bound(values: list[float], q: float) -> None:
    sketch = LogHistogram(relative_error=0.005)
    sketch.add(np.array(values))
    exact = float(np.quantile(np.array(values), q, method="lower"))
    estimate = sketch.quantile(q)
    assert abs(estimate - exact) <= 0.005 * exact * (1 + 1e-9)


@settings(max_examples=50, deadline=None)
@given(values=positive_values, limit=st.integers(0, 50), split=st.integers(1, 300))
def test_streaming_quantiles_switch_over(values: list[float], limit: int, split: int) -> None:
    stream = StreamingQuantiles(exact_limit=limit)
    array = np.array(values)
    for start in range(0, array.size, split):  # fed in batches of any size
        stream.add(array[start : start + split])
    assert stream.count == array.size
    assert stream.mean == pytest.approx(array.mean(), rel=1e-9, abs=1e-12)
    assert stream.std == pytest.approx(array.std(), rel=1e-6, abs=1e-9)
    assert (stream.min, stream.max) == (array.min(), array.max())
    assert stream.is_exact == (array.size <= limit)
    for p in (0, 50, 90, 99, 100):
        if stream.is_exact:
            assert stream.percentile(p) == pytest.approx(np.percentile(array, p))
        else:
            exact = float(np.quantile(array, p / 100, method="lower"))
            assert abs(stream.percentile(p) - exact) <= 0.005 * exact * (1 + 1e-9)


def test_sketch_memory_is_bounded() -> None:
    stream = StreamingQuantiles(exact_limit=1000)
    rng = np.random.default_rng(0)
    for _ in range(20):
        stream.add(rng.exponential(0.02, 100_000))
    assert not stream.is_exact and stream.count == 2_000_000
    assert stream._sketch is not None and stream._sketch.nbytes < 64 * 1024
    assert stream._exact.size == 0
    with pytest.raises(InfersimError):
        stream.add(np.array([-1.0]))
    with pytest.raises(InfersimError):
        LogHistogram(relative_error=0.0)
