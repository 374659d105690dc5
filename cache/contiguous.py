"""Contiguous KV reservation: each admitted request reserves one slab up front.

The pre-PagedAttention baselines the vLLM paper compares against, chosen with
`contiguous_reservation`:

- `"max_len"` (FasterTransformer; Orca "Max"): reserve `max_model_len` tokens per request;
- `"pow2"` (Orca "Pow2"): reserve the next power of two of the request's limit (prompt +
  `max_tokens`, capped at `max_model_len`): at most 2x what it can use;
- `"oracle"` (Orca "Oracle"): reserve exactly the request's limit, i.e. its final length when it
  runs to `max_tokens` (every workload request does: `ignore_eos`). Knowing the output length in
  advance is impossible in a real system; this is the baseline's upper bound.

Each slab is placed by a buddy allocator (`cache.buddy`), as the vLLM paper's Orca baselines
allocate (section 6.1): it needs one free power-of-two chunk that holds the reservation (the
tail past the reservation is given back, as Linux's `alloc_pages_exact` does, so Oracle still
reserves exactly), and a free pool can splinter into chunks too small for the next request
(external fragmentation). Memory sits
reserved-but-unused until tokens arrive, and a chunk longer than the final length is internal
fragmentation, so fewer requests run at once (see `usage()` and `fragmentation()`).

Each reservation is configured as the paper configures that baseline (the best configuration of
the baseline, not a strawman): Oracle knows every output length; Pow2 and Max as described.

References: Kwon et al., SOSP'23 (vLLM), section 3, Fig. 2 and section 6.1 (Orca Max/Pow2/Oracle);
Yu et al., OSDI'22 (Orca); NVIDIA FasterTransformer.
"""

from __future__ import annotations

from collections.abc import Callable

from cache.buddy import BuddyAllocator
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
    """Reserve one buddy chunk per request (see `contiguous_reservation`) out of
    `num_kv_tokens`."""

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
        self._buddy = BuddyAllocator(num_kv_tokens)
        self._offset: dict[str, int] = {}  # request_id -> its chunk's offset in the pool
        self._reserved: dict[str, int] = {}  # request_id -> reserved tokens (its chunk)
        self._used: dict[str, int] = {}  # request_id -> tokens with KV
        self._limit: dict[str, int] = {}  # request_id -> its limit (for usage())
        self._num_reserved = 0
        # the last reservation asked for: external fragmentation is measured against it
        self._last_asked_tokens = 0
        # the breakdown when the most memory was held (what a run reports), and how often a
        # reservation was refused although enough memory was free (external fragmentation)
        self._peak_fragmentation: dict[str, int] | None = None
        self._num_peak_held_tokens = -1
        self.num_fragmentation_refusals = 0

    def reservation_tokens(self, request: Request) -> int:
        return self._reservation_tokens(request.max_len(self.max_model_len), self.max_model_len)

    def never_fits(self, request: Request, max_len: int) -> str | None:
        need = self.reservation_tokens(request)
        chunk = 1 << (need - 1).bit_length()
        largest = self._buddy.max_chunk_units
        if chunk > largest:
            return (
                f"larger than the KV cache: a contiguous reservation of {need} tokens (a "
                f"{chunk}-token buddy chunk) > the largest chunk of the KV cache "
                f"({largest} of {self.num_kv_tokens} tokens); lower max_model_len or use a "
                "larger GPU"
            )
        return None

    def cached_prefix(self, request: Request) -> int:
        return 0

    def allocate(self, request: Request, num_tokens: int, num_cached_tokens: int = 0) -> bool:
        rid = request.request_id
        reserved = self._reserved.get(rid)
        if reserved is None:
            asked = self.reservation_tokens(request)
            self._last_asked_tokens = asked
            if num_tokens > asked:
                return False
            # exact: the chunk's tail goes back to the pool (a reservation is what the baseline
            # reserves; pow2 rounds by itself), the placement stays the buddy allocator's
            offset = self._buddy.allocate(asked, exact=True)
            if offset is None:
                if asked <= self._buddy.num_free_units:
                    self.num_fragmentation_refusals += 1
                return False
            reserved = self._buddy.allocated_units(offset)
            self._offset[rid] = offset
            self._reserved[rid] = reserved
            self._limit[rid] = min(request.max_len(self.max_model_len), reserved)
            self._num_reserved += reserved
            if self._num_reserved > self._num_peak_held_tokens:
                self._num_peak_held_tokens = self._num_reserved
                self._peak_fragmentation = None  # taken once this call records the use
        elif num_tokens > reserved:
            return False
        self._used[rid] = num_tokens
        if self._peak_fragmentation is None and self._num_peak_held_tokens >= 0:
            self._peak_fragmentation = self.fragmentation()
        return True

    def free(self, request: Request) -> None:
        self._num_reserved -= self._reserved.pop(request.request_id, 0)
        offset = self._offset.pop(request.request_id, None)
        if offset is not None:
            self._buddy.free(offset)
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
            num_free_tokens=self.num_free_tokens(), num_requests=len(self._reserved),
            num_external_frag_tokens=self._buddy.external_fragmentation(self._last_asked_tokens))

    def peak_fragmentation(self) -> dict[str, int]:
        """`fragmentation()` as it was when the most memory was reserved (all free before any
        request), plus `fragmentation_refusals`: reservations refused although the free total
        would have held them."""
        parts = self._peak_fragmentation or self.fragmentation()
        return {**parts, "fragmentation_refusals": self.num_fragmentation_refusals}

    def fragmentation(self) -> dict[str, int]:
        """The vLLM paper's breakdown of the pool now, in tokens: used, reserved-unused (held
        for tokens still to come), internal (held, never to be used: the chunk past the
        request's limit), external (free, in chunks too small for the last reservation
        asked) and the rest of free."""
        usage = self.usage()
        return {
            "used_tokens": usage.num_used_tokens,
            "reserved_unused_tokens": usage.num_reserved_tokens,
            "internal_frag_tokens": usage.num_internal_frag_tokens,
            "external_frag_tokens": usage.num_external_frag_tokens,
            "free_tokens": usage.num_free_tokens - usage.num_external_frag_tokens,
        }
