"""The protocols at the joints: `Scheduler`, `KVCacheManager`, `KVStore`, `Executor`, `Pricer`,
and the capabilities some of them add (checked once, when an engine run is built, never probed per step).

`KVCacheManager` is KV-cache *accounting* (which request holds how much memory); the KV
*contents* live in a `KVStore` (`sim.model.kv_store`, `sim.model.paged_store`) that the
functional executor fills. Managers only decide whether memory exists; all-or-nothing:
`allocate` either grants the whole request or changes nothing.

References: Kwon et al., "Efficient Memory Management for Large Language Model Serving with
PagedAttention" (SOSP'23) for the manager/block-table split; vLLM `vllm/v1/core/kv_cache_manager.py`.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from typing import Protocol, runtime_checkable

from sim.core.dtypes import FloatArray, IntArray
from sim.core.request import Request
from sim.core.step import ScheduledSeq, StepKV, StepPlan, StepResult
from sim.core.step_shape import StepCost, StepShape
from sim.core.usage import KVMemoryUsage


class KVCacheManager(Protocol):
    """Decides whether a request's KV fits; the scheduler asks before it schedules tokens."""

    #: False for the no-KV-cache baseline: KV is dropped after every step and recomputed.
    retains_kv: bool

    def never_fits(self, request: Request, max_len: int) -> str | None:
        """Why a request of up to `max_len` tokens could never be held (None if it could)."""
        ...

    def cached_prefix(self, request: Request) -> int:
        """Tokens at the start of the request whose KV is already cached and can be shared
        (whole blocks, always fewer than `request.num_tokens`); 0 without prefix caching.
        A pure lookup: nothing changes."""
        ...

    def allocate(self, request: Request, num_tokens: int, num_cached_tokens: int = 0) -> bool:
        """Make room for KV of the request's first `num_tokens` tokens; False changes nothing.
        A request holding nothing may share its first `num_cached_tokens` (the value
        `cached_prefix` just returned) instead of getting fresh memory for them."""
        ...

    def free(self, request: Request) -> None:
        """Release everything the request holds (a no-op if it holds nothing)."""
        ...

    def preempt(self, request: Request) -> bool:
        """Take the request's memory away so others can run: True if its KV was kept (swapped
        out, to come back on its next `allocate`), False if freed (it must be recomputed)."""
        ...

    def capacity(self, request: Request) -> int:
        """Tokens the request can hold without allocating more memory."""
        ...

    def usage(self) -> KVMemoryUsage:
        """Where the KV memory goes now (used, reserved, fragmentation, free)."""
        ...

    def num_free_tokens(self) -> int: ...

    def num_used_tokens(self) -> int:
        """Tokens of KV that exist for real requests (not merely reserved)."""
        ...

    def num_reserved_tokens(self) -> int:
        """Tokens of capacity held by requests (used + reserved-but-unused)."""
        ...

    def take_step_kv(self, seqs: tuple[ScheduledSeq, ...]
                     ) -> tuple[tuple[ScheduledSeq, ...], StepKV]:
        """The KV side of the plan being built for `seqs` (already allocated): the sequences
        with their KV views (`ScheduledSeq.kv`, set by a paged manager whose contents are kept,
        i.e. in functional mode; `seqs` unchanged otherwise) and the KV block work queued since
        the last call, in order (`StepKV`; `NO_KV_WORK` when there is none). Taking drains the
        queue, so work queued while no plan was built rides in the next one; the scheduler
        calls this exactly once per plan (`batching.plan.build_plan`)."""
        ...


class Scheduler(Protocol):
    """Decides, each step, which requests run and how many tokens each computes."""

    #: requests preempted so far (their KV taken away so that others could run)
    num_preemptions: int

    def add(self, request: Request) -> str | None:
        """Queue a request; a string is the reason it can never run (it is then rejected)."""
        ...

    def schedule(self, now_s: float) -> StepPlan | None:
        """The next step, reading committed state only; None when nothing can run now."""
        ...

    def update(self, plan: StepPlan, result: StepResult, now_s: float) -> list[Request]:
        """Commit a completed step: counters, tokens, stops, frees; the finished requests."""
        ...

    def has_work(self) -> bool: ...

    def abort_all(self, reason: str) -> list[Request]:
        """Remove every queued or running request (e.g. nothing can ever be scheduled)."""
        ...

    @property
    def num_waiting(self) -> int:
        """Requests queued and not running."""
        ...

    def waiting_requests(self) -> Iterable[Request]:
        """The queued requests, in the order they would be admitted."""
        ...

    def next_wakeup_s(self, now_s: float) -> float | None:
        """When an idle scheduler wants to plan again although nothing arrives (a batching wait
        expiring); None when only an arrival or a completion can give it work."""
        ...


@runtime_checkable
class JoinableScheduler(Scheduler, Protocol):
    """A scheduler whose running batch sequences may join and leave between steps: forked
    samples of `n > 1` and the beams of a beam search (iteration-level batching). It admits a
    request only with `Request.num_seats` of its `max_num_seqs` seats free, so that the
    sequences it forks into find theirs."""

    max_num_seqs: int
    max_num_batched_tokens: int
    #: chunked prefill: a step may compute part of a prompt
    chunked: bool

    def join(self, request: Request, parent: Request | None = None) -> None:
        """`request`, which holds KV already, runs from the next step on: right after
        `parent` in the running batch, or after everything running (just admitted)."""
        ...

    def remove(self, request: Request) -> None:
        """Take a request out of the queues and free its KV."""
        ...

    def requeue(self, request: Request) -> None:
        """Queue a request that holds no KV again, first in line (a restarted search)."""
        ...


@runtime_checkable
class CoastableScheduler(Scheduler, Protocol):
    """A scheduler that can certify stretches of plain decodes and commit them at once
    (timing-only coasting, `sim.engine.coasting`)."""

    running: list[Request]
    kv: KVCacheManager
    #: KV tokens reserved after each step the last `coast_horizon` certified
    coast_reserved_tokens: list[int]

    def coast_horizon(self, max_steps: int) -> int:
        """How many upcoming steps (at most `max_steps`) are certain to be plain decodes of
        the running batch."""
        ...

    def coast(self, step_end_times_s: list[float]) -> None:
        """Commit that many plain decode steps, ending at these times."""
        ...


class SpecPolicy(Protocol):
    """Speculative decoding as the scheduler sees it: how many draft tokens to verify."""

    def num_spec_tokens(self, req: Request, budget: int, max_model_len: int) -> int:
        """Draft tokens to verify after `req`'s decode token this step, within `budget`."""
        ...


@runtime_checkable
class ForkableKV(KVCacheManager, Protocol):
    """A KV manager whose sequences can share another's blocks by reference (copy-on-write)."""

    def fork(self, parent: Request, child: Request, num_tokens: int | None = None) -> None:
        """`child` (holding nothing) shares the KV of `parent`'s first `num_tokens` tokens."""
        ...


@runtime_checkable
class BlockKV(Protocol):
    """A KV manager that hands out memory in blocks of `block_size` token slots."""

    block_size: int


@runtime_checkable
class ReservingKV(Protocol):
    """A KV manager that reserves one slab per request up front (contiguous layouts)."""

    def reservation_tokens(self, request: Request) -> int:
        """Token slots the request's slab takes."""
        ...


@runtime_checkable
class GrowthCertifier(Protocol):
    """A KV manager that can tell how many plain-decode steps its free memory surely serves."""

    def coast_growth(self, requests: Sequence[Request], max_steps: int) -> list[int]:
        """The reserved KV tokens after each of up to `max_steps` such steps."""
        ...


class KVStore(Protocol):
    """What the NumPy model needs from a KV store (per sequence, per layer)."""

    def write(self, seq_id: Hashable, layer: int, start_pos: int, k: FloatArray,
              v: FloatArray) -> None:
        """Store `k`, `v` `[n_new, n_kv_head, d_head]` at positions `start_pos..start_pos+n_new-1`."""
        ...

    def read(self, seq_id: Hashable, layer: int, end_pos: int) -> tuple[FloatArray, FloatArray]:
        """Keys and values `[end_pos, n_kv_head, d_head]` of positions `0..end_pos-1`."""
        ...


class Executor(Protocol):
    def run(self, plan: StepPlan) -> StepResult: ...

    def release(self, request: Request) -> None:
        """Drop whatever the executor holds for a request that has ended."""
        ...


class Pricer(Protocol):
    """What the engine needs from a step pricer: `sim.timing.cost_model.CostModel` (one GPU, a
    1-stage pipeline) or `parallel.cost.ParallelCostModel` (a sharded replica, its collectives
    priced). The engine prices each step with `step_time_s` (the fast path) and reports with
    `step_cost`; the two are one price (`step_cost(shape).total_s == step_time_s(...)`), never
    below `roofline_bound_s(shape)`. Pricing depends only on the shape, never on token values.

    References: Agrawal et al. 2024 (Vidur: an execution-time predictor behind the scheduler);
    vLLM `vllm/v1/engine/core.py` (one model-executor call per step).
    """

    @property
    def step_overhead_s(self) -> float:
        """CPU seconds per step outside the GPU kernels (scheduling, input preparation)."""
        ...

    @property
    def act_dtype(self) -> str:
        """The activation dtype (`sim.core.dtypes` name) the memory plan sizes 16-bit KV in."""
        ...

    def step_cost(self, shape: StepShape) -> StepCost:
        """Seconds of the step, per part, with the bound of each part and its FLOPs and bytes."""
        ...

    def step_time_s(self, num_new_tokens: tuple[int, ...], num_context_tokens: tuple[int, ...],
                    num_logits: int | None = None) -> float:
        """`step_cost(StepShape(new, ctx, logits)).total_s` without the breakdown; `num_logits`
        the step's total LM-head rows (None: one per sequence)."""
        ...

    def decode_stretch_s(self, context_tokens: IntArray, num_steps: int) -> FloatArray:
        """[num_steps] seconds of consecutive plain-decode steps of one sequence per entry of
        `context_tokens` ([num_seqs] cached tokens before the first step; step k reads k more
        each): entry k bit-identical to `step_time_s((1,) * num_seqs, context + k)`, in one
        vectorised call (timing-only coasting)."""
        ...

    def roofline_bound_s(self, shape: StepShape) -> float:
        """The physical floor of the step (peak FLOP/s and bandwidth, no efficiencies)."""
        ...

    def stage_times_s(self, shape: StepShape) -> list[float]:
        """Busy seconds of each pipeline stage for one micro-batch (no overhead, no send)."""
        ...

    def send_recv_s(self, shape: StepShape) -> float:
        """Seconds of one stage-boundary transfer of the micro-batch (0 with one stage)."""
        ...

    def describe(self) -> str:
        """One line naming the model, dtypes, device and split."""
        ...
