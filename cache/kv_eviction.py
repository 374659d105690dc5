"""KV compression by eviction: attention reads only the positions a policy keeps.

Three policies, each a budget of kept positions per sequence (and per layer for H2O):

- `sliding_window` (Mistral): the last `window` positions.
- `streaming_llm` (attention sinks): the first `sinks` positions plus the last `window`.
- `h2o` (heavy hitters): the last `window` positions plus the `heavy` older positions with the
  largest attention accumulated so far. Scores are the real attention probabilities of the
  functional model, summed over query heads, kept per sequence and per layer; each new token
  first attends to the kept set plus itself, then, if the set exceeds `heavy + window`, the
  non-recent position with the least accumulated attention is evicted for good.

Functional side (`EvictingModel`): a wrapper around a `NumpyModel` whose `forward_step` masks
attention to the kept positions. Every query is treated as if decoded token by token (a prompt
token at position p sees what a decode step at p would), so prefill and decode agree and
teacher-forced quality measures equal what generation sees.

Sliding window and StreamingLLM keep a block-aligned-enough set (a prefix of sinks and a suffix
window): over the paged store (`cache.paged_store`), the paged manager releases every block that
lies entirely past the sinks and before the oldest position any later query can read, back to
the pool (its table entry becomes -1), and attention gathers only the kept positions
(`kept_positions`, `PagedKVStore.read_positions`). H2O's kept set is scattered over the whole
sequence (heavy hitters anywhere), so no block is ever surely dead: H2O stays masked over a
contiguous NumPy store that keeps evicted K/V (never read), and the paged manager only caps its
accounting at `held_blocks` (the budget in blocks, plus one for the window's partly evicted edge).

Timing / capacity side: memory stops growing once the budget is full (really so for the two
block-freeing policies); `EvictedContextCost` prices decode attention over the kept tokens only
(`min(context, budget)`).

References: Jiang et al. 2023 (Mistral 7B, sliding window attention); Xiao et al. 2023
(StreamingLLM, "Efficient Streaming Language Models with Attention Sinks", 4 sink tokens);
Zhang et al. 2023 (H2O, "Heavy-Hitter Oracle", accumulated attention scores).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cache.kv_store import KVStore
from cache.paged_store import PagedKVStore
from sim.errors import ConfigError

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

    def held_blocks(self, num_tokens: int, block_size: int) -> int:
        """Blocks a sequence of `num_tokens` holds: all of them until the budget is full, then
        the budget in blocks plus one (the block at the window's old edge is partly evicted)."""
        full = -(-num_tokens // block_size)
        return min(full, -(-self.budget // block_size) + 1)

    @property
    def frees_blocks(self) -> bool:
        """Whether dead blocks can be released (sliding / streaming: not H2O)."""
        return self.policy != "h2o"

    @property
    def num_sinks(self) -> int:
        """Leading positions always kept (StreamingLLM's sinks; 0 otherwise)."""
        return self.sinks if self.policy == "streaming_llm" else 0

    def max_held_blocks(self, num_prompt_tokens: int, max_len: int, block_size: int) -> int:
        """Most blocks a request ever holds when dead blocks are released: its whole prompt
        (prefilled at once) or, decoding, the sink blocks plus the blocks a window can span."""
        full = -(-max_len // block_size)
        if not self.frees_blocks:
            return self.held_blocks(max_len, block_size)
        steady = -(-self.num_sinks // block_size) + (self.window - 1 + block_size - 1) // block_size + 1
        return min(full, max(-(-num_prompt_tokens // block_size), steady))

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


def masked_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray,
                     allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`sim.layers.attention` with an explicit mask `[n_q, n_k]`; also returns the attention
    probabilities summed over query heads `[n_q, n_k]` (H2O's scores)."""
    n_q, n_head, d_head = q.shape
    n_kv_head = k.shape[1]
    group = n_head // n_kv_head
    qh = q.reshape(n_q, n_kv_head, group, d_head).transpose(1, 2, 0, 3)  # [n_kv, g, n_q, d]
    kh = k.transpose(1, 2, 0)[:, None]  # [n_kv, 1, d, n_k]
    vh = v.transpose(1, 0, 2)[:, None]  # [n_kv, 1, n_k, d]
    scores = (qh @ kh) * q.dtype.type(1.0 / math.sqrt(d_head))  # [n_kv, g, n_q, n_k]
    scores = np.where(allowed, scores, -np.inf)  # [n_kv, g, n_q, n_k]
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    out = scores @ vh  # [n_kv, g, n_q, d]
    heads = scores.sum(axis=(0, 1))  # [n_q, n_k]
    return out.transpose(2, 0, 1, 3).reshape(n_q, n_head * d_head), heads


@dataclass
class _H2OState:
    """One sequence's H2O bookkeeping, per layer."""

    kept: list[np.ndarray] = field(default_factory=list)  # per layer [n_pos] bool
    score: list[np.ndarray] = field(default_factory=list)  # per layer [n_pos] float64


class EvictingModel:
    """A `NumpyModel` whose attention reads only the positions `eviction` keeps."""

    def __init__(self, model: Any, eviction: KVEviction) -> None:
        self.model = model
        self.eviction = eviction
        self.config = model.config
        self.dtype = model.dtype
        self._h2o: dict[Hashable, _H2OState] = {}

    def release(self, seq_id: Hashable) -> None:
        self._h2o.pop(seq_id, None)

    def forward(self, token_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Logits `[n, n_vocab]` of one sequence under eviction (a throwaway contiguous store)."""
        from cache.kv_store import ContiguousKVStore
        from sim.numpy_model import SeqChunk

        c = self.config
        ids = np.asarray(token_ids, dtype=np.int64)  # [n]
        store = ContiguousKVStore(c.n_layer, c.n_kv_head, c.d_head, self.dtype)
        store.allocate("eval", ids.shape[0])
        try:
            return self.forward_step([SeqChunk("eval", ids, 0, ids.shape[0])], store)
        finally:
            self.release("eval")

    def forward_step(self, chunks: Sequence[Any], kv: KVStore) -> np.ndarray:
        """`NumpyModel.forward_step` with evicted positions masked out of attention."""
        m = self.model
        if not chunks:
            return np.empty((0, self.config.n_vocab), dtype=self.dtype)  # [0, n_vocab]
        ids_list = [np.asarray(ch.token_ids, dtype=np.int64) for ch in chunks]  # [n_new] each
        starts = np.cumsum([0] + [len(i) for i in ids_list])  # [n_chunk + 1]
        positions = np.concatenate([np.arange(ch.start_pos, ch.start_pos + len(i))
                                    for ch, i in zip(chunks, ids_list, strict=True)])  # [n_tok]
        rows = np.concatenate([np.arange(starts[j + 1] - ch.num_logits, starts[j + 1])
                               for j, ch in enumerate(chunks)])  # [sum(num_logits)]
        if self.eviction.policy == "h2o":
            for ch in chunks:
                self._h2o_truncate(ch.seq_id, ch.start_pos)

        def attend(layer: int, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
            out = np.empty((q.shape[0], q.shape[1] * q.shape[2]), dtype=q.dtype)  # [n_tok, q_dim]
            for j, ch in enumerate(chunks):
                lo, hi = starts[j], starts[j + 1]
                kv.write(ch.seq_id, layer, ch.start_pos, k[lo:hi], v[lo:hi])
                if isinstance(kv, PagedKVStore) and self.eviction.frees_blocks:
                    k_pos = self.eviction.kept_positions(ch.start_pos, ch.start_pos + hi - lo)
                    k_seq, v_seq = kv.read_positions(ch.seq_id, layer, k_pos)  # [n_kept, ..] x2
                    allowed = self.eviction.mask(positions[lo:hi], k_pos)  # [n_q, n_kept]
                    out[lo:hi] = masked_attention(q[lo:hi], k_seq, v_seq, allowed)[0]
                    continue
                k_seq, v_seq = kv.read(ch.seq_id, layer, ch.start_pos + hi - lo)  # [n_k, ..] x2
                if self.eviction.policy == "h2o":
                    out[lo:hi] = self._h2o_attend(ch.seq_id, layer, q[lo:hi], k_seq, v_seq,
                                                  positions[lo:hi])
                else:
                    allowed = self.eviction.static_mask(positions[lo:hi], k_seq.shape[0])
                    out[lo:hi] = masked_attention(q[lo:hi], k_seq, v_seq, allowed)[0]
            return out

        x = m._run_layers(np.concatenate(ids_list), positions, attend)  # [n_tok, n_embd]
        return m._logits(x[rows])  # [sum(num_logits), n_vocab]

    # ------------------------------------------------------------------ H2O
    def _h2o_truncate(self, seq_id: Hashable, start_pos: int) -> None:
        state = self._h2o.get(seq_id)
        if state is None or not state.kept:
            self._h2o[seq_id] = _H2OState([np.zeros(0, bool)] * self.config.n_layer,
                                          [np.zeros(0)] * self.config.n_layer)
            return
        if start_pos == 0:  # recomputed from scratch (preemption by recompute)
            self._h2o.pop(seq_id)
            self._h2o_truncate(seq_id, 0)
        elif start_pos != state.kept[0].shape[0]:
            raise ConfigError(f"h2o eviction: sequence {seq_id!r} resumes at {start_pos} but its "
                              f"scores cover {state.kept[0].shape[0]} positions (prefix caching "
                              "and forks are not supported with kv_eviction)")

    def _h2o_attend(self, seq_id: Hashable, layer: int, q: np.ndarray, k: np.ndarray,
                    v: np.ndarray, q_pos: np.ndarray) -> np.ndarray:
        """Token by token: attend to the kept set plus itself, add the probabilities to the
        scores, then evict the least-scored non-recent position if over budget."""
        ev = self.eviction
        state = self._h2o[seq_id]
        n_k = k.shape[0]
        kept = np.zeros(n_k, dtype=bool)  # [n_k]
        kept[: state.kept[layer].shape[0]] = state.kept[layer]
        score = np.zeros(n_k)  # [n_k]
        score[: state.score[layer].shape[0]] = state.score[layer]
        out = np.empty((q.shape[0], q.shape[1] * q.shape[2]), dtype=q.dtype)  # [n_q, q_dim]
        for i, p in enumerate(q_pos.tolist()):
            kept[p] = True
            out[i: i + 1], heads = masked_attention(q[i: i + 1], k, v, kept[None, :])
            score += heads[0]
            if int(kept.sum()) > ev.budget:
                old = np.flatnonzero(kept[: max(p + 1 - ev.window, 0)])  # [n_old]
                kept[old[np.argmin(score[old])]] = False
        state.kept[layer], state.score[layer] = kept, score
        return out


class EvictedContextCost:
    """A cost model whose attention context is capped at the eviction budget."""

    def __init__(self, inner: Any, budget: int) -> None:
        self.inner = inner
        self.budget = budget
        self.base = getattr(inner, "base", inner)

    def step_time_s(self, num_new_tokens: Sequence[int], num_context_tokens: Sequence[int],
                    *args: Any, **kwargs: Any) -> float:
        capped = tuple(min(int(c), self.budget) for c in num_context_tokens)
        return float(self.inner.step_time_s(num_new_tokens, capped, *args, **kwargs))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
