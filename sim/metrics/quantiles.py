"""Bounded-memory quantiles of a stream of non-negative values (inter-token latencies).

`LogHistogram` is a log-bucketed histogram in the style of DDSketch / HDR histograms: bucket `i`
holds values in (gamma^(i-1), gamma^i] with gamma = (1 + a) / (1 - a), and a quantile is reported
as the bucket's midpoint-in-relative-terms 2 gamma^i / (gamma + 1). That estimate is within a
relative error `a` (default 0.5%) of the true order statistic at rank floor(q (n - 1)) (NumPy's
`method="lower"`). Values below `min_value` (default 1 ns) count as exact zeros: several tokens
committed by one step (speculative decoding) are 0 s apart. Buckets span [min_value, max_value]
in a fixed NumPy array (about 4,200 int64 counts = 33 KB at the defaults), whatever the count.

`StreamingQuantiles` keeps values exactly until `exact_limit` of them have been seen (then
quantiles equal `np.percentile`'s default linear interpolation, as vLLM reports), and from then on
folds everything into a `LogHistogram`. Count, mean, std, min and max are always exact (mean and
variance are merged per batch with Chan et al.'s parallel update).

Why ours and not a library (decided for issue 17): `ddsketch` (Datadog's Python DDSketch) uses
the same logarithmic mapping and gives the same estimates to 1e-13 on a million lognormal
latencies, but adds values one Python call at a time (0.83 s per million values against 0.09 s
for one `np.bincount` here, measured on this project's machine) and pulls in `six`; t-digest
libraries (`tdigest`, `fastdigest`) bound the *rank* error, not the relative value error that a
p99 TPOT needs in a heavy tail; `hdrhistogram` records integers (a unit scaling to pick) one
value at a time. The sketch is ~60 lines, and `tests/test_quantiles.py` checks it against
`numpy.quantile(method="lower")` on exponential, lognormal, Pareto, half-Cauchy, zero-inflated and
bimodal samples at every half percentile, within the stated relative error.

References:
    Masson, Rim & Lee, "DDSketch: A Fast and Fully-Mergeable Quantile Sketch with Relative-Error
    Guarantees", VLDB 2019. Tene, HdrHistogram (log-bucketed latency histograms).
    Chan, Golub & LeVeque, "Algorithms for computing the sample variance", 1983.
"""

from __future__ import annotations

import math

import numpy as np

from sim.core.errors import InfersimError

_PENDING_SIZE = 65536


class LogHistogram:
    """Relative-error quantile sketch over [0, max_value] (see module docstring)."""

    def __init__(
        self, relative_error: float = 0.005, min_value: float = 1e-9, max_value: float = 1e9
    ) -> None:
        if not 0 < relative_error < 1:
            raise InfersimError(f"relative_error must be in (0, 1), got {relative_error!r}")
        if not 0 < min_value < max_value < math.inf:
            raise InfersimError(
                f"need 0 < min_value < max_value < inf, got {min_value!r}, {max_value!r}"
            )
        self.relative_error = float(relative_error)
        self.min_value = float(min_value)
        self.max_value = float(max_value)
        self._gamma = (1.0 + relative_error) / (1.0 - relative_error)
        self._log_gamma = math.log(self._gamma)
        self._offset = math.ceil(math.log(min_value) / self._log_gamma)
        num_buckets = math.ceil(math.log(max_value) / self._log_gamma) - self._offset + 1
        self._counts = np.zeros(num_buckets, dtype=np.int64)  # [num_buckets]
        self.num_zero = 0
        self.count = 0

    def add(self, values: np.ndarray) -> None:
        """Count every value (seconds, >= 0 and <= max_value)."""
        values = np.asarray(values, dtype=np.float64).reshape(-1)  # [num]
        if values.size == 0:
            return
        if not (values.min() >= 0 and values.max() <= self.max_value):
            raise InfersimError(
                f"LogHistogram takes values in [0, {self.max_value}], got min {values.min()} "
                f"and max {values.max()}"
            )
        small = values < self.min_value  # [num]
        self.num_zero += int(small.sum())
        positive = values[~small]  # [num_positive]
        index = np.ceil(np.log(positive) / self._log_gamma).astype(np.int64)  # [num_positive]
        index = np.clip(index - self._offset, 0, self._counts.size - 1)  # [num_positive]
        self._counts += np.bincount(index, minlength=self._counts.size)
        self.count += int(values.size)

    def quantile(self, q: float) -> float:
        """The estimate of the order statistic at rank floor(q (count - 1)); NaN when empty."""
        if not 0 <= q <= 1:
            raise InfersimError(f"quantile q must be in [0, 1], got {q!r}")
        if self.count == 0:
            return math.nan
        rank = math.floor(q * (self.count - 1))
        if rank < self.num_zero:
            return 0.0
        cumulative = np.cumsum(self._counts)  # [num_buckets]
        bucket = int(np.searchsorted(cumulative, rank - self.num_zero, side="right"))
        upper = self._gamma ** (bucket + self._offset)
        return 2.0 * upper / (self._gamma + 1.0)

    @property
    def nbytes(self) -> int:
        return int(self._counts.nbytes)


class StreamingQuantiles:
    """Quantiles of values >= 0 in seconds: exact up to `exact_limit` values, then a
    `LogHistogram`; count, mean, std, min and max always exact."""

    def __init__(self, exact_limit: int = 1_000_000, relative_error: float = 0.005) -> None:
        if exact_limit < 0:
            raise InfersimError(f"exact_limit must be >= 0, got {exact_limit}")
        self.exact_limit = int(exact_limit)
        self.relative_error = float(relative_error)
        self._exact = np.empty(min(self.exact_limit, 1024), dtype=np.float64)  # [capacity]
        self._num_exact = 0
        self._sketch: LogHistogram | None = None
        self._count = 0
        self._mean = 0.0
        self._m2 = 0.0  # sum of squared deviations from the mean
        self._min = math.inf
        self._max = -math.inf
        # Small batches (one request's ITLs) are staged here and folded in 64k at a time.
        self._pending = np.empty(_PENDING_SIZE, dtype=np.float64)  # [pending capacity]
        self._num_pending = 0

    @property
    def count(self) -> int:
        return self._count + self._num_pending

    @property
    def is_exact(self) -> bool:
        """True while quantiles are exact (at most `exact_limit` values seen)."""
        self._flush()
        return self._sketch is None

    def add(self, values: np.ndarray) -> None:
        """Count finite values (staged; folded in when the stage fills or on any query)."""
        values = np.asarray(values, dtype=np.float64).reshape(-1)  # [num]
        num = int(values.size)
        if num and not (values.min() >= 0 and values.max() < math.inf):
            raise InfersimError(
                f"StreamingQuantiles takes finite values >= 0, got min {values.min()} and max "
                f"{values.max()}"
            )
        if self._num_pending + num > _PENDING_SIZE:
            self._flush()
        if num > _PENDING_SIZE:
            self._fold(values)
            return
        self._pending[self._num_pending : self._num_pending + num] = values
        self._num_pending += num

    def _flush(self) -> None:
        if self._num_pending:
            self._fold(self._pending[: self._num_pending])
            self._num_pending = 0

    def _fold(self, values: np.ndarray) -> None:
        num = int(values.size)
        if num == 0:
            return
        batch_mean = float(values.mean())
        batch_m2 = float(((values - batch_mean) ** 2).sum())
        total = self._count + num
        delta = batch_mean - self._mean
        self._mean += delta * num / total
        self._m2 += batch_m2 + delta * delta * self._count * num / total
        self._count = total
        self._min = min(self._min, float(values.min()))
        self._max = max(self._max, float(values.max()))
        if self._sketch is None and self._num_exact + num <= self.exact_limit:
            needed = self._num_exact + num
            if needed > self._exact.size:
                grown = np.empty(min(max(needed, 2 * self._exact.size), self.exact_limit))  # [cap]
                grown[: self._num_exact] = self._exact[: self._num_exact]
                self._exact = grown  # [capacity]
            self._exact[self._num_exact : needed] = values
            self._num_exact = needed
            return
        if self._sketch is None:
            self._sketch = LogHistogram(self.relative_error)
            self._sketch.add(self._exact[: self._num_exact])
            self._exact = np.empty(0)  # [0]: release the exact values
            self._num_exact = 0
        self._sketch.add(values)

    @property
    def mean(self) -> float:
        self._flush()
        return self._mean if self._count else math.nan

    @property
    def min(self) -> float:
        self._flush()
        return self._min if self._count else math.nan

    @property
    def max(self) -> float:
        self._flush()
        return self._max if self._count else math.nan

    @property
    def std(self) -> float:
        """Population standard deviation (ddof = 0, like `np.std`)."""
        self._flush()
        return math.sqrt(max(self._m2, 0.0) / self._count) if self._count else math.nan

    def percentile(self, p: float) -> float:
        """The p-th percentile (0..100): exact linear interpolation, or the sketch estimate."""
        self._flush()
        if self._count == 0:
            return math.nan
        if self._sketch is not None:
            return self._sketch.quantile(p / 100.0)
        return float(np.percentile(self._exact[: self._num_exact], p))
