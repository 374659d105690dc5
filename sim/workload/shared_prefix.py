"""A synthetic workload whose prompts share a system prompt: what prefix caching is for.

Each request's prompt is one of `num_system_prompts` fixed system prompts (`system_len` tokens)
followed by its own user text (a length drawn as in `make_workload`). Token ids are seeded and
carried in the specs, so the prefix cache can hash them in timing-only runs too. Chat services
look like this: a long, fixed instruction block in front of every conversation turn.

References: Zheng et al., "SGLang: Efficient Execution of Structured Language Model Programs"
(2024) (shared prefixes in real LLM programs); vLLM's `benchmarks/benchmark_prefix_caching.py`.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from sim.core.errors import InfersimError
from sim.workload.distributions import LengthDistribution
from sim.workload.specs import (
    MAX_CHUNK_PROMPT_TOKENS,
    ArrivalProcess,
    RequestSpec,
    Workload,
    make_workload,
)


def shared_prefix_workload(
    num_requests: int,
    arrival: ArrivalProcess | float,
    system_len: int,
    user_len: LengthDistribution | int,
    output_len: LengthDistribution | int,
    vocab_size: int = 32000,
    num_system_prompts: int = 1,
    seed: int = 0,
    burstiness: float = 1.0,
) -> Workload:
    """Request specs, in arrival order, whose prompts are `system prompt + user text`.

    `arrival` and `burstiness` mean what they mean to `make_workload` (a rate in requests/s
    with gamma gaps of shape `burstiness`, or an arrival process). Every argument is checked
    here, before the first spec is drawn, so a bad one fails at the call and not mid-run.
    """
    for name, value in (("system_len", system_len), ("num_system_prompts", num_system_prompts)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise InfersimError(f"{name} must be an integer, got {value!r}")
    if system_len < 0 or num_system_prompts < 1:
        raise InfersimError(f"need system_len >= 0 and num_system_prompts >= 1, got "
                            f"{system_len} and {num_system_prompts}")
    num_system_tokens = int(system_len) * int(num_system_prompts)
    if num_system_tokens > MAX_CHUNK_PROMPT_TOKENS:
        raise InfersimError(
            f"{num_system_prompts} system prompt(s) of system_len={system_len:,} tokens are "
            f"{num_system_tokens:,} token ids, more than the {MAX_CHUNK_PROMPT_TOKENS:,} this "
            "simulator draws at once; lower the shared prefix length (no model's context is "
            "that long)")
    specs = make_workload(num_requests, arrival, user_len, output_len, seed=seed,
                          vocab_size=vocab_size, id_prefix="prefix", burstiness=burstiness)
    # re-iterable like every workload: each pass re-draws the same system prompts and picks
    return Workload(
        lambda: _with_system_prompts(iter(specs), system_len, vocab_size, num_system_prompts,
                                     seed),
        len(specs),
    )


def _with_system_prompts(
    specs: Iterator[RequestSpec], system_len: int, vocab_size: int, num_system_prompts: int,
    seed: int,
) -> Iterator[RequestSpec]:
    sys_rng, pick_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    systems = sys_rng.integers(0, vocab_size, size=(num_system_prompts, system_len))  # [n_sys, len]
    for spec in specs:
        system = systems[int(pick_rng.integers(num_system_prompts))]  # [system_len]
        user = spec.prompt_token_ids or ()
        ids = tuple(int(t) for t in system) + tuple(user)
        yield RequestSpec(spec.request_id, spec.arrival_s, len(ids), spec.output_len, ids)
