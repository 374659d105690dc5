"""Executors of speculative steps: real drafts verified by the real target, or counts only.

`SpeculativeExecutor` (functional): for every sequence the scheduler gave `k` draft slots, the
proposer drafts k tokens; one target `forward_step` scores each sequence's committed token plus
its drafts (`num_logits = k + 1`), and `speculative.verify` keeps 0..k drafts and adds the
target's own token. Rejected drafts' KV is rolled back (`ContiguousKVStore.truncate`; a paged
store is re-`prepare`d from the committed counter each step, and the blocks stay with the request
for the next step's drafts, as in vLLM). Sequences without drafts run exactly as in
`NumpyExecutor`.

`SpeculativeTimingExecutor` (timing-only): no token values; the number of accepted drafts per
step comes from an `AcceptanceModel`: i.i.d. per token with a given rate (seeded per request, so
a request's draws never depend on its batch), or a replay of a recorded acceptance trace.

References: vLLM `vllm/v1/worker/gpu_model_runner.py` (spec-decode metadata: k + 1 logits per
request) and `vllm/v1/sample/rejection_sampler.py`; Leviathan et al. 2023.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from sim.core.errors import InfersimError
from sim.core.request import Request
from sim.core.step import StepPlan, StepResult
from sim.executor.functional import NumpyExecutor
from sim.model.kv_store import ContiguousKVStore
from sim.model.numpy_model import NumpyModel, SeqChunk
from sim.model.sampling import sample_token, sampling_probs, token_logprobs
from speculative.acceptance import AcceptanceReplay
from speculative.tree import tree_chunk_layout, tree_verify_greedy, tree_verify_sampled
from speculative.tree_proposer import TreeDraft
from speculative.verify import verify


class SpeculativeExecutor(NumpyExecutor):
    """`NumpyExecutor` plus draft proposal and verification (see module doc)."""

    def __init__(self, model: NumpyModel, retains_kv: bool, max_model_len: int,
                 block_size: int | None, proposer: Any) -> None:
        super().__init__(model, retains_kv, max_model_len, block_size)
        self.proposer = proposer
        self.on_release: Any = None  # told when a request ends

    def run(self, plan: StepPlan) -> StepResult:
        spec = [i for i, s in enumerate(plan.seqs) if s.num_spec_tokens]
        if not spec:
            return super().run(plan)
        drafts = dict(zip(spec, self.proposer.propose_batch(
            [plan.seqs[i].request for i in spec], [plan.seqs[i].num_spec_tokens for i in spec]),
            strict=True))
        store = self.store
        self._load_kv(plan)
        chunks = []
        for i, s in enumerate(plan.seqs):
            req = s.request
            k = s.num_spec_tokens
            committed = req.token_ids_slice(s.start, s.end - k)
            if k and isinstance(drafts[i], TreeDraft):  # a token tree: its own positions, mask
                positions, mask = tree_chunk_layout(s.start, len(committed), drafts[i].parents)
                ids = np.asarray(committed + list(drafts[i].token_ids), dtype=np.int64)  # [n_new]
                chunks.append(SeqChunk(req.request_id, ids, s.start, k + 1, positions, mask))
                continue
            if k:
                draft = drafts[i].token_ids
                if len(draft) != k:
                    raise InfersimError(f"the proposer returned {len(draft)} draft tokens for "
                                        f"{req.request_id!r}, the scheduler planned {k}")
                committed = committed + list(draft)
            ids = np.asarray(committed, dtype=np.int64)  # [n_new]
            chunks.append(SeqChunk(req.request_id, ids, s.start,
                                   k + 1 if k else (1 if s.samples else 0)))
        logits = self.model.forward_step(chunks, store)  # [sum(num_logits), n_vocab]
        row = 0
        tokens: list[int] = []
        emitted: list[tuple[int, ...]] = []
        entries: list[tuple[Any, ...]] = []
        for i, s in enumerate(plan.seqs):
            n_rows = chunks[i].num_logits
            rows = logits[row: row + n_rows]  # [n_rows, n_vocab]
            row += n_rows
            req = s.request
            params = req.sampling
            if n_rows == 0:
                out: tuple[int, ...] = ()
            elif s.num_spec_tokens and isinstance(drafts[i], TreeDraft):
                out, logit_rows = self._verify_tree(s, drafts[i], rows)
                rows = rows[logit_rows]  # [len(out), n_vocab] the rows the tokens came from
            elif s.num_spec_tokens:
                draft = drafts[i]
                out = verify(draft.token_ids, draft.probs, rows, params, req.rng).token_ids
                if isinstance(store, ContiguousKVStore):  # keep committed + accepted drafts
                    store.truncate(req.request_id, s.end - s.num_spec_tokens + len(out) - 1)
            else:
                out = (sample_token(rows[0], params, req.rng),)
            want = params.logprobs
            entries.append(tuple(token_logprobs(rows[j], t, want) if want is not None else None
                                 for j, t in enumerate(out)))
            tokens.append(out[-1] if out else -1)
            emitted.append(out)
        return StepResult(tuple(tokens), None, tuple(emitted), tuple(entries))

    def _verify_tree(self, s: Any, draft: TreeDraft,
                     rows: np.ndarray) -> tuple[tuple[int, ...], list[int]]:
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
            store = self.store
            for layer in range(self.model.config.n_layer):
                k_all, v_all = store.read(req.request_id, layer, s.end)  # [end, n_kv, d] x2
                store.write(req.request_id, layer, base, k_all[src], v_all[src])
        if isinstance(self.store, ContiguousKVStore):  # keep committed + accepted path
            self.store.truncate(req.request_id, base + len(res.path))
        return res.token_ids, [0] + [p + 1 for p in res.path]

    def release(self, request: Request) -> None:
        super().release(request)
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

    def __init__(self, acceptance: AcceptanceModel) -> None:
        self.acceptance = acceptance
        self.on_release: Any = None  # told when a request ends

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
