"""The functional executor: real tokens from the NumPy model, from the step plan alone.

One flattened forward over all the step's sequences through the KV store (or, for the
no-KV-cache baseline, a full recompute of each sequence), then each sequence that reached its
end samples its next token from its own random stream. It never reads the clock, and never the
KV manager: the plan carries the block copies to apply first (`StepPlan.kv.ops`) and, over a
paged store, each sequence's block table and filled slots (`ScheduledSeq.kv`), as vLLM v1's
`SchedulerOutput` carries them to its workers.

Speculative decoding is an option of this one executor (`speculation`, a `Speculator`: the
proposer and verifier of `speculative.executor`), so a speculative run gets exactly the same
store (KV codec), eviction and sharding as a plain one. A step where some sequence verifies
drafts scores `k + 1` positions of it and reports every emitted token (`StepResult.emitted`);
other steps run exactly as without speculation.

References: vLLM `vllm/v1/worker/gpu_model_runner.py` (flattened varlen batches; spec-decode
metadata, k + 1 logits per request) and `vllm/v1/core/sched/output.py` (`SchedulerOutput`).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Protocol

import numpy as np

from cache.kv_eviction import EvictingModel, KVEviction
from sim.core.dtypes import FloatArray
from sim.core.errors import InfersimError
from sim.core.protocols import KVStore
from sim.core.request import Logprob, Request, SamplingParams
from sim.core.step import ScheduledSeq, StepPlan, StepResult
from sim.model.kv_quant import kv_codec
from sim.model.kv_store import ContiguousKVStore
from sim.model.numpy_model import NumpyModel, SeqChunk
from sim.model.paged_store import PagedKVStore
from sim.model.sampling import process_logits, sample_token, token_logprobs

LogprobEntry = tuple[float, dict[int, Logprob]]


def sample_next(request: Request, row: FloatArray) -> int:
    """The request's next token from its raw logits row `[n_vocab]`: its logits processors
    (penalties over its own prompt and output tokens, bias, bans; `sim.model.sampling`), then
    its sampler on its own random stream. Nothing here reads another request, so the token is
    the same alone or in any batch."""
    params = request.sampling
    if params.processes_logits:
        row = process_logits(row, params, request.prompt_token_ids or (),
                             request.output_token_ids, request.bad_words_token_ids)
    return sample_token(row, params, request.rng)


def num_logprobs(params: SamplingParams) -> int | None:
    """How many top log-probabilities to report per token (None: none). `best_of` ranks samples
    by cumulative log-probability, so it needs at least the sampled token's."""
    if params.logprobs is None and params.best_of is not None and params.best_of > 1:
        return 0
    return params.logprobs


class SequenceKVStore(KVStore, Protocol):
    """A KV store addressed by sequence id and position (`ContiguousKVStore`; one per GPU for
    a sharded model, `parallel.sharded_kv.RankedKVStore`)."""

    def allocate(self, seq_id: Hashable, num_tokens: int) -> None: ...

    def has(self, seq_id: Hashable) -> bool: ...

    def free(self, seq_id: Hashable) -> None: ...

    def truncate(self, seq_id: Hashable, num_tokens: int) -> None:
        """Keep only the first `num_tokens` positions (roll back rejected drafts)."""
        ...


ExecutorStore = PagedKVStore | SequenceKVStore


class Draft(Protocol):
    """What a proposer drafted for one sequence (`speculative.proposers.Draft`, a token tree)."""

    @property
    def token_ids(self) -> tuple[int, ...]: ...


class Speculator(Protocol):
    """Speculative decoding inside the executor: drafts for the sequences the plan gave draft
    slots, their place in the verification forward, and their verification
    (`speculative.executor.DraftVerifier`)."""

    def propose(self, seqs: Sequence[ScheduledSeq]) -> list[Draft]:
        """One draft per sequence (each with `num_spec_tokens > 0`), in order."""
        ...

    def chunk(self, seq: ScheduledSeq, draft: Draft) -> SeqChunk:
        """The sequence's committed tokens and its draft, scored at `num_spec_tokens + 1`
        positions."""
        ...

    def verify(self, seq: ScheduledSeq, draft: Draft, rows: FloatArray,
               store: ExecutorStore) -> tuple[tuple[int, ...], FloatArray]:
        """The tokens emitted (accepted drafts, then the target's own) and the logit rows
        `[len(tokens), n_vocab]` they were sampled from, given the chunk's rows `rows`
        `[k + 1, n_vocab]`; the store is left holding the committed and accepted tokens' KV."""
        ...

    def release(self, request: Request) -> None:
        """Drop whatever is held for a request that ended."""
        ...


def make_kv_store(model: NumpyModel, block_size: int | None,
                  kv_cache_dtype: str = "auto") -> PagedKVStore | ContiguousKVStore:
    """The contents store of a one-GPU model: paged in blocks of `block_size` (a paged KV
    manager's), else contiguous per sequence; 8-bit codes with their scales when
    `kv_cache_dtype` asks for them (`sim.model.kv_quant`)."""
    cfg = model.config
    codec = kv_codec(kv_cache_dtype)
    if block_size is not None:
        return PagedKVStore(cfg.n_layer, cfg.n_kv_head, cfg.d_head, block_size, model.dtype,
                            codec=codec)
    return ContiguousKVStore(cfg.n_layer, cfg.n_kv_head, cfg.d_head, model.dtype, codec=codec)


class NumpyExecutor:
    """Real tokens from the NumPy model (the `mode="functional"` executor), with or without
    speculative decoding. Built by `sim.engine.build.build_executor`, which picks the store
    (`make_kv_store`, or a sharded model's per-GPU stores) and passes every option."""

    def __init__(self, model: NumpyModel, store: ExecutorStore, *, retains_kv: bool,
                 max_model_len: int, kv_eviction: KVEviction | None = None,
                 speculation: Speculator | None = None) -> None:
        self.model: NumpyModel | EvictingModel = model
        if kv_eviction is not None:  # attention reads only the kept positions
            self.model = EvictingModel(model, kv_eviction)
        self.store = store
        self.retains_kv = retains_kv
        self.max_model_len = max_model_len
        self.speculation = speculation

    def run(self, plan: StepPlan) -> StepResult:
        seqs = plan.seqs
        if not self.retains_kv:  # the no-KV-cache baseline: recompute every sequence
            rows = [self.model.forward(np.asarray(s.request.token_ids_slice(0, s.end)))[-1]
                    if s.samples else None for s in seqs]  # [n_vocab] each
            return self._sampled(seqs, rows)
        self._load_kv(plan)
        if self.speculation is not None and any(s.num_spec_tokens for s in seqs):
            return self._run_speculative(seqs, self.speculation)
        logits = self.model.forward_step([self._chunk(s) for s in seqs],
                                         self.store)  # [n_sampling, n_vocab]
        it = iter(logits)
        return self._sampled(seqs, [next(it) if s.samples else None for s in seqs])

    def _run_speculative(self, seqs: tuple[ScheduledSeq, ...],
                         spec: Speculator) -> StepResult:
        """A step where some sequences verify drafts: every emitted token per sequence."""
        drafting = [i for i, s in enumerate(seqs) if s.num_spec_tokens]
        # drafts first (a sampled draft draws from the request's stream before verification)
        drafts = dict(zip(drafting, spec.propose([seqs[i] for i in drafting]), strict=True))
        chunks = [spec.chunk(s, drafts[i]) if i in drafts else self._chunk(s)
                  for i, s in enumerate(seqs)]
        logits = self.model.forward_step(chunks, self.store)  # [sum(num_logits), n_vocab]
        first = 0
        tokens: list[int] = []
        emitted: list[tuple[int, ...]] = []
        entries: list[tuple[LogprobEntry | None, ...]] = []
        for i, (s, chunk) in enumerate(zip(seqs, chunks, strict=True)):
            rows = logits[first: first + chunk.num_logits]  # [num_logits, n_vocab]
            first += chunk.num_logits
            out: tuple[int, ...] = ()
            if i in drafts:  # rows: [len(out), n_vocab], those the tokens came from
                out, rows = spec.verify(s, drafts[i], rows, self.store)
            elif chunk.num_logits:
                out = (sample_next(s.request, rows[0]),)
            want = num_logprobs(s.request.sampling)
            entries.append(tuple(token_logprobs(rows[j], t, want) if want is not None else None
                                 for j, t in enumerate(out)))
            tokens.append(out[-1] if out else -1)
            emitted.append(out)
        return StepResult(tuple(tokens), None, tuple(emitted), tuple(entries))

    def _load_kv(self, plan: StepPlan) -> None:
        """The plan's KV side into the store: its block copies (swaps, copy-on-write) in order,
        then each sequence's view (a paged store: its block table and filled slots; a contiguous
        one: room for the sequence, once)."""
        store = self.store
        if isinstance(store, PagedKVStore):
            if plan.kv.ops:
                store.apply_ops([(op.kind, op.src, op.dst) for op in plan.kv.ops])
            for s in plan.seqs:
                view = s.kv
                if view is None:
                    raise InfersimError(
                        f"step plan: sequence {s.request.request_id!r} has no block table for "
                        "the paged KV store; plans must be built by the scheduler "
                        "(batching.plan.build_plan) over a paged manager with record_block_ops")
                store.prepare(s.request.request_id, view.block_table, view.num_filled_slots)
            return
        for s in plan.seqs:
            req = s.request
            if not store.has(req.request_id):
                store.allocate(req.request_id, req.max_len(self.max_model_len))

    @staticmethod
    def _chunk(s: ScheduledSeq) -> SeqChunk:
        ids = np.asarray(s.request.token_ids_slice(s.start, s.end), dtype=np.int64)  # [n_new]
        return SeqChunk(s.request.request_id, ids, s.start, 1 if s.samples else 0)

    @staticmethod
    def _sampled(seqs: tuple[ScheduledSeq, ...],
                 rows: Sequence[FloatArray | None]) -> StepResult:
        """Sample each sequence's next token from its logits row `[n_vocab]` (None: a
        mid-prompt chunk, no token) with its own random stream."""
        tokens: list[int] = []
        logprobs: list[LogprobEntry | None] = []
        for seq, row in zip(seqs, rows, strict=True):
            if row is None:
                tokens.append(-1)
                logprobs.append(None)
                continue
            token = sample_next(seq.request, row)
            tokens.append(token)
            want = num_logprobs(seq.request.sampling)
            logprobs.append(token_logprobs(row, token, want) if want is not None else None)
        return StepResult(tuple(tokens), tuple(logprobs))

    def release(self, request: Request) -> None:
        if self.store.has(request.request_id):
            self.store.free(request.request_id)
        if isinstance(self.model, EvictingModel):
            self.model.release(request.request_id)
        if self.speculation is not None:
            self.speculation.release(request)
