"""Closed-form analysis of speculative decoding, and an adaptive choice of k.

With each draft token accepted independently with probability `a` (the acceptance rate) and k
draft tokens per step, a step emits `1 + a + ... + a^k = (1 - a^(k+1)) / (1 - a)` tokens on
average (Leviathan et al. 2023, eq. 1). If one draft step costs `c` target decode steps and the
verification pass costs one target decode step (true while decode is memory-bound: scoring k + 1
tokens reads the same weights as scoring one), the wall-time improvement over plain decoding is

    (1 - a^(k+1)) / ((1 - a) (k c + 1))                     (Leviathan et al. 2023, Theorem 3.8)

and it pays only when that exceeds 1: a high acceptance rate and a cheap draft (small c). At
large batch the verification pass becomes compute-bound, its cost grows with k + 1 and the
assumption breaks; `benchmarks/speculative.py` measures where speculation turns into a slowdown.

`cost_ratio` takes c from the cost model (a draft decode step over a target decode step, same
GPU, same batch and context). `AdaptiveK` estimates `a` from the measured acceptance of recent
verification steps (the maximum-likelihood estimate under the i.i.d. model: accepted tokens /
(accepted + rejections), with exponential forgetting) and uses the k that maximises the formula.

References: Leviathan, Kalman, Matias, "Fast Inference from Transformers via Speculative
Decoding" (ICML 2023), section 3.4-3.5; Chen et al. 2023; Liu et al., "Optimizing Speculative
Decoding for Serving Large Language Models Using Goodput" (SmartSpec, 2024) for adapting k to
the measured acceptance and the load.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from sim.core.errors import ConfigError


def expected_tokens_per_step(a: float, k: int) -> float:
    """Mean tokens emitted by one verification step: (1 - a^(k+1)) / (1 - a)."""
    _check(a, k)
    if a >= 1.0:
        return float(k + 1)
    return (1.0 - a ** (k + 1)) / (1.0 - a)


def walltime_improvement(a: float, k: int, c: float) -> float:
    """Speedup over plain decoding: (1 - a^(k+1)) / ((1 - a)(k c + 1))."""
    if not c >= 0:
        raise ConfigError(f"the cost ratio c must be >= 0, got {c}")
    return expected_tokens_per_step(a, k) / (k * c + 1.0)


def optimal_k(a: float, c: float, k_max: int = 16, k_min: int = 0) -> int:
    """The k in `k_min..k_max` with the largest wall-time improvement (0: do not speculate)."""
    if k_max < k_min or k_min < 0:
        raise ConfigError(f"need 0 <= k_min <= k_max, got {k_min}, {k_max}")
    ks = range(k_min, k_max + 1)
    gains = [walltime_improvement(a, k, c) for k in ks]
    return ks[int(np.argmax(gains))]


def cost_ratio(draft_cost: Any, target_cost: Any, batch_size: int = 1,
               context_len: int = 512) -> float:
    """c: one draft decode step over one target decode step, from the cost models (same GPU)."""
    new = (1,) * batch_size
    ctx = (context_len,) * batch_size
    return float(draft_cost.step_time_s(new, ctx) / target_cost.step_time_s(new, ctx))


def acceptance_from_counts(accepted: np.ndarray, proposed: np.ndarray) -> float:
    """Maximum-likelihood i.i.d. acceptance rate of verification steps: a step that accepted
    `a` of `k` proposed tokens saw `a` successes and, when a < k, one failure."""
    acc = np.asarray(accepted, dtype=np.float64)  # [n_step]
    prop = np.asarray(proposed, dtype=np.float64)  # [n_step]
    successes = acc.sum()
    failures = float((acc < prop).sum())
    total = successes + failures
    return float(successes / total) if total else 0.0


class AdaptiveK:
    """k per step from the measured acceptance: `optimal_k(a_hat, c, k_max)`, which may be 0
    (speculation off when it does not pay). While off, every `probe_every`-th decision drafts
    one token so that acceptance keeps being measured and speculation can come back.
    `a_hat` starts at `prior` (weight `prior_weight` observations) and forgets old steps by
    `decay` per observed step. `cost_at(batch_size)` gives c at the current batch (a draft
    decode step over a target decode step of that many sequences); without it c is fixed.

    Follows the closed form of Leviathan et al. 2023 (sec. 3.3, optimal gamma), with c taken at
    the running batch as vLLM's dynamic speculation (Liu et al. 2024, "Optimizing Speculative
    Decoding for Serving LLMs Using Goodput") does.
    """

    def __init__(self, c: float, k_max: int, prior: float = 0.5, prior_weight: float = 4.0,
                 decay: float = 0.98, cost_at: Callable[[int], float] | None = None,
                 probe_every: int = 16) -> None:
        if not 0 < decay <= 1:
            raise ConfigError(f"decay must be in (0, 1], got {decay}")
        if probe_every < 1:
            raise ConfigError(f"probe_every must be >= 1, got {probe_every}")
        self.c = c
        self.k_max = k_max
        self.decay = decay
        self.cost_at = cost_at
        self.probe_every = probe_every
        self.successes = prior * prior_weight
        self.failures = (1 - prior) * prior_weight
        self.num_off = 0  # consecutive decisions with speculation off (k = 0)

    @property
    def acceptance(self) -> float:
        return self.successes / (self.successes + self.failures)

    def observe(self, num_accepted: int, num_proposed: int) -> None:
        self.successes = self.decay * self.successes + num_accepted
        self.failures = self.decay * self.failures + (num_accepted < num_proposed)

    def k(self, batch_size: int = 1) -> int:
        """k for a sequence in a batch of `batch_size` sequences."""
        c = self.c if self.cost_at is None else self.cost_at(max(1, batch_size))
        k = optimal_k(self.acceptance, c, self.k_max, 0)
        if k:
            self.num_off = 0
            return k
        self.num_off += 1
        return 1 if self.num_off % self.probe_every == 0 else 0  # a probe keeps a_hat fresh


def _check(a: float, k: int) -> None:
    if not 0 <= a <= 1:
        raise ConfigError(f"acceptance rate must be in [0, 1], got {a}")
    if k < 0:
        raise ConfigError(f"k must be >= 0, got {k}")
