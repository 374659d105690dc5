"""The paged NumPy KV store: K/V contents in fixed-size physical blocks, read through block tables.

One pool array `[n_layer, 2, num_blocks, block_size, n_kv_head, d_head]` holds every block; a
sequence's K/V of position `p` lives in physical block `table[p // block_size]` at offset
`p % block_size`. The block tables come from the paged cache manager (`cache.paged`), which owns
allocation; this store only moves bytes. `read` gathers the sequence's blocks with one fancy
index (`pool[layer, 0, table[:num_blocks]]`, vectorised, no Python loop per token), so
`NumpyModel.forward_step` attends through it unchanged, and blocks shared by reference (prefix
caching) are read by every sequence that holds them.

The executor calls `prepare(seq_id, table, num_tokens)` before each step: the table to use and
how many positions the manager says already hold KV (after a prefix-cache hit, a swap-in, or a
recompute preemption). `apply_ops` performs the manager's queued block copies (swap to/from a
host dict) before the step's writes. The pool grows on demand up to the highest block id used.

KV eviction reads through the same tables: `read_positions` gathers only the kept positions
(sliding window, StreamingLLM; released blocks are -1), and H2O, whose kept set lives in the
table's first slots, `compact`s each layer after a step (copies inside the pool).

With a `codec` (`sim.model.kv_quant`, `kv_cache_dtype` fp8 / int8) the pool holds 8-bit codes and a
second pool `[n_layer, 2, num_blocks, block_size, n_kv_head]` their float32 scales: writes
encode, reads and gathers decode into the model's dtype.

References: Kwon et al., SOSP'23 (PagedAttention kernel: gather K/V by block table); vLLM
`csrc/attention/paged_attention_v1.cu` and `vllm/attention/ops/paged_attn.py` (cache layout).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np

from sim.core.errors import InfersimError
from sim.model.kv_quant import KVCodec
from sim.model.kv_store import check_write


class PagedKVStore:
    """A `KVStore` whose contents live in blocks addressed through per-sequence block tables."""

    def __init__(self, n_layer: int, n_kv_head: int, d_head: int, block_size: int = 16,
                 dtype: str | np.dtype = "float32", num_blocks: int = 0,
                 codec: KVCodec | None = None) -> None:
        for key, value in (("n_layer", n_layer), ("n_kv_head", n_kv_head), ("d_head", d_head),
                           ("block_size", block_size)):
            if not isinstance(value, int) or value <= 0:
                raise InfersimError(f"PagedKVStore: {key} must be a positive int, got {value!r}")
        self.n_layer = n_layer
        self.n_kv_head = n_kv_head
        self.d_head = d_head
        self.block_size = block_size
        self.dtype = np.dtype(dtype)  # what reads return (the model's dtype)
        self.codec = codec
        self.pool = self._zeros(num_blocks)  # [n_layer, 2, n_blocks, bs, n_kv, d_head]
        self.scales = self._zero_scales(num_blocks)  # [n_layer, 2, n_blocks, bs, n_kv] | [0]
        self._tables: dict[Hashable, np.ndarray] = {}  # seq -> [n_seq_blocks] physical ids
        self._num_written: dict[Hashable, np.ndarray] = {}  # seq -> [n_layer]
        # host block -> ([n_layer, 2, bs, n_kv, d_head], its scales [n_layer, 2, bs, n_kv])
        self._host: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _zeros(self, num_blocks: int) -> np.ndarray:
        shape = (self.n_layer, 2, num_blocks, self.block_size, self.n_kv_head, self.d_head)
        dtype = self.dtype if self.codec is None else self.codec.code_dtype
        return np.zeros(shape, dtype=dtype)  # [n_layer, 2, n_blocks, bs, n_kv, d_head]

    def _zero_scales(self, num_blocks: int) -> np.ndarray:
        if self.codec is None:
            return np.zeros(0, dtype=np.float32)  # [0]: unquantized
        shape = (self.n_layer, 2, num_blocks, self.block_size, self.n_kv_head)
        return np.zeros(shape, dtype=np.float32)  # [n_layer, 2, n_blocks, bs, n_kv]

    # ------------------------------------------------------------------ driven by the executor
    def prepare(self, seq_id: Hashable, table: Sequence[int], num_tokens: int) -> None:
        """Use `table` for `seq_id` this step; positions `0..num_tokens-1` hold KV."""
        tab = np.asarray(table, dtype=np.int64)  # [n_seq_blocks]
        if num_tokens < 0 or num_tokens > tab.shape[0] * self.block_size:
            raise InfersimError(f"KV store: sequence {seq_id!r} claims {num_tokens} tokens but its "
                                f"block table holds {tab.shape[0] * self.block_size}")
        if tab.shape[0]:
            self._reserve(int(tab.max()) + 1)
        self._tables[seq_id] = tab
        written = self._num_written.get(seq_id)
        if written is None:
            self._num_written[seq_id] = np.full(self.n_layer, num_tokens, dtype=np.int64)
        else:
            written[:] = num_tokens

    def apply_ops(self, ops: Sequence[tuple[str, int, int]]) -> None:
        """Block copies in order: ("out", gpu, host) saves a block, ("in", host, gpu) restores
        it, ("copy", src, dst) duplicates one (copy-on-write)."""
        for kind, src, dst in ops:
            quantized = self.codec is not None
            if kind == "out":
                self._host[dst] = (self.pool[:, :, src].copy(),  # [n_layer, 2, bs, n_kv, d_head]
                                   self.scales[:, :, src].copy() if quantized else self.scales)
            elif kind == "copy":
                self._reserve(dst + 1)
                self.pool[:, :, dst] = self.pool[:, :, src]
                if quantized:
                    self.scales[:, :, dst] = self.scales[:, :, src]
            elif kind == "in":
                self._reserve(dst + 1)
                self.pool[:, :, dst], scales = self._host.pop(src)
                if quantized:
                    self.scales[:, :, dst] = scales
            else:
                raise InfersimError(f"KV store: unknown block op {kind!r}")

    def free(self, seq_id: Hashable) -> None:
        self._tables.pop(seq_id, None)
        self._num_written.pop(seq_id, None)

    def has(self, seq_id: Hashable) -> bool:
        return seq_id in self._tables

    def num_tokens(self, seq_id: Hashable) -> int:
        return int(self._written(seq_id).min())

    @property
    def num_host_blocks(self) -> int:
        return len(self._host)

    # ------------------------------------------------------------------ KVStore protocol
    def write(self, seq_id: Hashable, layer: int, start_pos: int, k: np.ndarray,
              v: np.ndarray) -> None:
        table = self._table(seq_id)
        written = self._num_written[seq_id]
        end = check_write(seq_id, layer, start_pos, k, v, (self.n_kv_head, self.d_head),
                          int(written[layer]), table.shape[0] * self.block_size, "blocks")
        pos = np.arange(start_pos, end)  # [n_new]
        blocks = table[pos // self.block_size]  # [n_new]
        offsets = pos % self.block_size  # [n_new]
        if self.codec is None:
            self.pool[layer, 0, blocks, offsets] = k
            self.pool[layer, 1, blocks, offsets] = v
        else:
            for i, x in enumerate((k, v)):
                codes, scales = self.codec.encode(x)  # [n_new, n_kv, d_head], [n_new, n_kv]
                self.pool[layer, i, blocks, offsets] = codes
                self.scales[layer, i, blocks, offsets] = scales
        written[layer] = end

    def read(self, seq_id: Hashable, layer: int, end_pos: int) -> tuple[np.ndarray, np.ndarray]:
        table = self._table(seq_id)
        written = int(self._num_written[seq_id][layer])
        if end_pos > written or end_pos < 0:
            raise InfersimError(
                f"KV store: reading positions 0..{end_pos - 1} of sequence {seq_id!r} layer "
                f"{layer}, but only 0..{written - 1} are written")
        num_blocks = -(-end_pos // self.block_size)
        shape = (num_blocks * self.block_size, self.n_kv_head, self.d_head)
        tab = table[:num_blocks]  # [num_blocks]
        k = self.pool[layer, 0, tab].reshape(shape)  # [num_blocks * bs, n_kv, d_head]
        v = self.pool[layer, 1, tab].reshape(shape)  # [num_blocks * bs, n_kv, d_head]
        if self.codec is not None:
            sk = self.scales[layer, 0, tab].reshape(shape[:2])  # [num_blocks * bs, n_kv]
            sv = self.scales[layer, 1, tab].reshape(shape[:2])  # [num_blocks * bs, n_kv]
            k = self.codec.decode(k[:end_pos], sk[:end_pos], self.dtype)  # [end_pos, n_kv, d]
            v = self.codec.decode(v[:end_pos], sv[:end_pos], self.dtype)  # [end_pos, n_kv, d]
        return k[:end_pos], v[:end_pos]  # [end_pos, n_kv, d_head] x2

    def read_positions(self, seq_id: Hashable, layer: int,
                       positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """K and V `[n_pos, n_kv_head, d_head]` of the given positions only (KV eviction: the
        blocks of evicted positions are released, their table entries -1, and never read)."""
        table = self._table(seq_id)
        pos = np.asarray(positions, dtype=np.int64)  # [n_pos]
        written = int(self._num_written[seq_id][layer])
        if pos.shape[0] and (int(pos.max()) >= written or int(pos.min()) < 0):
            raise InfersimError(f"KV store: reading positions up to {int(pos.max())} of sequence "
                                f"{seq_id!r} layer {layer}, but only 0..{written - 1} are written")
        blocks = table[pos // self.block_size]  # [n_pos]
        if (blocks < 0).any():
            raise InfersimError(f"KV store: sequence {seq_id!r} reads a position whose block was "
                                "released by KV eviction")
        offsets = pos % self.block_size  # [n_pos]
        k = self.pool[layer, 0, blocks, offsets]  # [n_pos, n_kv, d_head]
        v = self.pool[layer, 1, blocks, offsets]  # [n_pos, n_kv, d_head]
        if self.codec is not None:
            k = self.codec.decode(k, self.scales[layer, 0, blocks, offsets], self.dtype)
            v = self.codec.decode(v, self.scales[layer, 1, blocks, offsets], self.dtype)
        return k, v

    def compact(self, seq_id: Hashable, layer: int, slots: np.ndarray) -> None:
        """Move the K/V in `slots` (ascending, written) of one layer to slots `0..len-1`, in
        order, copying inside the pool; later slots hold nothing live any more (H2O keeps its
        kept set in the table's first slots, `cache.h2o`)."""
        table = self._table(seq_id)
        src = np.asarray(slots, dtype=np.int64)  # [n_keep]
        n_keep = src.shape[0]
        written = self._num_written[seq_id]
        if n_keep and (int(src[-1]) >= written[layer] or (np.diff(src) <= 0).any()
                       or int(src[0]) < 0):
            raise InfersimError(f"KV store: compacting sequence {seq_id!r} layer {layer} needs "
                                f"ascending written slots (0..{int(written[layer]) - 1})")
        moved = np.flatnonzero(src != np.arange(n_keep))  # [n_moved]: from the first hole on
        if moved.shape[0]:
            dst = np.arange(int(moved[0]), n_keep)  # [n_move]
            src = src[int(moved[0]):]  # [n_move]
            bs = self.block_size
            from_slot = table[src // bs] * bs + src % bs  # [n_move] flat pool slots
            to_slot = table[dst // bs] * bs + dst % bs  # [n_move]
            for i in range(2):  # a gather copies first, so overlapping moves are safe
                flat = self.pool[layer, i].reshape(-1, self.n_kv_head, self.d_head)  # view
                flat[to_slot] = flat[from_slot]
                if self.codec is not None:
                    scales = self.scales[layer, i].reshape(-1, self.n_kv_head)  # view
                    scales[to_slot] = scales[from_slot]
        written[layer] = n_keep

    def gather_padded(self, seq_ids: Sequence[Hashable], layer: int, firsts: Sequence[int],
                      sizes: Sequence[int], out: np.ndarray) -> None:
        """Fill `out` `[2, n_seq, max_len, n_kv_head, d_head]` with K and V of positions
        `firsts[s]..firsts[s]+sizes[s]-1` of each sequence, zero beyond: the padded batch of
        decode attention, in one vectorised gather through all block tables."""
        n_seq, max_len = out.shape[1], out.shape[2]
        first = np.asarray(firsts, dtype=np.int64)  # [n_seq]
        size = np.asarray(sizes, dtype=np.int64)  # [n_seq]
        tables = [self._table(seq_id) for seq_id in seq_ids]
        for seq_id, end in zip(seq_ids, (first + size).tolist(), strict=True):
            if end > self._num_written[seq_id][layer]:
                self.read(seq_id, layer, end)  # raises the "not written" error
        tab = np.zeros((n_seq, max(t.shape[0] for t in tables)), dtype=np.int64)  # [n_seq, nb]
        for s, t in enumerate(tables):
            tab[s, : t.shape[0]] = t
        j = np.arange(max_len)  # [max_len]
        pos = first[:, None] + np.minimum(j[None, :], size[:, None] - 1)  # [n_seq, max_len]
        bs = self.block_size
        slot = np.take_along_axis(tab, pos // bs, axis=1) * bs + pos % bs  # [n_seq, max_len]
        shape = (-1, self.n_kv_head, self.d_head)
        if self.codec is None:
            np.take(self.pool[layer, 0].reshape(shape), slot, axis=0, out=out[0], mode="clip")
            np.take(self.pool[layer, 1].reshape(shape), slot, axis=0, out=out[1], mode="clip")
        else:
            for i in range(2):
                codes = np.take(self.pool[layer, i].reshape(shape), slot, axis=0,
                                mode="clip")  # [n_seq, max_len, n_kv, d_head]
                scales = np.take(self.scales[layer, i].reshape(shape[:2]), slot, axis=0,
                                 mode="clip")  # [n_seq, max_len, n_kv]
                out[i] = self.codec.decode(codes, scales, out.dtype)
        padding = j[None, :] >= size[:, None]  # [n_seq, max_len]
        if padding.any():
            out[:, padding] = 0

    # ------------------------------------------------------------------ helpers
    def _table(self, seq_id: Hashable) -> np.ndarray:
        table = self._tables.get(seq_id)
        if table is None:
            raise InfersimError(f"KV store: sequence {seq_id!r} has no block table; call "
                                "prepare(seq_id, table, num_tokens) first")
        return table

    def _written(self, seq_id: Hashable) -> np.ndarray:
        self._table(seq_id)
        return self._num_written[seq_id]

    def _reserve(self, num_blocks: int) -> None:
        have = self.pool.shape[2]
        if num_blocks > have:
            grown = self._zeros(max(num_blocks, 2 * have))  # [n_layer, 2, n, bs, n_kv, d_head]
            grown[:, :, :have] = self.pool
            self.pool = grown
            if self.codec is not None:
                scales = self._zero_scales(grown.shape[2])  # [n_layer, 2, n, bs, n_kv]
                scales[:, :, :have] = self.scales
                self.scales = scales
