"""`--burstiness` reaches every workload kind, bad values are one-line errors, and burstiness 1
is exactly the Poisson process (vLLM `benchmark_serving.py` gamma-arrival convention)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import pytest

from sim.cli.main import build_parser, main
from sim.cli.simulate import arrival_from_flags, build_workload
from sim.core.errors import InfersimError
from sim.workload.distributions import (
    AllAtOnce,
    GammaArrivals,
    PoissonArrivals,
    arrivals_from_rate,
    check_burstiness,
)
from sim.workload.shared_prefix import shared_prefix_workload
from sim.workload.specs import load_azure_trace, make_workload, workload_from_trace

NUM_ARRIVALS = 4000
RATE_PER_S = 10.0
# The sample cv of 4000 gamma gaps has a relative standard error of <= 2.4% for shapes in
# [0.25, 4] (measured over 400 seeds); 10% is > 4 standard errors, and still far from the
# Poisson cv of 1 that an ignored --burstiness would give (cv 2 and 0.5 here).
CV_REL_TOL = 0.10
# The mean gap of 4000 gamma gaps has a relative standard error of cv / sqrt(4000) <= 3.2%.
MEAN_REL_TOL = 0.13


def _write_trace(path: Path, num_rows: int) -> Path:
    """A small Azure-format trace: one request every 0.5 s, varied lengths."""
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    for i in range(num_rows):
        lines.append(f"2023-11-16 18:{i // 120:02d}:{(i % 120) / 2:09.6f},{20 + i % 7},{3 + i % 5}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture()
def trace_csv(tmp_path: Path) -> Path:
    return _write_trace(tmp_path / "trace.csv", 50)


def _flags(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["simulate", "--mode", "timing", *argv])


def _arrivals_s(ns: argparse.Namespace) -> np.ndarray:
    """The arrival times `infersim simulate` would feed the engine for these flags."""
    workload, total = build_workload(ns, arrival_from_flags(ns), vocab_size=32000)
    times_s = np.array([spec.arrival_s for spec in workload])  # [total]
    assert times_s.shape == (total,)
    return times_s


def _kind_flags(kind: str, trace_csv: Path) -> list[str]:
    if kind == "synthetic":
        return ["--input-len", "8", "--output-len", "4"]
    if kind == "shared-prefix":
        return ["--input-len", "4", "--output-len", "4", "--shared-prefix-len", "4"]
    return ["--dataset-path", str(trace_csv)]  # re-timed by --request-rate


KINDS = ("synthetic", "shared-prefix", "trace")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("burstiness", [0.25, 1.0, 4.0])
def test_cli_passes_burstiness_to_every_workload_kind(
    kind: str, burstiness: float, trace_csv: Path
) -> None:
    ns = _flags(*_kind_flags(kind, trace_csv), "--num-prompts", str(NUM_ARRIVALS),
                "--request-rate", str(RATE_PER_S), "--burstiness", str(burstiness))
    times_s = _arrivals_s(ns)
    gaps_s = np.diff(times_s)  # [NUM_ARRIVALS - 1]
    assert times_s[0] == 0.0 and np.all(gaps_s >= 0)
    cv = gaps_s.std() / gaps_s.mean()
    assert cv == pytest.approx(1 / math.sqrt(burstiness), rel=CV_REL_TOL)
    assert gaps_s.mean() == pytest.approx(1 / RATE_PER_S, rel=MEAN_REL_TOL)


@pytest.mark.parametrize("kind", KINDS)
def test_default_burstiness_is_the_poisson_process_exactly(kind: str, trace_csv: Path) -> None:
    base = [*_kind_flags(kind, trace_csv), "--num-prompts", "500", "--request-rate", "3"]
    default = _arrivals_s(_flags(*base))
    np.testing.assert_array_equal(default, _arrivals_s(_flags(*base, "--burstiness", "1")))
    # The same arrival stream as a plain Poisson process on make_workload's arrival generator.
    poisson = [s.arrival_s for s in make_workload(500, PoissonArrivals(3.0), 8, 4, seed=0)]
    np.testing.assert_array_equal(default, poisson)


def test_burstiness_one_is_poisson_and_gamma_follows_vllm() -> None:
    assert arrivals_from_rate(2.0, 1.0) == PoissonArrivals(2.0)
    # Gamma with shape 1 draws exactly the exponential stream (NumPy's gamma(1) is its
    # standard exponential), so nothing hinges on the special case above.
    gamma_1 = GammaArrivals(2.0, cv=1.0).times_s(1000, np.random.default_rng(7))
    poisson = PoissonArrivals(2.0).times_s(1000, np.random.default_rng(7))
    np.testing.assert_array_equal(gamma_1, poisson)
    # vLLM: gap = Gamma(shape=burstiness, scale=1 / (rate * burstiness)).
    rate, burstiness = 5.0, 0.3
    bursty = arrivals_from_rate(rate, burstiness)
    assert isinstance(bursty, GammaArrivals) and bursty.shape == burstiness
    expected_gaps_s = np.random.default_rng(8).gamma(burstiness, 1 / (rate * burstiness), 1000)
    np.testing.assert_array_equal(bursty.gaps_s(1000, np.random.default_rng(8)), expected_gaps_s)
    assert isinstance(arrivals_from_rate(math.inf), AllAtOnce)


BAD_BURSTINESS = ["0", "-1", "nan", "inf", "-inf"]
BAD_RATE = ["0", "-1", "nan", "-inf"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("flag,value", [("--burstiness", v) for v in BAD_BURSTINESS]
                         + [("--request-rate", v) for v in BAD_RATE])
def test_bad_arrival_flags_are_one_line_errors_with_exit_2(
    kind: str, flag: str, value: str, trace_csv: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = {"--burstiness": "0.5", "--request-rate": "4"}
    good[flag] = value
    argv = ["simulate", "--mode", "timing", "--no-progress", "--num-prompts", "5",
            *_kind_flags(kind, trace_csv), f"--request-rate={good['--request-rate']}",
            f"--burstiness={good['--burstiness']}"]  # "=": argparse reads "-inf" as a flag
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("infersim: error: ")
    assert flag in captured.err and "Traceback" not in captured.err


@pytest.mark.parametrize("argv", [
    ["--burstiness", "0.5"],  # no --request-rate: all at once, nothing to shape
    ["--burstiness", "0.5", "--request-rate", "inf"],
    ["--burstiness", "0.5", "--dataset-path", "TRACE"],  # the trace's own timestamps
])
def test_burstiness_without_a_rate_is_an_error_not_ignored(
    argv: list[str], trace_csv: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [str(trace_csv) if a == "TRACE" else a for a in argv]
    code = main(["simulate", "--mode", "timing", "--no-progress", "--num-prompts", "5", *argv])
    err = capsys.readouterr().err
    assert code == 2 and "has no effect" in err and "--request-rate" in err
    assert err.count("\n") == 1


def test_library_entry_points_share_the_rule(trace_csv: Path) -> None:
    trace = load_azure_trace(trace_csv)
    with pytest.raises(InfersimError, match="has no effect"):
        workload_from_trace(trace, burstiness=0.5)
    with pytest.raises(InfersimError, match="finite number > 0"):
        workload_from_trace(trace, request_rate=2.0, burstiness=math.nan)
    with pytest.raises(InfersimError, match="finite number > 0"):
        shared_prefix_workload(10, 2.0, 4, 4, 4, burstiness=0.0)  # at the call, not mid-run
    with pytest.raises(InfersimError, match="already an arrival process"):
        make_workload(10, PoissonArrivals(2.0), 4, 4, burstiness=0.5)
    with pytest.raises(InfersimError, match="request rate"):
        make_workload(10, math.nan, 4, 4)
    with pytest.raises(InfersimError, match="finite number > 0"):
        check_burstiness(True)  # type: ignore[arg-type]
    assert check_burstiness(2) == 2.0
    # The library's own burstiness reaches the shared-prefix arrivals.
    bursty = shared_prefix_workload(NUM_ARRIVALS, RATE_PER_S, 4, 4, 4, burstiness=0.25)
    gaps_s = np.diff([spec.arrival_s for spec in bursty])
    assert gaps_s.std() / gaps_s.mean() == pytest.approx(2.0, rel=CV_REL_TOL)
