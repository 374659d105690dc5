"""Token trees: several candidate continuations verified in one target pass.

A tree is given by its branching factors `[b_1, ..., b_d]`: the root (the sequence's last
committed token) gets `b_1` children, each depth-1 node `b_2` children, and so on, so the tree
has `b_1 + b_1 b_2 + ... + b_1...b_d` nodes and any root-to-leaf path drafts `d` tokens. Nodes
are numbered breadth-first; `parents[i]` is the parent node of node i (-1: the root).

The tree is flattened into one chunk: node i sits at *position* `start + depth(i)` (its RoPE
angle and the position it takes if accepted) but in KV *slot* `start + 1 + i`; a tree attention
mask lets a node see the committed context, its ancestors and itself only (SpecInfer's
topology-aware causal mask). One target pass scores the root and every node.

Verification walks down from the root:

- **greedy**: go to the child whose token equals the target's arg-max at the current node; at
  the first node with no such child (or at a leaf) emit the target's arg-max. The result is
  exactly the target's greedy continuation.
- **sampled** (SpecInfer's multi-step speculative sampling, Miao et al. 2024, Algorithm 2 /
  Theorem 4.2; the multi-candidate form of Yang et al. 2024): at a node with target
  distribution `p`, try its children in order; child x drawn from q is kept with probability
  `min(1, p(x) / q(x))`; on a rejection `p <- norm(max(p - q, 0))` and the next child is tried;
  if all are rejected a token is drawn from the last residual and the step ends; at an accepted
  leaf the bonus token is drawn from its `p`. Exact when the children are i.i.d. draws from the
  same q (sampled drafts), or distinct deterministic tokens with q one-hot (greedy drafts).

References: Miao et al., "SpecInfer: Accelerating Large Language Model Serving with Tree-based
Speculative Inference and Verification" (ASPLOS 2024); Cai et al. 2024 (Medusa, tree attention);
Li et al. 2024 (EAGLE, draft trees); Yang et al. 2024, "Multi-Candidate Speculative Decoding".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sim.core.errors import ConfigError
from speculative.verify import accept_prob, draw, residual_probs

#: nodes one token tree may have: every verification step builds a `[nodes, nodes]` mask and
#: scores every node, and Medusa / EAGLE trees have ~60 nodes, SpecInfer's a few hundred
MAX_TREE_NODES = 1024


@dataclass(frozen=True)
class TreeShape:
    """The topology of a token tree from its branching factors (see module doc)."""

    branching: tuple[int, ...]

    def __post_init__(self) -> None:
        b = tuple(self.branching)
        if not b or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in b):
            raise ConfigError(f"a token tree needs branching factors >= 1 per level, e.g. "
                              f"[2, 2, 1], got {list(b)[:16]}")
        if len(b) > MAX_TREE_NODES:
            raise ConfigError(f"a token tree of depth {len(b):,} has more than "
                              f"{MAX_TREE_NODES} nodes; use a few levels, e.g. [2, 2, 1]")
        num_nodes, level = 0, 1  # closed form in Python ints: no overflow, no allocation
        for x in b:
            level *= x
            num_nodes += level
            if num_nodes > MAX_TREE_NODES:
                break
        if num_nodes > MAX_TREE_NODES:
            raise ConfigError(
                f"the token tree {list(b)[:16]} has more than {MAX_TREE_NODES} nodes "
                f"(its attention mask is nodes^2 booleans: {MAX_TREE_NODES} nodes are 1 MiB); "
                "Medusa and EAGLE use about 60, e.g. [4, 3, 2, 2]")
        object.__setattr__(self, "branching", b)

    @property
    def depth(self) -> int:
        return len(self.branching)

    @property
    def level_sizes(self) -> tuple[int, ...]:
        """Nodes at depth 1..d."""
        sizes, n = [], 1
        for b in self.branching:
            n *= b
            sizes.append(n)
        return tuple(sizes)

    @property
    def num_nodes(self) -> int:
        return sum(self.level_sizes)

    def parents(self) -> np.ndarray:
        """Parent of every node (-1: the root), breadth-first numbering `[num_nodes]`."""
        out: list[int] = []
        prev = [-1]
        base = 0
        for b in self.branching:
            level = [p for p in prev for _ in range(b)]
            out.extend(level)
            prev = list(range(base, base + len(level)))
            base += len(level)
        return np.asarray(out, dtype=np.int64)  # [num_nodes]


def depths(parents: np.ndarray) -> np.ndarray:
    """Depth of every node (children of the root: 1) `[num_nodes]`."""
    d = np.zeros(len(parents), dtype=np.int64)  # [num_nodes]
    for i, p in enumerate(parents):
        d[i] = 1 if p < 0 else d[p] + 1
    return d


def ancestors_mask(parents: np.ndarray) -> np.ndarray:
    """`[n, n]` True where node j is node i or one of its ancestors."""
    n = len(parents)
    mask = np.eye(n, dtype=bool)  # [n, n]
    for i, p in enumerate(parents):
        if p >= 0:
            mask[i] |= mask[p]
    return mask


def tree_chunk_layout(start: int, num_committed: int,
                      parents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions `[n_new]` and attention mask `[n_new, start + n_new]` for a chunk of
    `num_committed` ordinary tokens at `start..` followed by the tree's nodes (parents index
    nodes; -1 is the last committed token)."""
    n = len(parents)
    n_new = num_committed + n
    root_pos = start + num_committed - 1
    positions = np.concatenate([np.arange(start, start + num_committed),
                                root_pos + depths(parents)])  # [n_new]
    mask = np.zeros((n_new, start + n_new), dtype=bool)  # [n_new, n_keys]
    for r in range(num_committed):
        mask[r, : start + r + 1] = True
    mask[num_committed:, : start + num_committed] = True
    mask[num_committed:, start + num_committed:] = ancestors_mask(parents)
    return positions, mask


@dataclass(frozen=True, slots=True)
class TreeVerified:
    """Emitted tokens (accepted path + one target token) and the accepted nodes, root first."""

    token_ids: tuple[int, ...]
    path: tuple[int, ...]

    @property
    def num_accepted(self) -> int:
        return len(self.path)


def _children(parents: np.ndarray) -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for i, p in enumerate(parents):
        kids.setdefault(int(p), []).append(i)
    return kids


def tree_verify_greedy(tokens: Sequence[int], parents: np.ndarray,
                       target_logits: np.ndarray) -> TreeVerified:
    """`target_logits` `[1 + n, n_vocab]`: row 0 after the root, row 1 + i after node i."""
    _check(tokens, parents, target_logits)
    kids = _children(parents)
    node, path, out = -1, list[int](), list[int]()
    while True:
        best = int(np.argmax(target_logits[node + 1]))
        nxt = next((c for c in kids.get(node, []) if int(tokens[c]) == best), None)
        out.append(best)
        if nxt is None:
            return TreeVerified(tuple(out), tuple(path))
        path.append(nxt)
        node = nxt


def tree_verify_sampled(tokens: Sequence[int], parents: np.ndarray, target_probs: np.ndarray,
                        draft_probs: np.ndarray | None,
                        rng: np.random.Generator) -> TreeVerified:
    """SpecInfer's multi-step speculative sampling. `target_probs` `[1 + n, n_vocab]` (row 0:
    the root); `draft_probs` `[1 + n, n_vocab]` the q each node's children were drawn from
    i.i.d. (None: deterministic distinct children, q one-hot)."""
    _check(tokens, parents, target_probs)
    kids = _children(parents)
    node, path, out = -1, list[int](), list[int]()
    while True:
        p = np.asarray(target_probs[node + 1], dtype=np.float64)  # [n_vocab]
        q = None if draft_probs is None else draft_probs[node + 1]  # [n_vocab]
        nxt = None
        for c in kids.get(node, []):
            x = int(tokens[c])
            if rng.random() < accept_prob(p, q, x):
                nxt = c
                break
            p = residual_probs(p, q, x)  # [n_vocab]
        if nxt is None:
            out.append(draw(p, rng))
            return TreeVerified(tuple(out), tuple(path))
        out.append(int(tokens[nxt]))
        path.append(nxt)
        node = nxt


def _check(tokens: Sequence[int], parents: np.ndarray, target: np.ndarray) -> None:
    n = len(parents)
    if len(tokens) != n or np.ndim(target) != 2 or np.shape(target)[0] != n + 1:
        raise ConfigError(f"a tree of {n} nodes needs {n} tokens and {n + 1} target rows (root "
                          f"+ nodes), got {len(tokens)} tokens, rows of shape {np.shape(target)}")
    if any(p >= i for i, p in enumerate(parents)):
        raise ConfigError("tree parents must precede their children (breadth-first numbering)")
