"""The step types: what a scheduler plans each step (`StepPlan`) and what an executor returns.

A `StepPlan` lists the sequences that run this step (`ScheduledSeq`: how many new tokens from
where) and the `StepShape` the cost model prices. The two usually agree; static batching prices
padding that it does not compute (finished members keep their slots, prompts padded to the
longest), which is exactly its waste.

References: Orca (Yu et al., OSDI'22) iteration-level scheduling; vLLM `vllm/v1/core/sched`.
"""

from __future__ import annotations

from dataclasses import dataclass

from sim.core.request import Logprob, Request
from sim.core.step_shape import StepShape


@dataclass(frozen=True, slots=True)
class ScheduledSeq:
    """`num_new_tokens` tokens of `request`, starting at position `start` (= its KV so far)."""

    request: Request
    start: int
    num_new_tokens: int
    #: speculative draft tokens verified after the committed ones (counted in num_new_tokens)
    num_spec_tokens: int = 0

    @property
    def end(self) -> int:
        return self.start + self.num_new_tokens

    @property
    def samples(self) -> bool:
        """Whether this step reaches the sequence's last token, so a new token is sampled."""
        return self.end - self.num_spec_tokens == self.request.num_tokens


@dataclass(frozen=True, slots=True)
class StepPlan:
    seqs: tuple[ScheduledSeq, ...]
    shape: StepShape

    @property
    def num_new_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.seqs)


def shape_of(seqs: tuple[ScheduledSeq, ...]) -> StepShape:
    """The shape the cost model prices for exactly these sequences."""
    spec = any(s.num_spec_tokens for s in seqs)  # verification scores k + 1 positions
    return StepShape(
        num_new_tokens=tuple(s.num_new_tokens for s in seqs),
        num_context_tokens=tuple(s.start for s in seqs),
        num_logits=tuple(s.num_spec_tokens + 1 for s in seqs) if spec else None,
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
