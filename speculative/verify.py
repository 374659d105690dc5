"""Verification of speculative drafts: which draft tokens the target keeps, as pure functions.

A draft proposes tokens `x_1..x_k`; the target scores them in one pass, giving its sampling
distribution `p_i` at every draft position plus one more, `p_{k+1}`, after the last draft token.

- **Greedy**: keep the longest prefix of drafts equal to the target's arg-max, then emit the
  target's own arg-max at the first mismatch (the *correction*), or after all k drafts (the
  *bonus* token). The result is exactly the target's greedy continuation.
- **Rejection sampling** (Leviathan et al. 2023, Chen et al. 2023): draft token `x_i` drawn from
  the draft's distribution `q_i` is kept with probability `min(1, p_i(x_i) / q_i(x_i))`; at the
  first rejection a token is drawn from the residual `norm(max(p_i - q_i, 0))` and the step ends;
  if all k are kept the bonus token is drawn from `p_{k+1}`. Each emitted token is then
  distributed exactly as `p` (min(p, q) + (1 - sum min(p, q)) * residual = p). A deterministic
  draft (n-gram lookup) is the case `q_i = one-hot(x_i)`: kept with probability `p_i(x_i)`.

`p` is `sim.model.sampling.sampling_probs(logits, params)`, the very distribution the target samples
from, so temperature, top-k and top-p compose exactly. Every random draw comes from the request's
own `np.random.Generator` (one `rng.random()` per accept test and per emitted sample).

References: Leviathan, Kalman, Matias, "Fast Inference from Transformers via Speculative
Decoding" (ICML 2023), Algorithm 1 and Appendix A.1; Chen et al., "Accelerating Large Language
Model Decoding with Speculative Sampling" (2023), Algorithm 2; vLLM
`vllm/v1/sample/rejection_sampler.py` (the bonus token, deterministic drafts as one-hot q).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sim.core.errors import ConfigError
from sim.core.request import SamplingParams
from sim.model.sampling import sampling_probs


@dataclass(frozen=True, slots=True)
class Verified:
    """The outcome of verifying one draft: `token_ids` = accepted drafts + 1 target token."""

    token_ids: tuple[int, ...]
    num_accepted: int

    @property
    def num_emitted(self) -> int:
        return len(self.token_ids)


def greedy_verify(draft_token_ids: Sequence[int], target_logits: np.ndarray) -> Verified:
    """Greedy verification: `target_logits` `[k + 1, n_vocab]` scored after each draft prefix."""
    k = len(draft_token_ids)
    _check_rows(target_logits, k)
    best = np.argmax(target_logits, axis=-1)  # [k + 1]
    n_ok = 0
    while n_ok < k and int(draft_token_ids[n_ok]) == int(best[n_ok]):
        n_ok += 1
    return Verified((*tuple(int(t) for t in draft_token_ids[:n_ok]), int(best[n_ok])), n_ok)


def accept_prob(p: np.ndarray, q: np.ndarray | None, token_id: int) -> float:
    """Probability of keeping draft token `token_id` drawn from `q` (None: a deterministic
    draft, q = one-hot) when the target samples from `p`: min(1, p / q)."""
    q_x = 1.0 if q is None else float(q[token_id])
    if q_x <= 0.0:
        raise ConfigError(f"draft token {token_id} has probability 0 under its own draft "
                          "distribution; a draft must be sampled from the q it reports")
    return min(1.0, float(p[token_id]) / q_x)


def residual_probs(p: np.ndarray, q: np.ndarray | None, token_id: int) -> np.ndarray:
    """The distribution sampled after rejecting `token_id`: norm(max(p - q, 0)) `[n_vocab]`."""
    r = np.array(p, dtype=np.float64)  # [n_vocab]
    if q is None:
        r[token_id] = 0.0
    else:
        r = np.maximum(r - np.asarray(q, dtype=np.float64), 0.0)  # [n_vocab]
    total = r.sum()
    if total <= 0.0:  # only reachable by rounding when p == q: the rejection had probability 0
        return np.asarray(p, dtype=np.float64)  # [n_vocab]
    return r / total  # [n_vocab]


def draw(probs: np.ndarray, rng: np.random.Generator) -> int:
    """One token from `probs` `[n_vocab]` with one uniform (as `sim.model.sampling.sample_token`)."""
    cdf = np.cumsum(probs)  # [n_vocab]
    u = rng.random() * cdf[-1]
    return int(min(np.searchsorted(cdf, u, side="right"), cdf.size - 1))


def rejection_verify(draft_token_ids: Sequence[int], draft_probs: np.ndarray | None,
                     target_probs: np.ndarray, rng: np.random.Generator) -> Verified:
    """Speculative sampling: `target_probs` `[k + 1, n_vocab]`, `draft_probs` `[k, n_vocab]` the
    distributions the drafts were drawn from (None: deterministic drafts)."""
    k = len(draft_token_ids)
    _check_rows(target_probs, k)
    if draft_probs is not None and np.shape(draft_probs)[0] != k:
        raise ConfigError(f"draft_probs has {np.shape(draft_probs)[0]} rows for {k} draft tokens")
    kept: list[int] = []
    for i, x in enumerate(int(t) for t in draft_token_ids):
        q = None if draft_probs is None else draft_probs[i]
        if rng.random() < accept_prob(target_probs[i], q, x):
            kept.append(x)
            continue
        kept.append(draw(residual_probs(target_probs[i], q, x), rng))
        return Verified(tuple(kept), i)
    kept.append(draw(target_probs[k], rng))
    return Verified(tuple(kept), k)


def verify(draft_token_ids: Sequence[int], draft_probs: np.ndarray | None,
           target_logits: np.ndarray, params: SamplingParams,
           rng: np.random.Generator | None) -> Verified:
    """Verify one draft for a request sampled with `params` (greedy or rejection sampling)."""
    if params.greedy:
        return greedy_verify(draft_token_ids, target_logits)
    if rng is None:
        raise ConfigError("rejection sampling needs the request's random generator")
    target_probs = np.stack([sampling_probs(row, params) for row in target_logits])  # [k+1, V]
    return rejection_verify(draft_token_ids, draft_probs, target_probs, rng)


def _check_rows(target: np.ndarray, k: int) -> None:
    if np.ndim(target) != 2 or np.shape(target)[0] != k + 1:
        raise ConfigError(f"the target must score k + 1 = {k + 1} positions (one per draft token "
                          f"and the bonus), got an array of shape {np.shape(target)}")
