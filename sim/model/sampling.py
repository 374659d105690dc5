"""Token sampling: logits processors, greedy, temperature, min-p, top-k, top-p, each request on
its own random stream.

`process_logits` applies a request's logits processors in vLLM v1's order (allowed token ids,
bad words, logit bias, then the repetition, frequency and presence penalties); it reads only
the request's own tokens, so it is batch-invariant. `sampling_probs` is the exact distribution
`sample_token` draws from, so tests (and speculative verification) can hold the sampler to it:
temperature, then min-p, then top-k, then top-p (nucleus, Holtzman et al. 2020), renormalising
after each, as vLLM v1 does. A draw consumes exactly one `rng.random()`, so a request's outputs
never depend on what else shares its batch.

References: Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration" (top-p);
Nguyen et al. 2024, "Turning Up the Heat: Min-p Sampling" (min-p); Keskar et al. 2019, CTRL
(repetition penalty); OpenAI API docs (presence / frequency penalties, logit bias);
vLLM `vllm/v1/sample/sampler.py` (order, raw logprobs), `vllm/model_executor/layers/utils.py`
(`apply_penalties`), `vllm/v1/sample/ops/bad_words.py` and `SamplingParams.update_from_tokenizer`
(bad words).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from sim.core.errors import ConfigError
from sim.core.request import Logprob, SamplingParams


class Encoder(Protocol):
    """What bad words need of a tokenizer (`sim.model.tokenizer.Tokenizer` has it)."""

    def encode(self, text: str, add_bos: bool = True) -> list[int]: ...


def bad_words_token_ids(words: Sequence[str], tokenizer: Encoder) -> tuple[tuple[int, ...], ...]:
    """`SamplingParams.bad_words` as the token sequences the sampler bans (vLLM's rule): each
    word as written (left-stripped), and also with a leading space when that tokenizes to a
    different first token of the same length, so the word is banned at the start of the text
    and inside it."""
    out: list[tuple[int, ...]] = []
    for word in words:
        bare = tuple(tokenizer.encode(word.lstrip(), add_bos=False))
        if not bare:
            raise ConfigError(f"SamplingParams.bad_words: {word!r} tokenizes to nothing; drop it")
        out.append(bare)
        spaced = tuple(tokenizer.encode(" " + word.lstrip(), add_bos=False))
        if spaced and spaced[0] != bare[0] and len(spaced) == len(bare):
            out.append(spaced)
    return tuple(out)


def process_logits(logits: np.ndarray, params: SamplingParams, prompt_ids: Sequence[int],
                   output_ids: Sequence[int],
                   bad_words: Sequence[Sequence[int]] = ()) -> np.ndarray:
    """The logits the sampler sees (float64, a copy): vLLM v1's processors in its order.

    1. tokens outside `allowed_token_ids` -> -inf;
    2. each bad word whose prefix ends the output: its last token -> -inf (a one-token word
       always);
    3. `logit_bias` added;
    4. `repetition_penalty` r on tokens in the prompt or the output: x / r if x > 0 else x * r;
       then minus `frequency_penalty` * (count in the output) and minus `presence_penalty` *
       (1 if in the output), vLLM's `apply_penalties`.

    Every token id must be below the vocabulary size (`len(logits)`); one that is not is a
    `ConfigError` naming the field.
    """
    x = np.array(logits, dtype=np.float64)  # [n_vocab], a copy: the raw row stays for logprobs
    n_vocab = x.size
    if params.allowed_token_ids is not None:
        allowed = _ids_in_vocab("allowed_token_ids", params.allowed_token_ids, n_vocab)
        mask = np.ones(n_vocab, dtype=bool)  # [n_vocab], True = banned
        mask[allowed] = False
        x[mask] = -np.inf
    for word in bad_words:
        prefix = len(word) - 1
        if prefix > len(output_ids):
            continue
        if prefix == 0 or list(output_ids[-prefix:]) == list(word[:prefix]):
            x[_ids_in_vocab("bad_words", (word[-1],), n_vocab)] = -np.inf
    if params.logit_bias:
        ids = _ids_in_vocab("logit_bias", tuple(params.logit_bias), n_vocab)
        x[ids] += np.fromiter(params.logit_bias.values(), dtype=np.float64)
    if params.penalizes:
        out = np.asarray(output_ids, dtype=np.int64)  # [n_out]
        counts = np.bincount(out[out >= 0], minlength=n_vocab)[:n_vocab]  # [n_vocab]
        if params.repetition_penalty != 1:
            seen = counts > 0  # [n_vocab]
            prompt = np.asarray(prompt_ids, dtype=np.int64)  # [n_prompt]
            seen[prompt[(prompt >= 0) & (prompt < n_vocab)]] = True
            r = params.repetition_penalty
            x = np.where(seen, np.where(x > 0, x / r, x * r), x)  # [n_vocab]
        x -= params.frequency_penalty * counts
        x -= params.presence_penalty * (counts > 0)
    return x


def _ids_in_vocab(name: str, ids: Sequence[int], n_vocab: int) -> np.ndarray:
    """`ids` as an index array, each checked against the vocabulary (vLLM checks at the
    processor, where the vocabulary is known)."""
    arr = np.asarray(ids, dtype=np.int64)  # [n_ids]
    if arr.size and int(arr.max()) >= n_vocab:
        raise ConfigError(f"SamplingParams.{name}: token id {int(arr.max())} is outside the "
                          f"model's vocabulary [0, {n_vocab}); use ids below {n_vocab}")
    return arr


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
    if params.min_p > 0:
        # drop tokens whose probability is below min_p times the largest: p_i / p_max is
        # exp(l_i - l_max), so the kept tokens are a prefix of the sorted order
        keep = np.exp(sorted_logits - sorted_logits[0]) >= params.min_p  # [n_vocab]
        sorted_logits = sorted_logits[: int(keep.sum())]  # [m]
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
