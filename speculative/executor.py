"""Speculative decoding in the executors: real drafts verified by the real target, or counts only.

`DraftVerifier` (functional) is the `sim.executor.functional.Speculator` of the one functional
executor (`NumpyExecutor(..., speculation=DraftVerifier(...))`), so a speculative run keeps the
plain run's store, KV codec and options. For every sequence the scheduler gave `k` draft slots,
the proposer drafts k tokens; the executor's one target `forward_step` scores each sequence's
committed token plus its drafts (`num_logits = k + 1`), and `speculative.verify` keeps 0..k
drafts and adds the target's own token. Rejected drafts' KV is rolled back (a contiguous store
is truncated; a paged store is re-`prepare`d from the plan's filled slots each step, and the
blocks stay with the request for the next step's drafts, as in vLLM).

`SpeculativeTimingExecutor` (timing-only): no token values; the number of accepted drafts per
step comes from an `AcceptanceModel`: i.i.d. per token with a given rate (seeded per request, so
a request's draws never depend on its batch), or a replay of a recorded acceptance trace.

References: vLLM `vllm/v1/worker/gpu_model_runner.py` (spec-decode metadata: k + 1 logits per
request) and `vllm/v1/sample/rejection_sampler.py`; Leviathan et al. 2023.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from sim.core.errors import InfersimError
from sim.core.request import Request
from sim.core.step import ScheduledSeq, StepPlan, StepResult
from sim.executor.functional import Draft, ExecutorStore
from sim.model.numpy_model import SeqChunk
from sim.model.paged_store import PagedKVStore
from sim.model.sampling import sampling_probs
from speculative.acceptance import AcceptanceReplay
from speculative.proposers import Draft as LinearDraft
from speculative.proposers import Proposer
from speculative.tree import tree_chunk_layout, tree_verify_greedy, tree_verify_sampled
from speculative.tree_proposer import TreeDraft
from speculative.verify import verify


class BatchProposer(Proposer, Protocol):
    """A proposer that drafts for a whole step at once (`speculative.proposers`)."""

    def propose_batch(self, requests: Sequence[Request],
                      ks: Sequence[int]) -> Sequence[LinearDraft | TreeDraft]: ...


class DraftVerifier:
    """Drafts from `proposer` and their verification against the logits of a target of
    `num_layers` layers (see module doc); `on_release` is told when a request ends (the
    engine's speculation counters)."""

    def __init__(self, proposer: BatchProposer, num_layers: int,
                 on_release: Callable[[Request], None] | None = None) -> None:
        self.proposer = proposer
        self.num_layers = num_layers
        self.on_release = on_release

    def propose(self, seqs: Sequence[ScheduledSeq]) -> list[Draft]:
        return list(self.proposer.propose_batch([s.request for s in seqs],
                                                [s.num_spec_tokens for s in seqs]))

    def chunk(self, seq: ScheduledSeq, draft: Draft) -> SeqChunk:
        req, k = seq.request, seq.num_spec_tokens
        committed = req.token_ids_slice(seq.start, seq.end - k)
        if isinstance(draft, TreeDraft):  # a token tree: its own positions and mask
            positions, mask = tree_chunk_layout(seq.start, len(committed), draft.parents)
            ids = np.asarray(committed + list(draft.token_ids), dtype=np.int64)  # [n_new]
            return SeqChunk(req.request_id, ids, seq.start, k + 1, positions, mask)
        if len(draft.token_ids) != k:
            raise InfersimError(f"the proposer returned {len(draft.token_ids)} draft tokens for "
                                f"{req.request_id!r}, the scheduler planned {k}")
        ids = np.asarray(committed + list(draft.token_ids), dtype=np.int64)  # [n_new]
        return SeqChunk(req.request_id, ids, seq.start, k + 1)

    def verify(self, seq: ScheduledSeq, draft: Draft, rows: np.ndarray,
               store: ExecutorStore) -> tuple[tuple[int, ...], np.ndarray]:
        if isinstance(draft, TreeDraft):
            out, logit_rows = self._verify_tree(seq, draft, rows, store)
            return out, rows[logit_rows]  # [len(out), n_vocab] the rows the tokens came from
        if not isinstance(draft, LinearDraft):
            raise InfersimError(f"unknown draft type {type(draft).__name__} for "
                                f"{seq.request.request_id!r}")
        req = seq.request
        out = verify(draft.token_ids, draft.probs, rows, req.sampling, req.rng).token_ids
        if not isinstance(store, PagedKVStore):  # keep committed + accepted drafts
            store.truncate(req.request_id, seq.end - seq.num_spec_tokens + len(out) - 1)
        return out, rows

    def _verify_tree(self, s: ScheduledSeq, draft: TreeDraft, rows: np.ndarray,
                     store: ExecutorStore) -> tuple[tuple[int, ...], list[int]]:
        """Verify a token tree; move the accepted nodes' K/V to their final slots (the tree
        sat in slots `end - k ..`; the path's node at depth t belongs at slot `end - k + t - 1`)."""
        req = s.request
        params = req.sampling
        if params.greedy:
            res = tree_verify_greedy(draft.token_ids, draft.parents, rows)
        else:
            if req.rng is None:
                raise InfersimError("rejection sampling needs the request's random generator")
            target = np.stack([sampling_probs(r, params) for r in rows])  # [1 + n, n_vocab]
            res = tree_verify_sampled(draft.token_ids, draft.parents, target, draft.probs,
                                      req.rng)
        base = s.end - s.num_spec_tokens
        src = base + np.asarray(res.path, dtype=np.int64)  # [n_accepted]
        if src.size and np.any(src != base + np.arange(src.size)):
            for layer in range(self.num_layers):
                k_all, v_all = store.read(req.request_id, layer, s.end)  # [end, n_kv, d] x2
                store.write(req.request_id, layer, base, k_all[src], v_all[src])
        if not isinstance(store, PagedKVStore):  # keep committed + accepted path
            store.truncate(req.request_id, base + len(res.path))
        return res.token_ids, [0] + [p + 1 for p in res.path]

    def release(self, request: Request) -> None:
        self.proposer.release(request)
        if self.on_release is not None:
            self.on_release(request)


class AcceptanceModel(Protocol):
    def accepted(self, request: Request, k: int) -> int:
        """How many of `k` draft tokens the target accepts this step."""
        ...

    def release(self, request: Request) -> None: ...


class IidAcceptance:
    """Each draft token accepted with probability `rate`, independently; stops at the first
    rejection. One random stream per request, from (seed, request index)."""

    def __init__(self, rate: float, seed: int) -> None:
        self.rate = rate
        self.seed = seed
        self._rngs: dict[str, np.random.Generator] = {}

    def accepted(self, request: Request, k: int) -> int:
        rng = self._rngs.get(request.request_id)
        if rng is None:
            rng = np.random.default_rng(np.random.SeedSequence(
                self.seed, spawn_key=(request.index, 0x5bec)))
            self._rngs[request.request_id] = rng
        hits = rng.random(k) < self.rate  # [k]
        return int(k if hits.all() else np.argmin(hits))

    def release(self, request: Request) -> None:
        self._rngs.pop(request.request_id, None)


class TraceAcceptance:
    """Accepted counts replayed from a recorded `AcceptanceTrace` (request i replays recorded
    request i mod n), capped by k."""

    def __init__(self, replay: AcceptanceReplay) -> None:
        self.replay = replay

    def accepted(self, request: Request, k: int) -> int:
        return self.replay.next_accepted(request.index, k)

    def release(self, request: Request) -> None:
        return None


class SpeculativeTimingExecutor:
    """Token counts only: each speculating sequence emits `accepted + 1` placeholder tokens."""

    def __init__(self, acceptance: AcceptanceModel,
                 on_release: Callable[[Request], None] | None = None) -> None:
        self.acceptance = acceptance
        self.on_release = on_release  # told when a request ends

    def run(self, plan: StepPlan) -> StepResult:
        emitted = []
        for s in plan.seqs:
            k = s.num_spec_tokens
            n = self.acceptance.accepted(s.request, k) + 1 if k else int(s.samples)
            emitted.append((-1,) * n)
        return StepResult(None, None, tuple(emitted))

    def release(self, request: Request) -> None:
        self.acceptance.release(request)
        if self.on_release is not None:
            self.on_release(request)
