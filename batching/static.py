"""Static and dynamic (request-level) batching: a batch is formed, runs to completion, then the
next one.

As in HF `generate` or FasterTransformer: up to `max_num_seqs` waiting requests form a batch when
the engine is idle and the batch is full or its oldest request has waited `max_wait_s` (0: launch
with whatever is waiting). Dynamic batching (Triton's dynamic batcher) launches as soon as one of
its `preferred_batch_sizes` can be formed (the largest such), else once the oldest request has
waited `max_queue_delay_s`; static batching is the special case of one preferred size,
`max_num_seqs`. Prompts are padded to the longest one; every member keeps its slot (and is
priced) until the *longest* member finishes, and all results are returned together when the batch
ends. New arrivals wait for the whole batch. This is the baseline continuous batching beats.

What is priced is the padded batch: the prefill step computes `B x max_prompt` tokens and every
decode step `B` tokens at the longest context, finished members included. What is computed
functionally is only the live members' real tokens (the padding would not change their tokens).

References: Yu et al., OSDI'22 (Orca), section 2.3 on request-level scheduling; NVIDIA
FasterTransformer; HF transformers `generate`; NVIDIA Triton Inference Server, "Dynamic Batcher"
(preferred_batch_size, max_queue_delay_microseconds).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from batching.admission import never_runs
from batching.commit import StopCriteria, commit_step, finish
from batching.plan import build_plan
from sim.core.errors import ConfigError
from sim.core.protocols import KVCacheManager
from sim.core.request import Request, Status
from sim.core.step import ScheduledSeq, StepPlan, StepResult
from sim.timing.cost_model import StepShape


class StaticScheduler:
    def __init__(
        self,
        kv: KVCacheManager,
        stop: StopCriteria,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_wait_s: float = 0.0,
        preferred_batch_sizes: tuple[int, ...] = (),
    ) -> None:
        if not max_wait_s >= 0:
            raise ConfigError(f"max_wait_s must be >= 0 seconds, got {max_wait_s}")
        if any(not 1 <= size <= max_num_seqs for size in preferred_batch_sizes):
            raise ConfigError(
                f"preferred_batch_sizes {preferred_batch_sizes} must lie in 1..max_num_seqs "
                f"({max_num_seqs})"
            )
        self.kv = kv
        self.stop = stop
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_wait_s = max_wait_s
        self.preferred_batch_sizes = tuple(sorted(set(preferred_batch_sizes) or {max_num_seqs}))
        self.waiting: deque[Request] = deque()
        self.batch: list[Request] = []  # members keep their slot until the batch ends
        self.num_preemptions = 0  # a static batch never preempts (it reserves up front)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def waiting_requests(self) -> Iterable[Request]:
        return self.waiting

    def _batch_size_now(self, now_s: float) -> int:
        """How many waiting requests to launch now (0: keep waiting)."""
        num_waiting = len(self.waiting)
        formable = [size for size in self.preferred_batch_sizes if size <= num_waiting]
        if formable:
            return formable[-1]
        if num_waiting and now_s - self.waiting[0].arrival_s >= self.max_wait_s:
            return min(num_waiting, self.max_num_seqs)
        return 0

    def next_wakeup_s(self, now_s: float) -> float | None:
        """When an idle engine should look again even if nothing arrives (the wait expires)."""
        if self.batch or not self.waiting:
            return None
        return self.waiting[0].arrival_s + self.max_wait_s

    def add(self, request: Request) -> str | None:
        reason = never_runs(request, self.kv, self.stop, self.max_num_batched_tokens)
        if reason is None:
            self.waiting.append(request)
        return reason

    def _launch(self, now_s: float, size: int) -> None:
        """Form a batch of up to `size` from the head of the queue: the padded step must fit the
        token budget (the prompts; without a KV cache, the longest the sequences may grow, since
        every step recomputes them) and every member its KV reservation."""
        longest = 0
        while self.waiting and len(self.batch) < size:
            req = self.waiting[0]
            step_tokens = (req.num_prompt_tokens if self.kv.retains_kv
                           else req.max_len(self.stop.max_model_len))
            padded = max(longest, step_tokens) * (len(self.batch) + 1)
            if self.batch and padded > self.max_num_batched_tokens:
                break
            # a static batch cannot preempt: reserve the most it may grow to (paged KV too)
            if not self.kv.allocate(req, req.max_len(self.stop.max_model_len)):
                break
            self.kv.allocate(req, req.num_tokens)
            self.waiting.popleft()
            self.batch.append(req)
            req.status = Status.RUNNING
            req.first_scheduled_s = now_s
            longest = max(longest, step_tokens)

    def schedule(self, now_s: float) -> StepPlan | None:
        if not self.batch:
            self._launch(now_s, self._batch_size_now(now_s))
        live = [r for r in self.batch if r.finish_reason is None]
        if not live:
            return None
        seqs = []
        for req in live:
            if not self.kv.allocate(req, req.num_tokens):
                raise RuntimeError(f"static batch member {req.request_id} lost its reservation")
            seqs.append(ScheduledSeq(req, req.num_computed, req.num_tokens - req.num_computed))
        # price the padded batch: every slot, at the longest new-token count and context
        num_slots = len(self.batch)
        new = max(s.num_new_tokens for s in seqs)
        context = max(s.start for s in seqs)
        shape = StepShape(num_new_tokens=(new,) * num_slots, num_context_tokens=(context,) * num_slots)
        return build_plan(self.kv, seqs, shape)

    def update(self, plan: StepPlan, result: StepResult, now_s: float) -> list[Request]:
        commit_step(plan, result, now_s, self.kv.retains_kv, self.stop)
        if any(r.finish_reason is None for r in self.batch):
            return []
        done, self.batch = self.batch, []
        for req in done:
            finish(req, now_s)
            self.kv.free(req)
        return done

    def has_work(self) -> bool:
        return bool(self.waiting or self.batch)

    def abort_all(self, reason: str) -> list[Request]:
        aborted = [*self.batch, *self.waiting]
        for req in aborted:
            self.kv.free(req)
        self.batch, self.waiting = [], deque()
        return aborted


class DynamicScheduler(StaticScheduler):
    """Triton-style dynamic batching (see the module docstring)."""

    def __init__(
        self,
        kv: KVCacheManager,
        stop: StopCriteria,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        preferred_batch_sizes: tuple[int, ...] = (),
        max_queue_delay_s: float = 0.05,
    ) -> None:
        # default preferred sizes: powers of two from 4 up to max_num_seqs
        sizes = preferred_batch_sizes or tuple(
            2**i for i in range(2, max_num_seqs.bit_length()) if 2**i <= max_num_seqs
        ) or (max_num_seqs,)
        super().__init__(kv, stop, max_num_seqs, max_num_batched_tokens,
                         max_wait_s=max_queue_delay_s, preferred_batch_sizes=sizes)
