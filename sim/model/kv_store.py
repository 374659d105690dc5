"""The NumPy KV store: where the functional model keeps each sequence's keys and values.

This is the *contents* side of the KV cache (the accounting side, blocks and free lists, lives in
the cache managers). `sim.core.protocols.KVStore` is the protocol the NumPy model reads and
writes through; a store keeps, per sequence and layer, the rotated keys and the values of positions `0..n-1`.
`ContiguousKVStore` is the simplest layout: one preallocated array per sequence,
`[n_layer, 2, num_tokens, n_kv_head, d_head]`, as in Hugging Face's static cache. A paged store
(vLLM's PagedAttention) implements the same protocol by gathering through a block table.

Stores check what they are asked: writing past a reservation, leaving a gap, or reading a
position that was never written raise `InfersimError`, so a scheduler bug shows up as an error
and not as silently wrong tokens.

References: Kwon et al. 2023, "Efficient Memory Management for Large Language Model Serving with
PagedAttention" (SOSP); Hugging Face transformers `StaticCache` (one fixed buffer per sequence).
"""

from __future__ import annotations

from collections.abc import Hashable

import numpy as np

from sim.core.errors import InfersimError
from sim.model.kv_quant import KVCodec


class ContiguousKVStore:
    """One preallocated `[n_layer, 2, num_tokens, n_kv_head, d_head]` array per sequence.

    `read` returns views into the store: valid until the next `write`/`truncate`/`free` of that
    sequence, and not to be modified by the caller. With a `codec` (`sim.model.kv_quant`) it keeps
    what a quantized cache would return: each written vector quantized and dequantized.
    """

    def __init__(self, n_layer: int, n_kv_head: int, d_head: int,
                 dtype: str | np.dtype = "float32", codec: KVCodec | None = None) -> None:
        for key, value in (("n_layer", n_layer), ("n_kv_head", n_kv_head), ("d_head", d_head)):
            if not isinstance(value, int) or value <= 0:
                raise InfersimError(f"ContiguousKVStore: {key} must be a positive int, got {value!r}")
        self.n_layer = n_layer
        self.n_kv_head = n_kv_head
        self.d_head = d_head
        self.dtype = np.dtype(dtype)
        self.codec = codec
        self._kv: dict[Hashable, np.ndarray] = {}
        self._num_written: dict[Hashable, np.ndarray] = {}  # per layer: positions 0..n-1 valid

    # ------------------------------------------------------------------ reservations
    def allocate(self, seq_id: Hashable, num_tokens: int) -> None:
        """Reserve room for `num_tokens` positions of a new sequence."""
        if seq_id in self._kv:
            raise InfersimError(f"KV store: sequence {seq_id!r} is already allocated; free it "
                                "first or call grow()")
        if not isinstance(num_tokens, int | np.integer) or num_tokens < 0:
            raise InfersimError(f"KV store: num_tokens must be a non-negative int, got "
                                f"{num_tokens!r}")
        shape = (self.n_layer, 2, int(num_tokens), self.n_kv_head, self.d_head)
        self._kv[seq_id] = np.zeros(shape, dtype=self.dtype)  # [n_layer, 2, n_tok, n_kv, d_head]
        self._num_written[seq_id] = np.zeros(self.n_layer, dtype=np.int64)  # [n_layer]

    def grow(self, seq_id: Hashable, num_tokens: int) -> None:
        """Enlarge a sequence's reservation to `num_tokens` positions, keeping its contents."""
        old = self._get(seq_id)
        if num_tokens <= old.shape[2]:
            return
        shape = (self.n_layer, 2, int(num_tokens), self.n_kv_head, self.d_head)
        new = np.zeros(shape, dtype=self.dtype)  # [n_layer, 2, n_tok, n_kv, d_head]
        new[:, :, : old.shape[2]] = old
        self._kv[seq_id] = new

    def free(self, seq_id: Hashable) -> None:
        """Drop a sequence and its reservation."""
        self._get(seq_id)
        del self._kv[seq_id]
        del self._num_written[seq_id]

    def has(self, seq_id: Hashable) -> bool:
        return seq_id in self._kv

    def capacity(self, seq_id: Hashable) -> int:
        """Positions reserved for `seq_id`."""
        return int(self._get(seq_id).shape[2])

    def num_tokens(self, seq_id: Hashable) -> int:
        """Positions written in every layer (the KV that exists for this sequence)."""
        return int(self._num_written_of(seq_id).min())

    def truncate(self, seq_id: Hashable, num_tokens: int) -> None:
        """Forget positions `num_tokens..` (e.g. rejected speculative tokens); keeps the room."""
        written = self._num_written_of(seq_id)
        if num_tokens < 0:
            raise InfersimError(f"KV store: cannot truncate {seq_id!r} to {num_tokens} tokens")
        np.minimum(written, num_tokens, out=written)

    @property
    def num_sequences(self) -> int:
        return len(self._kv)

    # ------------------------------------------------------------------ KVStore protocol
    def write(self, seq_id: Hashable, layer: int, start_pos: int, k: np.ndarray,
              v: np.ndarray) -> None:
        kv = self._get(seq_id)
        written = self._num_written[seq_id]
        if not 0 <= layer < self.n_layer:
            raise InfersimError(f"KV store: layer {layer} out of range 0..{self.n_layer - 1}")
        end = check_write(seq_id, layer, start_pos, k, v, (self.n_kv_head, self.d_head),
                          int(written[layer]), kv.shape[2], "reservation")
        if self.codec is not None:
            k = self.codec.round_trip(k, self.dtype)  # [n_new, n_kv, d_head]
            v = self.codec.round_trip(v, self.dtype)  # [n_new, n_kv, d_head]
        kv[layer, 0, start_pos:end] = k
        kv[layer, 1, start_pos:end] = v
        written[layer] = end  # later positions, if any, are stale now

    def read(self, seq_id: Hashable, layer: int, end_pos: int) -> tuple[np.ndarray, np.ndarray]:
        kv = self._get(seq_id)
        written = int(self._num_written[seq_id][layer])
        if end_pos > written or end_pos < 0:
            raise InfersimError(
                f"KV store: reading positions 0..{end_pos - 1} of sequence {seq_id!r} layer "
                f"{layer}, but only 0..{written - 1} are written")
        return kv[layer, 0, :end_pos], kv[layer, 1, :end_pos]  # [end_pos, n_kv, d_head] x2

    # ------------------------------------------------------------------ helpers
    def _get(self, seq_id: Hashable) -> np.ndarray:
        kv = self._kv.get(seq_id)
        if kv is None:
            raise InfersimError(f"KV store: sequence {seq_id!r} is not allocated; call "
                                "allocate(seq_id, num_tokens) first")
        return kv

    def _num_written_of(self, seq_id: Hashable) -> np.ndarray:
        self._get(seq_id)
        return self._num_written[seq_id]


def check_write(seq_id: Hashable, layer: int, start_pos: int, k: np.ndarray, v: np.ndarray,
                head_shape: tuple[int, int], num_written: int, capacity: int,
                what: str) -> int:
    """Validate a KV write (shapes, room, no gap) for any store; the end position."""
    n_new = k.shape[0]
    expected = (n_new, *head_shape)
    if k.shape != expected or v.shape != expected:
        raise InfersimError(f"KV store: k/v must have shape {expected}, got {k.shape} and "
                            f"{v.shape}")
    end = start_pos + n_new
    if start_pos < 0 or end > capacity:
        raise InfersimError(
            f"KV store: writing positions {start_pos}..{end - 1} of sequence {seq_id!r} goes "
            f"past its {what} of {capacity} tokens; the cache manager must allocate first")
    if start_pos > num_written:
        raise InfersimError(
            f"KV store: writing sequence {seq_id!r} layer {layer} at position {start_pos} "
            f"would leave a gap (positions 0..{num_written - 1} are written)")
    return end
