"""Host swap space: where a preempted request's KV blocks wait in CPU memory.

`swap_space` GiB of host memory is cut into blocks of the GPU pool's size. Swapping a request
out gives each of its live block-table entries a host block (lowest free id first) and records
the moves; swapping it in returns them, in table order, onto fresh GPU blocks. An entry that
KV eviction already released (-1) moves nothing and stays -1. The engine prices the moves over
the profile's host link: `take_moved` gives the counts to the manager, which hands them
to the step plan (`PagedKVCache.take_step_kv`).

References: Kwon et al., SOSP'23 (PagedAttention) section 4.5 (swapping to CPU memory);
vLLM v0 `swap_space` (GiB of CPU memory per GPU).
"""

from __future__ import annotations

import heapq

from sim.core.errors import InfersimError


class SwapSpace:
    """Host blocks, and which swapped-out request holds which (per block-table entry)."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 0:
            raise InfersimError(f"num_swap_blocks must be >= 0, got {num_blocks}")
        self.num_blocks = num_blocks
        # Lazy, as `cache.block_pool.BlockPool`: ids from `_num_touched` up are fresh, every
        # id in `_free` is below them, so the lowest free id is handed out without a list of
        # all of them
        self._free: list[int] = []  # a heap of released ids
        self._num_touched = 0
        self._held: dict[str, list[int]] = {}  # request_id -> host block per entry (-1: none)
        self._pending = [0, 0]  # blocks out, in since the last take_moved()
        # cumulative counters (metrics)
        self.num_swapped_out_blocks = 0
        self.num_swapped_in_blocks = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self._free) + self.num_blocks - self._num_touched

    def holds(self, request_id: str) -> bool:
        return request_id in self._held

    def host_table(self, request_id: str) -> list[int]:
        """The swapped-out request's host block per table entry (-1: released, none)."""
        return self._held[request_id]

    def swap_out(self, request_id: str, table: list[int]) -> list[tuple[int, int]] | None:
        """Host blocks for the live entries of `table` (GPU block ids, -1 released); the
        (gpu, host) moves, or None when the space is too small (nothing changes)."""
        num_live = sum(1 for b in table if b >= 0)
        if num_live > self.num_free_blocks:
            return None
        host = [self._take() if b >= 0 else -1 for b in table]
        self._held[request_id] = host
        self._pending[0] += num_live
        self.num_swapped_out_blocks += num_live
        return [(g, h) for g, h in zip(table, host, strict=True) if g >= 0]

    def _take(self) -> int:
        if self._free:
            return heapq.heappop(self._free)
        self._num_touched += 1
        return self._num_touched - 1

    def swap_in(self, request_id: str, table: list[int]) -> list[tuple[int, int]]:
        """Release the request's host blocks onto `table` (its new GPU blocks, entry by entry,
        -1 where the host table has -1); the (host, gpu) moves."""
        host = self._held.pop(request_id)
        moves = [(h, g) for h, g in zip(host, table, strict=False) if h >= 0]
        for h, _ in moves:
            heapq.heappush(self._free, h)
        self._pending[1] += len(moves)
        self.num_swapped_in_blocks += len(moves)
        return moves

    def free(self, request_id: str) -> None:
        """Drop a swapped-out request's host blocks (it ended or restarts)."""
        for h in self._held.pop(request_id, ()):
            if h >= 0:
                heapq.heappush(self._free, h)

    def take_moved(self) -> tuple[int, int]:
        """(blocks swapped out, blocks swapped in) since the last call (for pricing)."""
        out, into = self._pending
        self._pending = [0, 0]
        return out, into

    def check(self) -> None:
        """Invariant (tests): every host block is free or held, exactly once."""
        held = [h for host in self._held.values() for h in host if h >= 0]
        assert sorted(held + self._free) == list(range(self._num_touched)), "host blocks leak"
        assert self._num_touched <= self.num_blocks
