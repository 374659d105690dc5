"""Proposers: where draft tokens come from (`Proposer.propose(req, k) -> Draft`).

- `NgramProposer` (prompt lookup): copy the tokens that followed the latest earlier occurrence
  of the context's last n-gram (n from `prompt_lookup_max` down to `prompt_lookup_min`); no
  model, deterministic (`probs=None`), possibly fewer than k tokens.
- `DraftModelProposer`: a real NumPy model run autoregressively for k tokens with its own KV
  store per request. Greedy requests take the draft's arg-max; sampled ones draw from the
  draft's own `sampling_probs` with the request's generator and report those distributions (the
  `q` of rejection sampling). The store keeps the KV of the tokens it has seen; on the next call
  it reuses the longest prefix that still matches the request's committed tokens and
  recomputes the rest, so rejected draft positions are rolled back (`ContiguousKVStore.truncate`).
  `propose_batch` drafts for many requests with one forward per draft position.

Controlled proxies of a target, so acceptance emerges from real math and can be dialled:
`noisy_model` (weights + seeded Gaussian noise of a relative scale) and
`speculative.acceptance.truncated_model` (the first layers with the shared norm and head).

References: Saxena 2023 (prompt lookup decoding) and vLLM `vllm/v1/spec_decode/ngram_proposer.py`;
Leviathan et al. 2023 and Chen et al. 2023 (draft models); Zhang et al. 2024 (Draft & Verify,
layer-skipping self-speculation).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from sim.core.errors import ConfigError
from sim.core.request import Request
from sim.model.kv_store import ContiguousKVStore
from sim.model.numpy_model import NumpyModel, SeqChunk
from sim.model.sampling import sampling_probs
from sim.model.weights import DictSource, build_weights
from speculative.acceptance import ngram_propose
from speculative.verify import draw


@dataclass(frozen=True, slots=True)
class Draft:
    """Proposed tokens and, for sampled drafts, the distributions `[n, n_vocab]` they came from
    (None: deterministic, e.g. n-gram lookup or a greedy draft)."""

    token_ids: tuple[int, ...]
    probs: np.ndarray | None = None


class Proposer(Protocol):
    def propose(self, request: Request, k: int) -> Draft: ...

    def release(self, request: Request) -> None:
        """Drop whatever is held for a request that ended."""
        ...


def context_of(request: Request) -> list[int]:
    """The request's committed tokens (prompt + output)."""
    return request.token_ids_slice(0, request.num_tokens)


class NgramProposer:
    """Prompt lookup: drafts copied from the request's own context (no model)."""

    def __init__(self, prompt_lookup_min: int = 1, prompt_lookup_max: int = 3) -> None:
        self.min_n = prompt_lookup_min
        self.max_n = prompt_lookup_max

    def propose(self, request: Request, k: int) -> Draft:
        if k <= 0:
            return Draft(())
        found = ngram_propose(context_of(request), k, self.min_n, self.max_n)
        return Draft(tuple(int(t) for t in found))

    def propose_batch(self, requests: Sequence[Request], ks: Sequence[int]) -> list[Draft]:
        return [self.propose(r, k) for r, k in zip(requests, ks, strict=True)]

    def release(self, request: Request) -> None:
        return None


class DraftModelProposer:
    """A NumPy draft model with its own KV store (see module doc)."""

    def __init__(self, model: NumpyModel, target_vocab: int) -> None:
        if model.config.n_vocab != target_vocab:
            raise ConfigError(
                f"the draft {model.config.name} has a vocabulary of {model.config.n_vocab} but the "
                f"target has {target_vocab}; a draft must share the target's tokenizer (use "
                "draft_noise_scale / draft_num_layers for a proxy of the target itself)")
        c = model.config
        self.model = model
        self.store = ContiguousKVStore(c.n_layer, c.n_kv_head, c.d_head, model.dtype)
        self._seen: dict[str, list[int]] = {}  # tokens whose KV the store holds, per request

    def propose(self, request: Request, k: int) -> Draft:
        return self.propose_batch([request], [k])[0]

    def catch_up(self, req: Request, num_draft: int) -> SeqChunk:
        """The chunk that brings the draft's KV up to the request's committed tokens: rejected
        draft positions are rolled back, room is made for `num_draft` more."""
        ctx = context_of(req)
        rid = req.request_id
        common = 0
        for a, b in zip(self._seen.get(rid, []), ctx, strict=False):
            if a != b:
                break
            common += 1
        common = min(common, len(ctx) - 1)  # recompute at least the last token's logits
        need = len(ctx) + num_draft
        if not self.store.has(rid):
            self.store.allocate(rid, 2 * need)
        elif self.store.capacity(rid) < need:
            self.store.grow(rid, 2 * need)
        self.store.truncate(rid, common)  # roll back rejected draft positions
        self._seen[rid] = ctx
        new = np.asarray(ctx[common:], dtype=np.int64)  # [n_new]
        return SeqChunk(rid, new, common)

    def propose_batch(self, requests: Sequence[Request], ks: Sequence[int]) -> list[Draft]:
        active = [i for i, k in enumerate(ks) if k > 0]
        tokens: dict[int, list[int]] = {i: [] for i in active}
        probs: dict[int, list[np.ndarray]] = {i: [] for i in active}
        chunks = []
        for i in active:  # catch up on the committed tokens the draft has not seen
            chunks.append(self.catch_up(requests[i], ks[i]))
        step = 0
        while chunks:
            logits = self.model.forward_step(chunks, self.store)  # [n_active, n_vocab]
            step += 1
            nxt = []
            for row, i in zip(logits, active, strict=True):
                req = requests[i]
                params = req.sampling
                if params.greedy:
                    token = int(np.argmax(row))
                else:
                    if req.rng is None:
                        raise ConfigError("a sampled request needs its random generator")
                    q = sampling_probs(row, params)  # [n_vocab]
                    token = draw(q, req.rng)
                    probs[i].append(q)
                tokens[i].append(token)
                if step < ks[i]:  # feed it back for the next draft position
                    self._seen[req.request_id].append(token)
                    pos = len(self._seen[req.request_id]) - 1
                    nxt.append((i, SeqChunk(req.request_id, np.asarray([token]), pos)))
            active = [i for i, _ in nxt]
            chunks = [c for _, c in nxt]
        drafts = []
        for i, k in enumerate(ks):
            if k <= 0:
                drafts.append(Draft(()))
                continue
            p = np.stack(probs[i]) if probs[i] else None  # [k, n_vocab]
            drafts.append(Draft(tuple(tokens[i]), p))
        return drafts

    def release(self, request: Request) -> None:
        rid = request.request_id
        if self.store.has(rid):
            self.store.free(rid)
        self._seen.pop(rid, None)


def noisy_model(model: NumpyModel, noise_scale: float, seed: int = 0) -> NumpyModel:
    """`model` with seeded Gaussian noise added to every weight tensor: w + s * std(w) * N(0, 1)
    (norm weights included), a draft whose disagreement with the target grows with `s`."""
    if noise_scale < 0:
        raise ConfigError(f"noise_scale must be >= 0, got {noise_scale}")
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0x5bec,)))
    noisy = {}
    for name, w in sorted(model.state_dict().items()):
        w64 = np.asarray(w, dtype=np.float64)  # same shape as w
        scale = noise_scale * float(w64.std()) if w64.size > 1 else 0.0
        noisy[name] = w64 + scale * rng.standard_normal(w64.shape)  # same shape as w
    c = model.config
    weights = build_weights(c, DictSource(noisy, f"noisy copy (scale {noise_scale:g})"),
                            model.dtype)
    config = c.replace(name=f"{c.name}+noise({noise_scale:g}, seed {seed})")
    return NumpyModel(config, weights, model.dtype.name, model.layer_windows)
