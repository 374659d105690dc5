"""Draft token trees: top-k branching of a NumPy draft model, one draft forward per tree level.

`TreeDraftProposer.propose_batch(requests, ks)` returns a `TreeDraft` per request: the tree of
`speculative.tree.TreeShape` (branching factors `[b_1, ..., b_d]`), its node tokens and, for
sampled requests, the draft distribution q at the root and every node. The draft first catches
up on the committed tokens it has not seen (as `DraftModelProposer`), then expands the tree
level by level: the nodes of one depth are one chunk with the tree attention mask and their
tree positions, so a level costs one draft forward for the whole batch. Children are the top
`b` tokens of the draft (greedy requests; distinct, deterministic) or `b` i.i.d. draws from the
draft's `sampling_probs` with the request's generator (sampled requests), which is what
SpecInfer's multi-step speculative sampling needs to stay exact. The draft's KV of the tree is
dropped after drafting (truncated to the committed context).

References: Miao et al. 2024 (SpecInfer, token tree expansion); Li et al. 2024 (EAGLE, top-k
draft trees); Cai et al. 2024 (Medusa).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sim.core.errors import ConfigError
from sim.core.request import Request
from sim.model.numpy_model import NumpyModel, SeqChunk
from sim.model.sampling import sampling_probs
from speculative.proposers import DraftModelProposer
from speculative.tree import TreeShape, ancestors_mask, depths
from speculative.verify import draw


@dataclass(frozen=True, slots=True)
class TreeDraft:
    """Node tokens `[n]`, parents `[n]` (-1: the root) and, for sampled drafts, the q each
    node's children came from `[1 + n, n_vocab]` (row 0: the root)."""

    token_ids: tuple[int, ...]
    parents: np.ndarray
    probs: np.ndarray | None = None


class TreeDraftProposer(DraftModelProposer):
    """A NumPy draft model expanding a token tree per request (see module doc)."""

    def __init__(self, model: NumpyModel, target_vocab: int, shape: TreeShape) -> None:
        super().__init__(model, target_vocab)
        self.shape = shape
        self.parents = shape.parents()  # [n]
        self._depths = depths(self.parents)  # [n]
        self._anc = ancestors_mask(self.parents)  # [n, n]

    def propose_batch(self, requests: Sequence[Request],  # type: ignore[override]
                      ks: Sequence[int]) -> list[TreeDraft]:
        n = self.shape.num_nodes
        for k in ks:
            if k not in (0, n):
                raise ConfigError(f"a token tree of {n} nodes is drafted whole, asked for {k}")
        active = [i for i, k in enumerate(ks) if k > 0]
        ctx_len: dict[int, int] = {}
        chunks = []
        for i in active:  # catch up on the committed tokens the draft has not seen
            chunk = self.catch_up(requests[i], n)
            ctx_len[i] = chunk.start_pos + len(chunk.token_ids)
            chunks.append(chunk)
        tokens = {i: np.zeros(n, dtype=np.int64) for i in active}  # [n] each
        probs: dict[int, np.ndarray] = {}
        first = 0  # first node of the level being expanded (-1 row: the root)
        for level, b in enumerate(self.shape.branching):
            logits = self.model.forward_step(chunks, self.store)  # [sum(num_logits), n_vocab]
            width = 1 if level == 0 else self.shape.level_sizes[level - 1]
            lo = first + (width if level else 0)  # first child node of this expansion
            rows = iter(logits)
            for i in active:
                req = requests[i]
                for w in range(width):
                    row = next(rows)  # [n_vocab]
                    node = -1 if level == 0 else first + w
                    kids = np.arange(lo + w * b, lo + (w + 1) * b)  # [b]
                    if req.sampling.greedy:
                        top = np.argsort(-np.asarray(row, dtype=np.float64), kind="stable")
                        tokens[i][kids] = top[:b]
                        continue
                    if req.rng is None:
                        raise ConfigError("a sampled request needs its random generator")
                    q = sampling_probs(row, req.sampling)  # [n_vocab]
                    probs.setdefault(i, np.zeros((1 + n, q.size)))[node + 1] = q
                    tokens[i][kids] = [draw(q, req.rng) for _ in range(b)]
            first = lo if level else 0
            if level + 1 == self.shape.depth:
                break
            nodes = np.arange(first, first + self.shape.level_sizes[level])  # [n_level]
            chunks = []
            for i in active:
                base = ctx_len[i]
                mask = np.zeros((nodes.size, base + int(nodes[-1]) + 1), dtype=bool)  # [m, keys]
                mask[:, :base] = True
                mask[:, base: base + int(nodes[-1]) + 1] = self._anc[nodes][:, : nodes[-1] + 1]
                chunks.append(SeqChunk(requests[i].request_id, tokens[i][nodes], base + first,
                                       num_logits=nodes.size,
                                       positions=base - 1 + self._depths[nodes], attn_mask=mask))
        out = []
        for i, k in enumerate(ks):
            if k <= 0:
                out.append(TreeDraft((), self.parents[:0]))
                continue
            self.store.truncate(requests[i].request_id, ctx_len[i])  # drop the tree's KV
            out.append(TreeDraft(tuple(int(t) for t in tokens[i]), self.parents, probs.get(i)))
        return out
