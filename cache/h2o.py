"""H2O heavy-hitter KV eviction: per-layer kept sets, scored by the model's real attention.

H2O keeps, per sequence and per layer, the last `window` positions plus the `heavy` older
positions with the largest attention accumulated so far (summed over query heads and over every
query that read them). Each new token first attends to the kept set plus itself, its attention
probabilities are added to the scores, then, if the set exceeds `budget = heavy + window`, the
non-recent position with the least accumulated score (the oldest on a tie) is evicted for good.

Two implementations of the same policy:

- `h2o_attend_slots` (what the engine runs, over `sim.model.paged_store.PagedKVStore`): the kept
  K/V live in the first *slots* of the sequence's block table (slot `i` is token offset `i`
  through the table, not position `i`), with a per-layer slot -> position map in `H2OSlots`.
  Every layer keeps exactly `min(num_tokens, budget)` positions after each token, so all layers
  use the same number of slots. A step writes its `n` new tokens into the slots after the `m`
  kept ones (writes come before the token-by-token evictions, so it needs `m + n` slots), reads
  only those `m + n` live slots through the block table, and ends by *compacting* each layer:
  the kept entries move, in position order, to slots `0..kept-1`. Every slot from `kept` on is
  then dead in all layers, so the paged manager (`cache.paged`) releases the tail blocks past
  them back to the pool, and holds `ceil((min(start, budget) + n) / block_size)` blocks for a
  step from `start`.
- `h2o_attend_masked` (the reference, over a contiguous store that keeps every position):
  attention over all positions with a kept mask `H2OMasked`. Tests check the two give the same
  tokens and (to rounding) the same logits.

References: Zhang et al. 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of
Large Language Models" (NeurIPS; accumulated attention scores, recent window + heavy hitters);
Kwon et al., SOSP'23 (PagedAttention block tables the slots live in).
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass

import numpy as np

from sim.model.paged_store import PagedKVStore


def masked_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray,
                     allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`sim.model.layers.attention` with an explicit mask `[n_q, n_k]`; also returns the attention
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
class H2OSlots:
    """One sequence's H2O state over KV slots: per layer, the position each live slot holds
    (ascending: slot order is position order) and its accumulated attention."""

    num_tokens: int  # positions computed so far (the next step starts here)
    pos: list[np.ndarray]  # per layer [n_live] int64, n_live = min(num_tokens, budget)
    score: list[np.ndarray]  # per layer [n_live] float64

    @classmethod
    def empty(cls, n_layer: int) -> H2OSlots:
        return cls(0, [np.zeros(0, dtype=np.int64)] * n_layer, [np.zeros(0)] * n_layer)


@dataclass
class H2OMasked:
    """The reference's state: per layer, a kept flag and a score for every position so far."""

    kept: list[np.ndarray]  # per layer [num_tokens] bool
    score: list[np.ndarray]  # per layer [num_tokens] float64

    @classmethod
    def empty(cls, n_layer: int) -> H2OMasked:
        return cls([np.zeros(0, dtype=bool)] * n_layer, [np.zeros(0)] * n_layer)

    @property
    def num_tokens(self) -> int:
        return int(self.kept[0].shape[0]) if self.kept else 0


def h2o_attend_slots(budget: int, window: int, state: H2OSlots, layer: int, q: np.ndarray,
                     k: np.ndarray, v: np.ndarray, q_pos: np.ndarray, store: PagedKVStore,
                     seq_id: Hashable) -> np.ndarray:
    """Attention `[n_q, n_head * d_head]` of one sequence's new tokens at positions `q_pos`
    under H2O, reading and writing only its live slots in the paged `store`; the layer's kept
    entries end compacted into slots `0..kept-1`."""
    m = state.pos[layer].shape[0]  # live slots before this step: min(start, budget)
    n = q.shape[0]
    store.write(seq_id, layer, m, k, v)  # new tokens into slots m..m+n-1
    k_live, v_live = store.read(seq_id, layer, m + n)  # [m + n, n_kv, d_head] x2
    slot_pos = np.concatenate([state.pos[layer], q_pos.astype(np.int64)])  # [m + n]
    score = np.concatenate([state.score[layer], np.zeros(n)])  # [m + n]
    live = np.zeros(m + n, dtype=bool)  # [m + n]
    live[:m] = True
    out = np.empty((n, q.shape[1] * q.shape[2]), dtype=q.dtype)  # [n, q_dim]
    # until the budget is full nothing is evicted: those queries attend in one causal call
    n0 = min(n, max(budget - m, 0))
    if n0:
        live[: m + n0] = True
        allowed = np.arange(m + n0)[None, :] <= m + np.arange(n0)[:, None]  # [n0, m + n0]
        out[:n0], heads = masked_attention(q[:n0], k_live[: m + n0], v_live[: m + n0], allowed)
        score[: m + n0] += heads.sum(axis=0)
    for i in range(n0, n):  # then each token evicts one older position
        s = m + i  # this token's slot
        live[s] = True
        out[i: i + 1], heads = masked_attention(q[i: i + 1], k_live[: s + 1], v_live[: s + 1],
                                                live[None, : s + 1])
        score[: s + 1] += heads[0]
        old = np.flatnonzero(live[:s] & (slot_pos[:s] <= int(q_pos[i]) - window))  # [n_old]
        live[old[np.argmin(score[old])]] = False
    keep = np.flatnonzero(live)  # [n_kept] ascending slots
    store.compact(seq_id, layer, keep)
    state.pos[layer], state.score[layer] = slot_pos[keep], score[keep]
    return out


def h2o_attend_masked(budget: int, window: int, state: H2OMasked, layer: int, q: np.ndarray,
                      k: np.ndarray, v: np.ndarray, q_pos: np.ndarray) -> np.ndarray:
    """The reference: keys `k`, `v` `[n_k, ...]` are every position so far; token by token,
    attend to the kept set plus itself, add the probabilities to the scores, then evict the
    least-scored non-recent position if over budget."""
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
        if int(kept.sum()) > budget:
            old = np.flatnonzero(kept[: max(p + 1 - window, 0)])  # [n_old]
            kept[old[np.argmin(score[old])]] = False
    state.kept[layer], state.score[layer] = kept, score
    return out
