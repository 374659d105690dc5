"""Contiguous KV reservation: each admitted request reserves one slab up front.

The pre-PagedAttention baselines the vLLM paper compares against, chosen with
`contiguous_reservation`:

- `"max_len"` (FasterTransformer; Orca "Max"): reserve `max_model_len` tokens per request;
- `"pow2"` (Orca "Pow2"): reserve the next power of two of the request's limit (prompt +
  `max_tokens`, capped at `max_model_len`): at most 2x what it can use;
- `"oracle"` (Orca "Oracle"): reserve exactly the request's limit, i.e. its final length when it
  runs to `max_tokens` (every workload request does: `ignore_eos`). Knowing the output length in
  advance is impossible in a real system; this is the baseline's upper bound.

Memory sits reserved-but-unused until tokens arrive, and a slab longer than the final length is
internal fragmentation, so fewer requests run at once (see `usage()`).

References: Kwon et al., SOSP'23 (vLLM), section 3, Fig. 2 and section 6.1 (Orca Max/Pow2/Oracle);
Yu et al., OSDI'22 (Orca); NVIDIA FasterTransformer.
"""

from __future__ import annotations

from collections.abc import Callable

from sim.core.errors import ConfigError
from sim.core.request import Request
from sim.core.step import NO_KV_WORK, ScheduledSeq, StepKV
from sim.core.usage import KVMemoryUsage


def _pow2_tokens(limit: int, max_model_len: int) -> int:
    return min(1 << (limit - 1).bit_length(), max_model_len)


#: `contiguous_reservation=` name -> the tokens a request reserves, from its limit (prompt +
#: `max_tokens`, capped at `max_model_len`) and `max_model_len`. The one list of reservations:
#: `EngineArgs` and the CLI take their choices from its keys.
RESERVATIONS: dict[str, Callable[[int, int], int]] = {
    "max_len": lambda limit, max_model_len: max_model_len,
    "pow2": _pow2_tokens,
    "oracle": lambda limit, max_model_len: limit,
}


class ContiguousKVCache:
    """Reserve one slab per request (see `contiguous_reservation`) out of `num_kv_tokens`."""

    retains_kv = True

    def __init__(self, num_kv_tokens: int, max_model_len: int, reservation: str = "max_len") -> None:
        if num_kv_tokens < 0 or max_model_len < 1:
            raise ValueError("num_kv_tokens must be >= 0 and max_model_len >= 1")
        if reservation not in RESERVATIONS:
            raise ConfigError(f"contiguous_reservation={reservation!r} is not one of "
                              f"{', '.join(RESERVATIONS)}")
        self.num_kv_tokens = num_kv_tokens
        self.max_model_len = max_model_len
        self.reservation = reservation
        self._reservation_tokens = RESERVATIONS[reservation]
        self._reserved: dict[str, int] = {}  # request_id -> reserved tokens
        self._used: dict[str, int] = {}  # request_id -> tokens with KV
        self._limit: dict[str, int] = {}  # request_id -> its limit (for usage())
        self._num_reserved = 0

    def reservation_tokens(self, request: Request) -> int:
        return self._reservation_tokens(request.max_len(self.max_model_len), self.max_model_len)

    def never_fits(self, request: Request, max_len: int) -> str | None:
        need = self.reservation_tokens(request)
        if need > self.num_kv_tokens:
            return (
                f"larger than the KV cache: a contiguous reservation of {need} tokens > the "
                f"whole KV cache "
                f"({self.num_kv_tokens} tokens); lower max_model_len or use a larger GPU"
            )
        return None

    def cached_prefix(self, request: Request) -> int:
        return 0

    def allocate(self, request: Request, num_tokens: int, num_cached_tokens: int = 0) -> bool:
        rid = request.request_id
        reserved = self._reserved.get(rid)
        if reserved is None:
            reserved = self.reservation_tokens(request)
            if num_tokens > reserved or reserved > self.num_free_tokens():
                return False
            self._reserved[rid] = reserved
            self._limit[rid] = min(request.max_len(self.max_model_len), reserved)
            self._num_reserved += reserved
        elif num_tokens > reserved:
            return False
        self._used[rid] = num_tokens
        return True

    def free(self, request: Request) -> None:
        self._num_reserved -= self._reserved.pop(request.request_id, 0)
        self._used.pop(request.request_id, None)
        self._limit.pop(request.request_id, None)

    def preempt(self, request: Request) -> bool:
        self.free(request)
        return False

    def capacity(self, request: Request) -> int:
        return self._reserved.get(request.request_id, 0)

    def num_free_tokens(self) -> int:
        return self.num_kv_tokens - self._num_reserved

    def num_used_tokens(self) -> int:
        return sum(self._used.values())

    def num_reserved_tokens(self) -> int:
        return self._num_reserved

    def take_step_kv(self, seqs: tuple[ScheduledSeq, ...]
                     ) -> tuple[tuple[ScheduledSeq, ...], StepKV]:
        """No blocks: nothing to copy or price, and the store addresses KV by request id."""
        return seqs, NO_KV_WORK

    def usage(self) -> KVMemoryUsage:
        used = self.num_used_tokens()
        future = sum(max(self._limit[r] - n, 0) for r, n in self._used.items())
        return KVMemoryUsage(
            num_total_tokens=self.num_kv_tokens, num_used_tokens=used, num_reserved_tokens=future,
            num_internal_frag_tokens=self._num_reserved - used - future,
            num_free_tokens=self.num_free_tokens(), num_requests=len(self._reserved))
