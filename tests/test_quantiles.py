"""The quantile sketch against exact quantiles: `numpy.quantile(method="lower")` on the same
samples, several distributions (light- and heavy-tailed, zero-inflated, bimodal), every half
percentile, within the sketch's stated relative error `a`; and `StreamingQuantiles` switching
from exact to sketched without changing what it promises."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from sim.metrics.quantiles import LogHistogram, StreamingQuantiles

NUM_VALUES = 200_000
Q = np.linspace(0.0, 1.0, 201)  # every half percentile

DISTRIBUTIONS: dict[str, Callable[[np.random.Generator], np.ndarray]] = {
    # seconds, shaped like inter-token latencies and their tails
    "exponential": lambda r: r.exponential(0.02, NUM_VALUES),
    "lognormal (sigma 2)": lambda r: r.lognormal(-4.0, 2.0, NUM_VALUES),
    "pareto (alpha 1.1, heavy tail)": lambda r: 1e-3 * (1.0 + r.pareto(1.1, NUM_VALUES)),
    "half-cauchy (no mean)": lambda r: np.minimum(np.abs(1e-2 * r.standard_cauchy(NUM_VALUES)),
                                                  1e8),
    "zero-inflated (speculative bursts)": lambda r: np.where(r.random(NUM_VALUES) < 0.4, 0.0,
                                                             r.gamma(2.0, 0.01, NUM_VALUES)),
    "bimodal (decode vs prefill-stalled)": lambda r: np.concatenate(
        [r.normal(0.015, 0.001, NUM_VALUES // 2).clip(1e-6), r.normal(0.8, 0.05,
                                                                       NUM_VALUES // 2).clip(1e-6)]),
    "spans 1 ns .. 1e6 s": lambda r: 10.0 ** r.uniform(-9, 6, NUM_VALUES),
}


@pytest.mark.parametrize("relative_error", [0.005, 0.02])
@pytest.mark.parametrize("name", sorted(DISTRIBUTIONS))
def test_sketch_within_its_relative_error_of_numpy(name: str, relative_error: float) -> None:
    values = DISTRIBUTIONS[name](np.random.default_rng(len(name)))  # [NUM_VALUES]
    sketch = LogHistogram(relative_error=relative_error)
    for part in np.array_split(values, 7):  # fed in batches, as the collector does
        sketch.add(part)
    exact = np.quantile(values, Q, method="lower")  # [201]
    estimate = np.array([sketch.quantile(q) for q in Q])  # [201]
    error = np.abs(estimate - exact)  # [201]
    bound = relative_error * exact * (1 + 1e-9)  # [201]
    worst = int(np.argmax(error - bound))
    assert (error <= bound).all(), (f"{name}: q={Q[worst]:.3f} estimate {estimate[worst]!r} vs "
                                    f"exact {exact[worst]!r} (bound {bound[worst]!r})")
    # the bound is not vacuous: the estimate is a bucket midpoint, not the value itself
    positive = exact > 0  # [201]
    assert (error[positive] / exact[positive]).max() > 0.1 * relative_error


@pytest.mark.parametrize("name", sorted(DISTRIBUTIONS))
def test_streaming_quantiles_exact_then_sketched(name: str) -> None:
    values = DISTRIBUTIONS[name](np.random.default_rng(1 + len(name)))  # [NUM_VALUES]
    exact_stream = StreamingQuantiles(exact_limit=NUM_VALUES)
    sketched = StreamingQuantiles(exact_limit=NUM_VALUES // 10)
    for part in np.array_split(values, 50):
        exact_stream.add(part)
        sketched.add(part)
    assert exact_stream.is_exact and not sketched.is_exact
    for p in (0, 1, 25, 50, 75, 90, 95, 99, 99.9, 100):
        assert exact_stream.percentile(p) == pytest.approx(float(np.percentile(values, p)),
                                                           rel=1e-12, abs=0)
        lower = float(np.quantile(values, p / 100, method="lower"))
        assert abs(sketched.percentile(p) - lower) <= 0.005 * lower * (1 + 1e-9)
    for stream in (exact_stream, sketched):  # moments stay exact either way
        assert stream.mean == pytest.approx(values.mean(), rel=1e-9)
        assert stream.std == pytest.approx(values.std(), rel=1e-6)
        assert (stream.min, stream.max) == (values.min(), values.max())
