"""Tests for sim.workload.specs, sim.workload.distributions and sim.workload.azure_trace."""

from __future__ import annotations

import itertools
import math
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.core.errors import ConfigError, InfersimError
from sim.workload.specs import (
    AllAtOnce,
    AzureTrace,
    ConstantArrivals,
    FixedLength,
    GammaArrivals,
    LognormalLength,
    PoissonArrivals,
    RequestSpec,
    TraceArrivals,
    TraceLengths,
    UniformLength,
    arrivals_from_rate,
    load_azure_trace,
    make_workload,
    workload_from_trace,
)

TRACES_DIR = Path(__file__).resolve().parents[1] / ".." / "shared" / "traces"
CONV_TRACE = TRACES_DIR / "azure_llm_2023_conv.csv"
needs_trace = pytest.mark.skipif(
    not CONV_TRACE.exists(),
    reason=f"Azure trace not found at {CONV_TRACE} (../shared/traces/ from the project root)",
)


# ---------------------------------------------------------------- RequestSpec


def test_request_spec_coerces_numpy_scalars() -> None:
    spec = RequestSpec("r", np.float64(1.5), np.int64(3), np.int32(2))
    assert (spec.arrival_s, spec.prompt_len, spec.output_len) == (1.5, 3, 2)
    assert type(spec.prompt_len) is int and type(spec.arrival_s) is float


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"arrival_s": -1.0}, "arrival_s"),
        ({"arrival_s": math.nan}, "arrival_s"),
        ({"arrival_s": math.inf}, "arrival_s"),
        ({"prompt_len": 0}, "prompt_len"),
        ({"output_len": 0}, "output_len"),
        ({"output_len": 2.5}, "output_len"),
        ({"prompt_len": True}, "prompt_len"),
        ({"prompt_token_ids": (1, 2)}, "prompt_token_ids"),
    ],
)
def test_request_spec_rejects_bad_input(kwargs: dict, match: str) -> None:
    args = {"request_id": "r", "arrival_s": 0.0, "prompt_len": 3, "output_len": 1} | kwargs
    with pytest.raises(InfersimError, match=match):
        RequestSpec(**args)


# ---------------------------------------------------------------- arrivals


@pytest.mark.parametrize("rate", [0, -1.0, math.nan, math.inf, "3"])
def test_bad_rates_raise(rate: float) -> None:
    for cls in (PoissonArrivals, ConstantArrivals):
        with pytest.raises(InfersimError, match="rate_per_s"):
            cls(rate)
    with pytest.raises(InfersimError, match="rate_per_s"):
        GammaArrivals(rate, cv=2.0)


@pytest.mark.parametrize("cv", [0, -1.0, math.nan, math.inf])
def test_bad_cv_raises(cv: float) -> None:
    with pytest.raises(InfersimError, match="cv"):
        GammaArrivals(1.0, cv)


@pytest.mark.parametrize(
    "process",
    [PoissonArrivals(5.0), GammaArrivals(5.0, 3.0), GammaArrivals(5.0, 0.5), ConstantArrivals(5.0)],
)
def test_arrivals_start_at_zero_and_ascend(process) -> None:
    times = process.times_s(1000, np.random.default_rng(0))
    assert times.shape == (1000,)
    assert times[0] == 0.0
    assert np.all(np.diff(times) >= 0)


def test_poisson_mean_rate() -> None:
    rate = 7.0
    times = PoissonArrivals(rate).times_s(20_000, np.random.default_rng(1))
    gaps = np.diff(times)
    # mean gap 1/7 s; the standard error over 20k gaps is 0.7%, so 3% is > 4 sigma.
    assert abs(gaps.mean() * rate - 1.0) < 0.03
    assert abs(gaps.std() / gaps.mean() - 1.0) < 0.05  # exponential: cv = 1


@pytest.mark.parametrize("cv", [0.5, 2.0, 4.0])
def test_gamma_rate_and_cv(cv: float) -> None:
    rate = 3.0
    gaps = np.diff(GammaArrivals(rate, cv).times_s(20_000, np.random.default_rng(2)))
    assert abs(gaps.mean() * rate - 1.0) < 4 * cv / math.sqrt(20_000) + 0.01
    assert abs(gaps.std() / gaps.mean() / cv - 1.0) < 0.15


def test_constant_and_all_at_once() -> None:
    rng = np.random.default_rng(0)
    np.testing.assert_allclose(ConstantArrivals(4.0).times_s(5, rng), [0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_array_equal(AllAtOnce().times_s(3, rng), [0.0, 0.0, 0.0])


def test_trace_arrivals_replay_and_validate() -> None:
    trace = TraceArrivals(np.array([0.0, 0.5, 0.5, 2.0]))
    np.testing.assert_array_equal(trace.times_s(3, np.random.default_rng(0)), [0.0, 0.5, 0.5])
    with pytest.raises(InfersimError, match="only 4"):
        trace.times_s(5, np.random.default_rng(0))
    with pytest.raises(InfersimError, match="non-decreasing"):
        TraceArrivals(np.array([0.0, 2.0, 1.0]))
    with pytest.raises(InfersimError, match="finite"):
        TraceArrivals(np.array([0.0, math.nan]))


def test_arrivals_from_rate_follows_vllm_semantics() -> None:
    assert isinstance(arrivals_from_rate(math.inf), AllAtOnce)
    assert arrivals_from_rate(2.0) == PoissonArrivals(2.0)
    bursty = arrivals_from_rate(2.0, burstiness=0.25)  # gamma shape 0.25 -> cv 2
    assert isinstance(bursty, GammaArrivals) and bursty.cv == pytest.approx(2.0)
    with pytest.raises(InfersimError, match="burstiness"):
        arrivals_from_rate(2.0, burstiness=0.0)
    with pytest.raises(InfersimError, match="rate"):
        arrivals_from_rate(-1.0)


# ---------------------------------------------------------------- lengths


def test_length_distributions() -> None:
    rng = np.random.default_rng(3)
    np.testing.assert_array_equal(FixedLength(7).sample(3, rng), [7, 7, 7])
    uniform = UniformLength(2, 4).sample(2000, rng)
    assert set(uniform.tolist()) == {2, 3, 4}  # both ends inclusive
    lognormal = LognormalLength(100, 0.5).sample(20_000, rng)
    assert abs(np.median(lognormal) / 100 - 1) < 0.03
    clipped = LognormalLength(100, 3.0, max_len=150).sample(2000, rng)
    assert clipped.min() >= 1 and clipped.max() == 150
    trace = TraceLengths(np.array([5, 6, 7]))
    np.testing.assert_array_equal(trace.sample(5, rng), [5, 6, 7, 5, 6])
    np.testing.assert_array_equal(trace.sample(2, rng, start=2), [7, 5])


@pytest.mark.parametrize(
    "make",
    [
        lambda: FixedLength(0),
        lambda: UniformLength(5, 4),
        lambda: UniformLength(0, 4),
        lambda: LognormalLength(0.5, 1.0),
        lambda: LognormalLength(10, -1.0),
        lambda: TraceLengths(np.array([3, 0])),
        lambda: TraceLengths(np.array([1.5])),
        lambda: TraceLengths(np.array([], dtype=np.int64)),
    ],
)
def test_bad_lengths_raise(make) -> None:
    with pytest.raises(InfersimError):
        make()


# ---------------------------------------------------------------- make_workload


def _workload(**kwargs) -> list[RequestSpec]:
    args = {
        "num_requests": 300,
        "arrival": GammaArrivals(10.0, 2.0),
        "input_len": LognormalLength(50, 1.0, max_len=400),
        "output_len": UniformLength(1, 30),
        "seed": 5,
        "vocab_size": 97,
    } | kwargs
    return list(make_workload(**args))


def test_workload_same_seed_same_specs_and_seed_matters() -> None:
    first = _workload()
    assert first == _workload()
    assert first != _workload(seed=6)
    assert [s.request_id for s in first[:2]] == ["req-0", "req-1"]
    for spec in first:
        assert spec.prompt_token_ids is not None and len(spec.prompt_token_ids) == spec.prompt_len
        assert min(spec.prompt_token_ids) >= 0 and max(spec.prompt_token_ids) < 97
    assert all(a.arrival_s <= b.arrival_s for a, b in itertools.pairwise(first))


@settings(max_examples=20, deadline=None)
@given(chunk_size=st.integers(1, 400), seed=st.integers(0, 2**32))
def test_chunked_generation_equals_all_at_once(chunk_size: int, seed: int) -> None:
    assert _workload(seed=seed, chunk_size=chunk_size) == _workload(seed=seed, chunk_size=300)


def test_streams_are_independent() -> None:
    base = _workload()
    other = _workload(output_len=FixedLength(9))
    assert [s.arrival_s for s in base] == [s.arrival_s for s in other]
    assert [s.prompt_token_ids for s in base] == [s.prompt_token_ids for s in other]
    assert [s.output_len for s in other] == [9] * 300


def test_workload_is_lazy_and_validates_eagerly() -> None:
    huge = make_workload(10**12, PoissonArrivals(1.0), 8, 8)
    assert len(list(itertools.islice(huge, 3))) == 3
    with pytest.raises(InfersimError, match="num_requests"):
        make_workload(-1, PoissonArrivals(1.0), 8, 8)
    with pytest.raises(InfersimError, match="input_len"):
        make_workload(3, PoissonArrivals(1.0), "long", 8)
    with pytest.raises(InfersimError, match="exceeds"):
        make_workload(3, TraceArrivals(np.array([0.0, 1.0])), 8, 8)
    specs = list(make_workload(4, math.inf, 8, 8))
    assert [s.arrival_s for s in specs] == [0.0] * 4 and specs[0].prompt_token_ids is None


# ---------------------------------------------------------------- Azure trace


@needs_trace
def test_load_conv_trace_matches_readme() -> None:
    trace = load_azure_trace(CONV_TRACE)
    assert len(trace) == 19_366
    assert np.median(trace.prompt_len) == 1020
    assert np.median(trace.output_len) == 129
    assert trace.arrival_s[0] == 0.0 and np.all(np.diff(trace.arrival_s) >= 0)
    assert 57 * 60 < trace.span_s < 59 * 60
    # sub-second precision: second row is 18:15:50.9951690 - 18:15:46.6805900
    assert trace.arrival_s[1] == pytest.approx(4.314579, abs=1e-9)
    limited = load_azure_trace(CONV_TRACE, limit=100)
    assert len(limited) == 100
    np.testing.assert_array_equal(limited.prompt_len, trace.prompt_len[:100])


@needs_trace
def test_load_conv_trace_is_fast() -> None:
    best_s = math.inf
    for _ in range(3):
        start = time.perf_counter()
        load_azure_trace(CONV_TRACE)
        best_s = min(best_s, time.perf_counter() - start)
    assert best_s < 0.5


HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"
GOOD = "2023-11-16 18:15:46.6805900,374,44\n"


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ("TIMESTAMP,ContextTokens\n2023-11-16 18:15:46.6805900,374\n", "GeneratedTokens"),
        (HEADER + GOOD + "2023-11-16 18:15:47.0,12x,44\n", "line 3.*ContextTokens"),
        (HEADER + GOOD + GOOD + "2023-11-16 18:15:47.0,12,4.5\n", "line 4.*GeneratedTokens"),
        (HEADER + GOOD + "2023-11-16 18:15:47.0,0,4\n", "line 3.*>= 1"),
        (HEADER + GOOD + "2023-11-16 18:15:40.0,12,4\n", "line 3.*earlier"),
        (HEADER + GOOD + "2023-11-16 25:15:40.0,12,4\n", "line 3.*TIMESTAMP"),
        (HEADER + GOOD + "not-a-time,12,4\n", "line 3.*TIMESTAMP"),
        (HEADER + GOOD + ",12,4\n", "line 3.*TIMESTAMP"),
        (HEADER + GOOD + "2023-11-16 18:15:47.0,12\n", "line 3.*fields"),
        (HEADER, "no request rows"),
        ("", "empty"),
    ],
)
def test_malformed_trace_raises_config_error(tmp_path: Path, body: str, match: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(body)
    with pytest.raises(ConfigError, match=match) as info:
        load_azure_trace(path)
    assert "bad.csv" in str(info.value)


def test_missing_trace_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_azure_trace(tmp_path / "nope.csv")


def _small_trace() -> AzureTrace:
    return AzureTrace(
        arrival_s=np.array([0.0, 1.0, 1.5]),
        prompt_len=np.array([10, 2000, 30]),
        output_len=np.array([5, 6, 700]),
    )


def test_workload_from_trace_uses_trace_times_and_lengths() -> None:
    specs = list(workload_from_trace(_small_trace(), max_prompt_len=1000, max_output_len=512))
    assert [s.arrival_s for s in specs] == [0.0, 1.0, 1.5]
    assert [s.prompt_len for s in specs] == [10, 1000, 30]
    assert [s.output_len for s in specs] == [5, 6, 512]
    with pytest.raises(InfersimError, match="exceeds"):
        workload_from_trace(_small_trace(), num_requests=4)


def test_workload_from_trace_with_rate_cycles_lengths() -> None:
    specs = list(workload_from_trace(_small_trace(), num_requests=5, request_rate=2.0, seed=1))
    assert [s.prompt_len for s in specs] == [10, 2000, 30, 10, 2000]
    arrivals = [s.arrival_s for s in specs]
    assert arrivals[0] == 0.0 and arrivals[1:3] != [1.0, 1.5]  # Poisson, not the trace's times
    assert all(b > a for a, b in itertools.pairwise(arrivals))


@needs_trace
def test_workload_from_real_trace() -> None:
    trace = load_azure_trace(CONV_TRACE, limit=500)
    specs = list(workload_from_trace(trace))
    assert len(specs) == 500
    assert [s.prompt_len for s in specs] == trace.prompt_len.tolist()
    assert specs[-1].arrival_s == trace.arrival_s[-1]
