"""A binary buddy allocator over the KV pool: power-of-two chunks, split on demand, merged with
their buddy on free.

Orca's baselines in the vLLM paper (Kwon et al., SOSP'23, section 6.1) "use a buddy allocator to
determine the memory address to store KV cache": each request's contiguous reservation is one
power-of-two chunk. Two costs follow, both measured here: the chunk rounds the reservation up
(internal fragmentation, counted by the KV manager) and free memory splinters into chunks too
small for the next request (external fragmentation: `external_fragmentation(num_units)`).

`allocate(n, exact=True)` gives back the chunk's tail past `n` as smaller buddies (Linux's
`alloc_pages_exact`), so a reservation holds exactly `n` units, still contiguous and still
subject to external fragmentation; `exact=False` holds the whole power-of-two chunk.

The pool need not be a power of two: it is cut, from offset 0, into the largest power-of-two
roots that fit (e.g. 12 units = 8 + 4), each aligned to its size, and buddies never merge across
roots. Units are whatever the caller counts (the contiguous manager counts KV token slots).

References: Knowlton, "A fast storage allocator", CACM 1965; Knuth, TAOCP vol. 1, 2.5
(the buddy system); Kwon et al., SOSP'23, section 6.1.
"""

from __future__ import annotations

from sim.core.errors import ConfigError


def chunk_order(num_units: int) -> int:
    """The order k of the smallest chunk 2**k that holds `num_units` (>= 1)."""
    return (num_units - 1).bit_length()


class BuddyAllocator:
    """Power-of-two chunks over `num_units` units; `allocate` returns a chunk's offset."""

    def __init__(self, num_units: int) -> None:
        if not isinstance(num_units, int) or num_units < 0:
            raise ConfigError(f"BuddyAllocator num_units={num_units!r} must be an int >= 0 "
                              "(the KV pool size in units)")
        self.num_units = num_units
        self._free: dict[int, set[int]] = {}  # order -> offsets of free chunks of that order
        self._allocated: dict[int, int] = {}  # offset -> order of an allocated chunk
        # an allocation's offset -> its chunks (one, or several for an exact allocation)
        self._pieces: dict[int, list[int]] = {}
        self._roots: list[tuple[int, int]] = []  # (offset, order) of the top-level chunks
        offset, rest = 0, num_units
        while rest:
            order = rest.bit_length() - 1
            self._roots.append((offset, order))
            self._free.setdefault(order, set()).add(offset)
            offset += 1 << order
            rest -= 1 << order
        self._num_free_units = num_units

    def _root_order(self, offset: int) -> int:
        for root_offset, order in self._roots:  # (at most log2(num_units) roots)
            if root_offset <= offset < root_offset + (1 << order):
                return order
        raise ValueError(f"offset {offset} lies outside the pool of {self.num_units} units")

    def allocate(self, num_units: int, exact: bool = False) -> int | None:
        """Offset of `num_units` contiguous units, or None when no free chunk of
        2**chunk_order(num_units) exists (whatever the total free: external fragmentation).
        `exact`: give the chunk's tail past `num_units` back as free buddies."""
        if num_units < 1:
            raise ValueError(f"allocate num_units={num_units} must be >= 1")
        order = chunk_order(num_units)
        source = next((k for k in sorted(self._free) if k >= order and self._free[k]), None)
        if source is None:
            return None
        start = min(self._free[source])  # lowest address first: deterministic, packs low
        self._free[source].discard(start)
        while source > order:  # split: keep the lower half, free the upper buddy
            source -= 1
            self._free.setdefault(source, set()).add(start + (1 << source))
        pieces = []
        offset, need = start, num_units if exact else 1 << order
        while need:  # [offset, offset + 2**order) is held; keep what `need` covers of it
            if need == 1 << order:
                pieces.append(offset)
                self._allocated[offset] = order
                break
            order -= 1
            half = 1 << order
            if need <= half:  # the upper half is not needed: free it, go on in the lower
                self._free.setdefault(order, set()).add(offset + half)
            else:  # the lower half is needed whole: keep it, go on in the upper
                pieces.append(offset)
                self._allocated[offset] = order
                offset, need = offset + half, need - half
        self._pieces[start] = pieces
        self._num_free_units -= num_units if exact else 1 << chunk_order(num_units)
        return start

    def free(self, offset: int) -> None:
        """Return the allocation at `offset`, merging each chunk with its buddy while the buddy
        is free."""
        pieces = self._pieces.pop(offset, None)
        if pieces is None:
            raise ValueError(f"free: no allocation at offset {offset}")
        for piece in pieces:
            self._free_chunk(piece)

    def _free_chunk(self, offset: int) -> None:
        order = self._allocated.pop(offset)
        self._num_free_units += 1 << order
        root_order = self._root_order(offset)
        while order < root_order:
            buddy = offset ^ (1 << order)
            free_here = self._free.get(order)
            if not free_here or buddy not in free_here:
                break
            free_here.discard(buddy)
            offset = min(offset, buddy)
            order += 1
        self._free.setdefault(order, set()).add(offset)

    def allocated_units(self, offset: int) -> int:
        """Units held by the allocation at `offset`."""
        return sum(1 << self._allocated[piece] for piece in self._pieces[offset])

    @property
    def num_free_units(self) -> int:
        return self._num_free_units

    @property
    def num_allocated_units(self) -> int:
        return self.num_units - self._num_free_units

    def free_chunks(self) -> list[tuple[int, int]]:
        """(offset, size) of every free chunk, by offset."""
        return sorted((o, 1 << k) for k, offsets in self._free.items() for o in offsets)

    def allocated_chunks(self) -> list[tuple[int, int]]:
        """(offset, size) of every allocated chunk (an exact allocation's pieces apart), by
        offset."""
        return sorted((o, 1 << k) for o, k in self._allocated.items())

    @property
    def max_chunk_units(self) -> int:
        """The largest chunk the pool can ever give (its largest root; 0 for an empty pool)."""
        return max((1 << order for _, order in self._roots), default=0)

    def largest_free_units(self) -> int:
        """The largest request one allocation can serve now (0 when nothing is free)."""
        orders = [k for k, offsets in self._free.items() if offsets]
        return 1 << max(orders) if orders else 0

    def external_fragmentation(self, num_units: int) -> int:
        """Free units that cannot serve a request of `num_units`: those in free chunks smaller
        than the chunk it needs (with nothing allocated in a power-of-two pool, 0)."""
        order = chunk_order(max(num_units, 1))
        return sum((1 << k) * len(offsets) for k, offsets in self._free.items() if k < order)
