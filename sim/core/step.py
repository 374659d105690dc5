"""The step types: what a scheduler plans each step (`StepPlan`) and what an executor returns.

A `StepPlan` is the whole contract from the scheduler to the executor and the pricer, as vLLM
v1's `SchedulerOutput` is to its workers (which never touch the KV manager). It lists the
sequences that run this step (`ScheduledSeq`: how many new tokens from where, and with a paged
KV store which blocks hold its KV, `SeqKV`), the `StepShape` the cost model prices, and the KV
block work the step needs first (`StepKV`: block copies in order for the contents, their counts
for the pricer). The sequences and the shape usually agree; static batching prices padding that
it does not compute (finished members keep their slots, prompts padded to the longest), which
is exactly its waste.

References: Orca (Yu et al., OSDI'22) iteration-level scheduling; vLLM `vllm/v1/core/sched`
(`SchedulerOutput`: per-request block ids and computed-token counts) and vLLM v0
`SchedulerOutputs` (`blocks_to_swap_in` / `blocks_to_swap_out` / `blocks_to_copy`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sim.core.request import Logprob, Request
from sim.core.step_shape import StepShape

BlockOpKind = Literal["out", "in", "copy"]


@dataclass(frozen=True, slots=True)
class BlockOp:
    """One KV block copy the contents side performs before the step's writes.

    `"out"`: GPU block `src` saved to host block `dst` (swap-out); `"in"`: host block `src`
    restored to GPU block `dst` (swap-in); `"copy"`: GPU block `src` duplicated into `dst`
    (copy-on-write of a block shared after a fork). Applied in the order queued: a block swapped
    out may be handed to another request, and written, in the same step.
    """

    kind: BlockOpKind
    src: int
    dst: int


@dataclass(frozen=True, slots=True)
class StepKV:
    """The KV block work a step needs before it runs: the block copies, in order (`ops`; empty
    in timing-only runs, which keep no contents), and the counts the pricer charges (blocks
    moved over the host link each way, copy-on-write copies in device memory). Everything the
    KV manager queued since the previous plan rides here, so work queued by a `schedule()` that
    planned nothing (a preemption) is in the next plan."""

    ops: tuple[BlockOp, ...] = ()
    num_swapped_out_blocks: int = 0
    num_swapped_in_blocks: int = 0
    num_copied_blocks: int = 0


NO_KV_WORK = StepKV()


@dataclass(frozen=True, slots=True)
class SeqKV:
    """Where a scheduled sequence's KV lives this step, in a paged store.

    `block_table[i]` is the physical block of the sequence's logical block i (-1: released by KV
    eviction, never read); `num_filled_slots` is how many leading slots of the table already
    hold KV: the step's `start`, or under H2O the compacted kept set `min(start, budget)`
    (`cache.kv_eviction.KVEviction.num_slots`).
    """

    block_table: tuple[int, ...]
    num_filled_slots: int


@dataclass(frozen=True, slots=True)
class ScheduledSeq:
    """`num_new_tokens` tokens of `request`, starting at position `start` (= its KV so far)."""

    request: Request
    start: int
    num_new_tokens: int
    #: speculative draft tokens verified after the committed ones (counted in num_new_tokens)
    num_spec_tokens: int = 0
    #: its paged KV view (block table, filled slots), set when the plan is built in functional
    #: mode over a paged manager; None otherwise (a contiguous store addresses KV by request id
    #: with `start` positions filled; timing-only runs keep no contents)
    kv: SeqKV | None = None

    @property
    def end(self) -> int:
        return self.start + self.num_new_tokens

    @property
    def samples(self) -> bool:
        """Whether this step reaches the sequence's last token, so a new token is sampled."""
        return self.end - self.num_spec_tokens == self.request.num_tokens


@dataclass(frozen=True, slots=True)
class StepPlan:
    """One step: the sequences that run, the shape that is priced, the KV block work first."""

    seqs: tuple[ScheduledSeq, ...]
    shape: StepShape
    kv: StepKV = NO_KV_WORK

    @property
    def num_new_tokens(self) -> int:
        return sum([s.num_new_tokens for s in self.seqs])


def shape_of(seqs: tuple[ScheduledSeq, ...]) -> StepShape:
    """The shape the cost model prices for exactly these sequences."""
    # (list comprehensions, not generators: this runs for every dispatched step)
    spec = [s.num_spec_tokens for s in seqs]
    return StepShape(
        num_new_tokens=tuple([s.num_new_tokens for s in seqs]),
        num_context_tokens=tuple([s.start for s in seqs]),
        # verification scores k + 1 positions
        num_logits=tuple([k + 1 for k in spec]) if any(spec) else None,
    )


@dataclass(frozen=True, slots=True)
class StepResult:
    """What the executor produced for a plan, aligned with `plan.seqs`.

    `token_ids[i]` is the token sampled for sequence i (-1 where it sampled none: a mid-prompt
    chunk). Timing-only runs produce no token values: `token_ids` is None.
    `logprobs[i]` is (sampled token's logprob, vLLM logprobs dict) when the request asked for them.
    """

    token_ids: tuple[int, ...] | None
    logprobs: tuple[tuple[float, dict[int, Logprob]] | None, ...] | None = None
    #: speculative steps: every token emitted per sequence, in order (accepted drafts, then the
    #: target's own token; -1s in timing-only mode), with their logprobs entries when asked
    emitted: tuple[tuple[int, ...], ...] | None = None
    emitted_logprobs: tuple[tuple[tuple[float, dict[int, Logprob]] | None, ...], ...] | None = None


TIMING_RESULT = StepResult(token_ids=None)
