"""Data parallelism: replicas of the model behind a router that picks one per request.

A router sees each request once, when it arrives, with the number of requests each replica has
outstanding (routed and not yet finished) at that instant, and returns a replica index:

- `round_robin`: replicas in turn, whatever their load;
- `least_outstanding`: the replica with the fewest outstanding requests (lowest index on ties),
  as vLLM's DP coordinator and most HTTP load balancers do;
- `prefix_affinity`: a hash of the prompt's first `prefix_tokens` token ids picks the replica,
  so requests sharing a prefix (system prompt, few-shot examples, a conversation's history)
  meet the same replica's prefix cache; when that replica is overloaded (more than
  `slack` + 2x the least-loaded one) the request goes to the least-loaded replica instead (the
  balance threshold of SGLang's cache-aware router). Without token ids (timing-only traces)
  it falls back to least outstanding.

Every replica runs in the engine's one event loop (`sim.engine.loop`, lanes in `sim.engine.lanes`).

References: vLLM `vllm/v1/engine/core_client.py` (DP load balancing by outstanding requests);
SGLang router (cache-aware routing with a balance threshold, 2024); Srivatsa et al. 2024
("Preble": prefix-aware scheduling across replicas).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import numpy as np

from sim.core.errors import ConfigError
from sim.core.request import Request


class RoundRobinRouter:
    name = "round_robin"

    def __init__(self, num_replicas: int) -> None:
        self.num_replicas = _check(num_replicas)
        self._next = 0

    def route(self, request: Request, outstanding: Sequence[int]) -> int:
        choice = self._next
        self._next = (self._next + 1) % self.num_replicas
        return choice


class LeastOutstandingRouter:
    name = "least_outstanding"

    def __init__(self, num_replicas: int) -> None:
        self.num_replicas = _check(num_replicas)

    def route(self, request: Request, outstanding: Sequence[int]) -> int:
        return int(np.argmin(outstanding))


class PrefixAffinityRouter:
    name = "prefix_affinity"

    def __init__(self, num_replicas: int, prefix_tokens: int = 64, slack: int = 4) -> None:
        self.num_replicas = _check(num_replicas)
        if prefix_tokens < 1 or slack < 0:
            raise ConfigError(f"prefix_tokens must be >= 1 and slack >= 0, got {prefix_tokens}, "
                              f"{slack}")
        self.prefix_tokens, self.slack = prefix_tokens, slack
        self.num_affine = 0  # requests that went to their prefix's replica
        self.num_spilled = 0  # requests moved off an overloaded prefix replica

    def home(self, token_ids: Sequence[int]) -> int:
        """The replica a prompt's prefix hashes to (stable across runs and machines)."""
        prefix = np.asarray(token_ids[: self.prefix_tokens], dtype=np.int64)  # [<= prefix_tokens]
        digest = hashlib.blake2b(prefix.tobytes(), digest_size=8).digest()
        return int.from_bytes(digest, "little") % self.num_replicas

    def route(self, request: Request, outstanding: Sequence[int]) -> int:
        least = int(np.argmin(outstanding))
        ids = request.prompt_token_ids
        if not ids:
            return least
        target = self.home(ids)
        if outstanding[target] > 2 * outstanding[least] + self.slack:
            self.num_spilled += 1
            return least
        self.num_affine += 1
        return target


Router = RoundRobinRouter | LeastOutstandingRouter | PrefixAffinityRouter

#: `data_parallel_router=` name -> router class (built with the number of replicas). The one
#: list of routers: `EngineArgs` and the CLI take their choices from its keys.
ROUTERS: dict[str, Callable[[int], Router]] = {
    "round_robin": RoundRobinRouter,
    "least_outstanding": LeastOutstandingRouter,
    "prefix_affinity": PrefixAffinityRouter,
}


def _check(num_replicas: int) -> int:
    if num_replicas < 1:
        raise ConfigError(f"a router needs at least one replica, got {num_replicas}")
    return num_replicas
