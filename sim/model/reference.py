"""The reference generator: greedy decoding with no KV cache, one request at a time.

Every step re-runs the full causal forward pass over the whole sequence so far and appends the
argmax of the last row (ties go to the lowest token id, as `np.argmax` does). Nothing is
cached, batched or reordered, so this is the oracle every engine optimisation (batching, KV
layouts, prefix caching, speculation, sharding) must reproduce token for token in float64.
`beam_search` is the same for beam search: every beam of every round recomputed from scratch,
the oracle for the engine's forked, copy-on-write beams (`cache.beam_search`).

References: Jay Mody, "GPT in 60 Lines of NumPy" (picoGPT), whose generate loop this mirrors.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from sim.core.errors import ConfigError
from sim.model.beam_search import BeamSequence, best_beams, next_beams
from sim.model.numpy_model import NumpyModel
from sim.model.sampling import token_logprobs


def generate(model: NumpyModel, prompt_ids: Sequence[int] | np.ndarray, max_new_tokens: int,
             eos_token_ids: Iterable[int] = ()) -> list[int]:
    """Greedy continuation of `prompt_ids`: the new tokens only, at most `max_new_tokens`,
    ending with (and including) the first token in `eos_token_ids`, if one is produced."""
    if max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    ids = [int(t) for t in prompt_ids]
    if not ids:
        raise ConfigError("generate needs a non-empty prompt (add a BOS token)")
    stop = {int(t) for t in eos_token_ids}
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits = model.forward(np.asarray(ids + new))  # [n, n_vocab]
        token = int(np.argmax(logits[-1]))
        new.append(token)
        if token in stop:
            break
    return new


def beam_search(model: NumpyModel, prompt_ids: Sequence[int], beam_width: int, max_tokens: int,
                eos_token_ids: Iterable[int] = (), length_penalty: float = 1.0,
                max_model_len: int | None = None) -> list[BeamSequence]:
    """The best `beam_width` beams of `prompt_ids` (`sim.model.beam_search`'s rule), best first;
    `max_tokens` rounds, fewer if a beam would pass `max_model_len` tokens."""
    live = [BeamSequence([int(t) for t in prompt_ids], 0.0, len(prompt_ids))]
    eos = frozenset(int(t) for t in eos_token_ids)
    rounds = max_tokens if max_model_len is None else min(
        max_tokens, max(max_model_len - len(prompt_ids), 1))  # the engine's stop rule
    finished: list[BeamSequence] = []
    for _ in range(rounds):
        proposals = []
        for beam in live:
            logits = model.forward(np.asarray(beam.tokens))[-1]  # [n_vocab]
            _, entries = token_logprobs(logits, int(np.argmax(logits)), 2 * beam_width)
            proposals.append({t: lp.logprob for t, lp in entries.items()})
        picks, done = next_beams(live, proposals, beam_width, eos)
        finished.extend(done)
        live = [beam for _, beam in picks]
    for beam in live:
        beam.finish_reason = "length"
    return best_beams(finished + live, beam_width, length_penalty)
