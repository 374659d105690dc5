"""The reference generator: greedy decoding with no KV cache, one request at a time.

Every step re-runs the full causal forward pass over the whole sequence so far and appends the
argmax of the last row (ties go to the lowest token id, as `np.argmax` does). Nothing is
cached, batched or reordered, so this is the oracle every engine optimisation (batching, KV
layouts, prefix caching, speculation, sharding) must reproduce token for token in float64.

References: Jay Mody, "GPT in 60 Lines of NumPy" (picoGPT), whose generate loop this mirrors.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from sim.errors import ConfigError
from sim.numpy_model import NumpyModel


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
