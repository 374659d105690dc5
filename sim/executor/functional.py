"""The functional executor: real tokens from the NumPy model.

One flattened forward over all the step's sequences through the KV store (or, for the
no-KV-cache baseline, a full recompute of each sequence), then each sequence that reached its
end samples its next token from its own random stream. It never reads the clock, and never the
KV manager: the plan carries the block copies to apply first (`StepPlan.kv.ops`) and, over a
paged store, each sequence's block table and filled slots (`ScheduledSeq.kv`).

References: vLLM `vllm/v1/worker/gpu_model_runner.py` (flattened varlen batches).
"""

from __future__ import annotations

import numpy as np

from cache.kv_eviction import EvictingModel, KVEviction
from sim.core.errors import InfersimError
from sim.core.request import Logprob, Request
from sim.core.step import StepPlan, StepResult
from sim.model.kv_quant import kv_codec
from sim.model.kv_store import ContiguousKVStore
from sim.model.numpy_model import NumpyModel, SeqChunk
from sim.model.paged_store import PagedKVStore
from sim.model.sampling import sample_token, token_logprobs


class NumpyExecutor:
    """Real tokens from the NumPy model (the `mode="functional"` executor)."""

    def __init__(self, model: NumpyModel, retains_kv: bool, max_model_len: int,
                 block_size: int | None = None, kv_cache_dtype: str = "auto",
                 kv_eviction: KVEviction | None = None) -> None:
        cfg = model.config
        codec = kv_codec(kv_cache_dtype)  # quantized KV contents (sim.model.kv_quant)
        self.model: NumpyModel | EvictingModel = model
        self.eviction = kv_eviction
        if kv_eviction is not None:  # attention reads only the kept positions
            self.model = EvictingModel(model, kv_eviction)
        self.retains_kv = retains_kv
        self.max_model_len = max_model_len
        # paged KV (a paged manager's `block_size`): contents in blocks, addressed through the
        # block tables the plans carry
        self.store: ContiguousKVStore | PagedKVStore
        if block_size is not None:
            self.store = PagedKVStore(cfg.n_layer, cfg.n_kv_head, cfg.d_head, block_size,
                                      model.dtype, codec=codec)
        else:
            self.store = ContiguousKVStore(cfg.n_layer, cfg.n_kv_head, cfg.d_head, model.dtype,
                                           codec=codec)

    def _logits(self, plan: StepPlan) -> list[np.ndarray | None]:
        """Next-token logits [n_vocab] for each sequence that samples this step (else None)."""
        if not self.retains_kv:
            return [
                self.model.forward(np.asarray(s.request.token_ids_slice(0, s.end)))[-1]
                if s.samples else None
                for s in plan.seqs
            ]
        chunks = []
        self._load_kv(plan)
        for s in plan.seqs:
            req = s.request
            ids = np.asarray(req.token_ids_slice(s.start, s.end), dtype=np.int64)  # [n_new]
            chunks.append(SeqChunk(req.request_id, ids, s.start, 1 if s.samples else 0))
        logits = self.model.forward_step(chunks, self.store)  # [n_sampling, n_vocab]
        rows = iter(logits)
        return [next(rows) if s.samples else None for s in plan.seqs]

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

    def run(self, plan: StepPlan) -> StepResult:
        tokens: list[int] = []
        logprobs: list[tuple[float, dict[int, Logprob]] | None] = []
        for seq, row in zip(plan.seqs, self._logits(plan), strict=True):
            if row is None:
                tokens.append(-1)
                logprobs.append(None)
                continue
            params = seq.request.sampling
            token = sample_token(row, params, seq.request.rng)
            tokens.append(token)
            want = params.logprobs
            logprobs.append(token_logprobs(row, token, want) if want is not None else None)
        return StepResult(tuple(tokens), tuple(logprobs))

    def release(self, request: Request) -> None:
        if self.store.has(request.request_id):
            self.store.free(request.request_id)
        if isinstance(self.model, EvictingModel):
            self.model.release(request.request_id)
