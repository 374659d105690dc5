"""KV compression by eviction: attention reads only the positions a policy keeps.

Three policies, each a budget of kept positions per sequence (and per layer for H2O):

- `sliding_window` (Mistral): the last `window` positions.
- `streaming_llm` (attention sinks): the first `sinks` positions plus the last `window`.
- `h2o` (heavy hitters): the last `window` positions plus the `heavy` older positions with the
  largest attention accumulated so far (`cache.h2o`). Scores are the real attention
  probabilities of the functional model, summed over query heads, kept per sequence and per
  layer; each new token first attends to the kept set plus itself, then, if the set exceeds
  `heavy + window`, the non-recent position with the least accumulated attention is evicted.

Functional side (`EvictingModel`): a wrapper around a `NumpyModel` whose `forward_step` lets
attention read only the kept positions. Every query is treated as if decoded token by token (a
prompt token at position p sees what a decode step at p would), so prefill and decode agree and
teacher-forced quality measures equal what generation sees.

All three release evicted KV back to the block pool over the paged store (`sim.model.paged_store`):

- Sliding window and StreamingLLM keep a prefix of sinks and a suffix window, indexed by
  position: the paged manager releases every block that lies entirely past the sinks and before
  the oldest position any later query can read (its table entry becomes -1), and attention
  gathers only the kept positions (`kept_positions`, `PagedKVStore.read_positions`).
- H2O's kept set is scattered and differs per layer, so its KV lives in *slots* instead: the
  kept entries are compacted, after every step, into the first `min(num_tokens, budget)` slots
  of the block table (`PagedKVStore.compact`), a step's new tokens go into the slots after them,
  and attention reads only those live slots. The manager holds `step_blocks` blocks for a step
  and releases the tail blocks past them (`num_slots`, `cache.h2o`).

Over a contiguous store (`EvictingModel.forward`, `cache.kv_quality.eviction_logits(...,
block_size=None)`) nothing is freed: evicted positions stay in the store and are masked out.
That path is the reference the paged paths are tested against.

Eviction composes with 8-bit KV (`kv_cache_dtype`, `sim.model.kv_quant`): the paged store keeps
codes and per-token, per-head scales, `read_positions` and H2O's slot reads decode, and
`compact` moves the scales with the codes, so attention reads exactly the quantize-dequantized
K/V a contiguous store with the same codec keeps. It also composes with swap preemption: the
paged manager swaps out only the kept blocks, and H2O's slot state (`H2OSlots`) stays with the
sequence here, since a swap brings the KV contents back (a recompute, from position 0, starts
the state afresh).

Timing / capacity side: the manager's arithmetic is the same in timing-only runs (no store), so
memory stops growing once the budget is full; the cost model prices attention over the kept
tokens only (`sim.timing.cost_model.CostModel(kv_context_cap_tokens=budget)`: each sequence's
context read is `min(context, budget)`).

References: Jiang et al. 2023 (Mistral 7B, sliding window attention); Xiao et al. 2023
(StreamingLLM, "Efficient Streaming Language Models with Attention Sinks", 4 sink tokens);
Zhang et al. 2023 (H2O, "Heavy-Hitter Oracle", accumulated attention scores).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cache.h2o import H2OMasked, H2OSlots, h2o_attend_masked, h2o_attend_slots, masked_attention
from sim.core.errors import ConfigError
from sim.core.protocols import KVStore
from sim.model.kv_quant import KVCodec
from sim.model.paged_store import PagedKVStore

#: the one list of `kv_eviction` choices (`EngineArgs` and the CLI take theirs from it)
KV_EVICTION_POLICIES = ("sliding_window", "streaming_llm", "h2o")


@dataclass(frozen=True, slots=True)
class KVEviction:
    """An eviction policy and its budget (tokens)."""

    policy: str
    window: int
    sinks: int = 4
    heavy: int = 0

    def __post_init__(self) -> None:
        if self.policy not in KV_EVICTION_POLICIES:
            raise ConfigError(f"kv_eviction={self.policy!r} is not one of "
                              f"{', '.join(KV_EVICTION_POLICIES)}")
        if self.window < 1:
            raise ConfigError(f"kv_eviction_window must be >= 1 (recent tokens kept), got "
                              f"{self.window}")
        if self.sinks < 0 or self.heavy < 0:
            raise ConfigError(f"kv_eviction_sinks and kv_eviction_heavy must be >= 0, got "
                              f"{self.sinks}, {self.heavy}")
        if self.policy == "h2o" and self.heavy < 1:
            raise ConfigError("kv_eviction='h2o' needs kv_eviction_heavy >= 1 (heavy hitters "
                              "kept besides the recent window)")

    @property
    def budget(self) -> int:
        """Most positions attention reads per sequence (and layer)."""
        if self.policy == "streaming_llm":
            return self.sinks + self.window
        if self.policy == "h2o":
            return self.heavy + self.window
        return self.window

    @property
    def compacts(self) -> bool:
        """Whether the kept KV is compacted into the block table's first slots (H2O) instead
        of staying at its position (sliding window, StreamingLLM)."""
        return self.policy == "h2o"

    @property
    def num_sinks(self) -> int:
        """Leading positions always kept (StreamingLLM's sinks; 0 otherwise)."""
        return self.sinks if self.policy == "streaming_llm" else 0

    def num_slots(self, num_tokens: int) -> int:
        """Block-table slots that hold a sequence's KV once `num_tokens` tokens are computed:
        H2O's kept set is compacted into the first `min(num_tokens, budget)`; the positional
        policies address slots by position (their released blocks are -1 in the table)."""
        return min(num_tokens, self.budget) if self.compacts else num_tokens

    def step_blocks(self, start: int, num_tokens: int, block_size: int) -> int:
        """Blocks a step from `start` to `num_tokens` tokens needs (H2O: the kept slots plus the
        new tokens' slots, written before the step's evictions; all of them otherwise)."""
        return -(-(self.num_slots(start) + max(num_tokens - start, 0)) // block_size)

    def max_held_blocks(self, num_prompt_tokens: int, max_len: int, block_size: int) -> int:
        """Most blocks a request ever holds when dead blocks are released: its whole prompt
        (prefilled at once) or, decoding, the sink blocks plus the blocks a window can span
        (H2O: the budget plus the decoded token; a prompt chunk from `start` needs
        `min(start, budget) + n <= prompt` slots, so the prompt bounds every chunk)."""
        full = -(-max_len // block_size)
        prompt = -(-num_prompt_tokens // block_size)
        if self.compacts:
            return min(full, max(prompt, -(-(self.budget + 1) // block_size)))
        steady = -(-self.num_sinks // block_size) + (self.window - 1 + block_size - 1) // block_size + 1
        return min(full, max(prompt, steady))

    def kept_positions(self, first_query: int, end: int) -> np.ndarray:
        """Key positions `[n_kept]` that queries `first_query..end-1` may read (sliding /
        streaming): the sinks, then everything from the oldest query's window on."""
        sinks = min(self.num_sinks, end)
        start = max(first_query - self.window + 1, sinks)
        return np.concatenate([np.arange(sinks), np.arange(start, end)])  # [n_kept]

    def static_mask(self, q_pos: np.ndarray, num_keys: int) -> np.ndarray:
        """Boolean `[n_q, num_keys]`: which keys each query reads (sliding / streaming)."""
        return self.mask(q_pos, np.arange(num_keys))  # [n_q, n_k]

    def mask(self, q_pos: np.ndarray, k_pos: np.ndarray) -> np.ndarray:
        """Boolean `[n_q, n_k]`: which of the keys at `k_pos` each query reads."""
        allowed = k_pos[None, :] <= q_pos[:, None]  # [n_q, n_k]
        recent = k_pos[None, :] > q_pos[:, None] - self.window  # [n_q, n_k]
        if self.policy == "streaming_llm":
            recent |= k_pos[None, :] < self.sinks
        return allowed & recent


class EvictingModel:
    """A `NumpyModel` whose attention reads only the positions `eviction` keeps."""

    def __init__(self, model: Any, eviction: KVEviction) -> None:
        self.model = model
        self.eviction = eviction
        self.config = model.config
        self.dtype = model.dtype
        self._h2o: dict[Hashable, H2OSlots | H2OMasked] = {}

    def release(self, seq_id: Hashable) -> None:
        self._h2o.pop(seq_id, None)

    def forward(self, token_ids: Sequence[int] | np.ndarray,
                codec: KVCodec | None = None) -> np.ndarray:
        """Logits `[n, n_vocab]` of one sequence under eviction, masked over a throwaway
        contiguous store (the reference the paged paths are tested against); with a `codec`
        (`sim.model.kv_quant`) the store keeps each K/V vector quantized and dequantized."""
        from sim.model.kv_store import ContiguousKVStore
        from sim.model.numpy_model import SeqChunk

        c = self.config
        ids = np.asarray(token_ids, dtype=np.int64)  # [n]
        store = ContiguousKVStore(c.n_layer, c.n_kv_head, c.d_head, self.dtype, codec=codec)
        store.allocate("eval", ids.shape[0])
        try:
            return self.forward_step([SeqChunk("eval", ids, 0, ids.shape[0])], store)
        finally:
            self.release("eval")

    def forward_step(self, chunks: Sequence[Any], kv: KVStore) -> np.ndarray:
        """`NumpyModel.forward_step` where attention reads only the kept positions: gathered
        through the block table over a `PagedKVStore` (H2O: its live slots, `cache.h2o`),
        masked over any other store."""
        m = self.model
        ev = self.eviction
        if not chunks:
            return np.empty((0, self.config.n_vocab), dtype=self.dtype)  # [0, n_vocab]
        ids_list = [np.asarray(ch.token_ids, dtype=np.int64) for ch in chunks]  # [n_new] each
        starts = np.cumsum([0] + [len(i) for i in ids_list])  # [n_chunk + 1]
        positions = np.concatenate([np.arange(ch.start_pos, ch.start_pos + len(i))
                                    for ch, i in zip(chunks, ids_list, strict=True)])  # [n_tok]
        rows = np.concatenate([np.arange(starts[j + 1] - ch.num_logits, starts[j + 1])
                               for j, ch in enumerate(chunks)])  # [sum(num_logits)]
        paged = isinstance(kv, PagedKVStore)
        if ev.policy == "h2o":
            for ch, ids in zip(chunks, ids_list, strict=True):
                self._h2o_begin(ch.seq_id, ch.start_pos, len(ids), paged)

        def attend(layer: int, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
            out = np.empty((q.shape[0], q.shape[1] * q.shape[2]), dtype=q.dtype)  # [n_tok, q_dim]
            for j, ch in enumerate(chunks):
                lo, hi = starts[j], starts[j + 1]
                state = self._h2o.get(ch.seq_id)
                if isinstance(state, H2OSlots) and isinstance(kv, PagedKVStore):
                    out[lo:hi] = h2o_attend_slots(ev.budget, ev.window, state, layer, q[lo:hi],
                                                  k[lo:hi], v[lo:hi], positions[lo:hi], kv,
                                                  ch.seq_id)
                    continue
                kv.write(ch.seq_id, layer, ch.start_pos, k[lo:hi], v[lo:hi])
                if isinstance(kv, PagedKVStore):  # sliding / streaming: kept positions only
                    k_pos = ev.kept_positions(ch.start_pos, ch.start_pos + hi - lo)
                    k_seq, v_seq = kv.read_positions(ch.seq_id, layer, k_pos)  # [n_kept, ..] x2
                    allowed = ev.mask(positions[lo:hi], k_pos)  # [n_q, n_kept]
                    out[lo:hi] = masked_attention(q[lo:hi], k_seq, v_seq, allowed)[0]
                    continue
                k_seq, v_seq = kv.read(ch.seq_id, layer, ch.start_pos + hi - lo)  # [n_k, ..] x2
                if isinstance(state, H2OMasked):
                    out[lo:hi] = h2o_attend_masked(ev.budget, ev.window, state, layer, q[lo:hi],
                                                   k_seq, v_seq, positions[lo:hi])
                else:
                    allowed = ev.static_mask(positions[lo:hi], k_seq.shape[0])
                    out[lo:hi] = masked_attention(q[lo:hi], k_seq, v_seq, allowed)[0]
            return out

        x = m._run_layers(np.concatenate(ids_list), positions, attend)  # [n_tok, n_embd]
        return m._logits(x[rows])  # [sum(num_logits), n_vocab]

    def _h2o_begin(self, seq_id: Hashable, start_pos: int, num_new: int, paged: bool) -> None:
        """Check that a step resumes where the sequence's H2O state ends (a start at 0, a
        recompute after preemption, starts afresh), then advance it by the step's tokens."""
        state = self._h2o.get(seq_id)
        if state is None or start_pos == 0:
            kind = H2OSlots if paged else H2OMasked
            state = self._h2o[seq_id] = kind.empty(self.config.n_layer)
        if start_pos != state.num_tokens or isinstance(state, H2OSlots) != paged:
            raise ConfigError(f"h2o eviction: sequence {seq_id!r} resumes at {start_pos} but its "
                              f"scores cover {state.num_tokens} positions (prefix caching and "
                              "forks are not supported with kv_eviction; one sequence stays in "
                              "one kind of KV store)")
        if isinstance(state, H2OSlots):
            state.num_tokens = start_pos + num_new
