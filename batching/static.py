"""Static and dynamic (request-level) batching: a batch is formed, runs to completion, then the
next one.

How FasterTransformer-style systems run it (the best configuration of this baseline, as its own
system would be configured; see ARCHITECTURE.md, "Fair baselines"): the server (Triton with the
FasterTransformer backend) collects up to `max_num_seqs` waiting requests into one request-level
batch when the engine is idle and the batch is full or its oldest request has waited
`max_wait_s` (0: launch with whatever is waiting). Prompts are padded to the longest one and the
whole padded batch is prefilled in ONE forward pass (FasterTransformer's `GptContextDecoder`
takes `[batch, max_input_len]`; there is no token budget such as vLLM's
`max_num_batched_tokens`, which belongs to iteration-level schedulers, so it does not cap the
batch here). Every decode step then runs the full batch width: a member that has finished keeps
its slot as padding until the *longest* member finishes (FasterTransformer's `finished` mask
skips nothing in the GEMMs). The batch's KV is reserved up front for the longest each member may
grow to. New arrivals wait for the whole batch.

Dynamic batching (Triton's dynamic batcher) launches as soon as one of its
`preferred_batch_sizes` can be formed (the largest such), else once the oldest request has
waited `max_queue_delay_s`; static batching is the special case of one preferred size,
`max_num_seqs` (or the `preferred_batch_sizes` given).

Latency is taken from each request's own token times by vLLM's definitions (TTFT = first token
- arrival, TPOT = (last token - first token) / (output - 1), ITL = token-time diffs, E2E = last
token - arrival): a member's last token is its finish. A non-streaming server returns every
result when the batch ends: that time is `Request.returned_s`, a separate metric.

What is priced is the padded batch: the prefill step computes `B x max_prompt` tokens and every
decode step `B` tokens at the longest context, finished members included; `padding_stats()`
counts the padded token-steps against the useful ones. What is computed functionally is only the
live members' real tokens (the padding would not change their tokens).

References: Yu et al., OSDI'22 (Orca), section 2.3 on request-level scheduling; NVIDIA
FasterTransformer (`ParallelGpt`, `GptContextDecoder`, the `finished` buffer); NVIDIA Triton
Inference Server, "Dynamic Batcher" (preferred_batch_size, max_queue_delay_microseconds);
vLLM `benchmarks/benchmark_serving.py` (the TTFT/TPOT/ITL/E2EL definitions).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from batching.admission import never_runs
from batching.commit import StopCriteria, commit_step, finish
from batching.plan import build_plan
from sim.core.errors import ConfigError
from sim.core.protocols import KVCacheManager
from sim.core.request import Request, Status
from sim.core.step import ScheduledSeq, StepPlan, StepResult
from sim.timing.cost_model import StepShape


@dataclass(frozen=True, slots=True)
class PaddingStats:
    """Token-steps a request-level batch priced (`num_padded_token_steps`: every slot of every
    step at the step's padded width) against those that computed a real token
    (`num_useful_token_steps`)."""

    num_padded_token_steps: int
    num_useful_token_steps: int

    @property
    def waste_fraction(self) -> float:
        """Share of the priced token-steps that were padding (0.0 when nothing ran)."""
        padded = self.num_padded_token_steps
        return 1.0 - self.num_useful_token_steps / padded if padded else 0.0


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
        self._num_padded_token_steps = 0
        self._num_useful_token_steps = 0

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

    def padding_stats(self) -> PaddingStats:
        return PaddingStats(self._num_padded_token_steps, self._num_useful_token_steps)

    def add(self, request: Request) -> str | None:
        # the padded prefill is one pass of its own (no token budget); the budget only bounds
        # a request that has no KV cache, whose every step recomputes the whole sequence
        budget = self.max_num_batched_tokens if not self.kv.retains_kv else 1 << 62
        reason = never_runs(request, self.kv, self.stop, budget)
        if reason is None:
            self.waiting.append(request)
        return reason

    def _launch(self, now_s: float, size: int) -> None:
        """Form a batch of up to `size` from the head of the queue, each member reserving the
        KV it may grow to. With a KV cache the padded prefill runs in one pass whatever its
        size (as FasterTransformer's context decoder does); without one every step recomputes
        the sequences, so the padded step (longest sequence x members) must fit the budget."""
        longest = 0
        while self.waiting and len(self.batch) < size:
            req = self.waiting[0]
            if not self.kv.retains_kv:
                step_tokens = req.max_len(self.stop.max_model_len)
                padded = max(longest, step_tokens) * (len(self.batch) + 1)
                if self.batch and padded > self.max_num_batched_tokens:
                    break
                longest = max(longest, step_tokens)
            # a static batch cannot preempt: reserve the most it may grow to (paged KV too)
            if not self.kv.allocate(req, req.max_len(self.stop.max_model_len)):
                break
            self.kv.allocate(req, req.num_tokens)
            self.waiting.popleft()
            self.batch.append(req)
            req.status = Status.RUNNING
            req.first_scheduled_s = now_s

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
        self._num_padded_token_steps += new * num_slots
        self._num_useful_token_steps += sum(s.num_new_tokens for s in seqs)
        return build_plan(self.kv, seqs, shape)

    def update(self, plan: StepPlan, result: StepResult, now_s: float) -> list[Request]:
        commit_step(plan, result, now_s, self.kv.retains_kv, self.stop)
        if any(r.finish_reason is None for r in self.batch):
            return []
        done, self.batch = self.batch, []
        for req in done:
            # finished at its own last token (vLLM's E2E/TPOT), returned with the whole batch
            finish(req, req.token_times_s[-1] if req.token_times_s else now_s)
            req.returned_s = now_s
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
