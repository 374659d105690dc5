"""Token sampling: greedy, temperature, top-k, top-p, each request on its own random stream.

`sampling_probs` is the exact distribution `sample_token` draws from, so tests (and speculative
verification) can hold the sampler to it. Order of filters as in vLLM/HF: temperature, then top-k,
then top-p (nucleus, Holtzman et al. 2020), renormalising after each. A draw consumes exactly one
`rng.random()`, so a request's outputs never depend on what else shares its batch.

References: Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration" (top-p);
vLLM `vllm/v1/sample/sampler.py` (filter order, raw logprobs).
"""

from __future__ import annotations

import numpy as np

from sim.core.request import Logprob, SamplingParams


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities of the last axis, computed in float64."""
    x = np.asarray(logits, dtype=np.float64)  # [..., n_vocab]
    x = x - x.max(axis=-1, keepdims=True)  # [..., n_vocab]
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))  # [..., n_vocab]


def sampling_probs(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The distribution over the vocabulary that `sample_token` samples from (float64).

    Greedy (temperature below `SAMPLING_EPS`, as in vLLM) is a one-hot on the first arg-max:
    dividing by a near-zero temperature would overflow the logits and draw NaN.
    """
    logits = np.asarray(logits, dtype=np.float64)  # [n_vocab]
    probs = np.zeros_like(logits)  # [n_vocab]
    if params.greedy:
        probs[int(np.argmax(logits))] = 1.0
        return probs
    order = np.argsort(-logits, kind="stable")  # [n_vocab], most likely first
    sorted_logits = logits[order] / params.temperature  # [n_vocab]
    if params.top_k > 0:
        sorted_logits = sorted_logits[: params.top_k]  # [k]
    p = np.exp(sorted_logits - sorted_logits[0])  # [k]
    p /= p.sum()
    if params.top_p < 1.0:
        # keep the smallest prefix whose mass reaches top_p (always at least the top token)
        mass_before = np.cumsum(p) - p  # [k]
        p = p[mass_before < params.top_p]  # [k']
        p /= p.sum()
    probs[order[: p.size]] = p
    return probs


def sample_token(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator | None) -> int:
    """One token id drawn from `sampling_probs(logits, params)` with one uniform from `rng`."""
    if params.greedy:
        return int(np.argmax(logits))
    if rng is None:
        raise ValueError("sampling with temperature > 0 needs a random generator")
    probs = sampling_probs(logits, params)  # [n_vocab]
    cdf = np.cumsum(probs)  # [n_vocab]
    u = rng.random() * cdf[-1]
    return int(min(np.searchsorted(cdf, u, side="right"), probs.size - 1))


def token_logprobs(
    logits: np.ndarray, token_id: int, num_top: int
) -> tuple[float, dict[int, Logprob]]:
    """The sampled token's log-probability and vLLM's logprobs dict for it.

    The dict holds the `num_top` most likely tokens plus the sampled one, each with its rank
    (1 = most likely), from the raw (unfiltered, temperature 1) distribution as vLLM reports.
    """
    lp = log_softmax(logits)  # [n_vocab]
    order = np.argsort(-lp, kind="stable")  # [n_vocab]
    ranks = np.empty_like(order)  # [n_vocab]
    ranks[order] = np.arange(1, order.size + 1)
    chosen = {int(t) for t in order[:num_top]} | {int(token_id)}
    entries = {t: Logprob(logprob=float(lp[t]), rank=int(ranks[t])) for t in chosen}
    return float(lp[token_id]), entries
