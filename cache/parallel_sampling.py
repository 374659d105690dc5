"""Parallel sampling (`SamplingParams(n=k)`): k samples of one prompt sharing its KV blocks.

A request with `n = k` becomes k sequences. Sample 0 (the *leader*) runs the prompt like any
request; until its prompt is computed it holds a seat of `max_num_seqs` for each sample
(`Request.num_seats`, as vLLM v0's sequence group). When the step that computes its prompt
completes, the other k - 1 samples *fork* it: each shares, by reference count, the blocks
holding the first `num_prompt_tokens - 1` prompt tokens and joins the *running* batch with its
progress counter there, like a beam does. Its first step recomputes only the last prompt token
(its logits give the sample's own first token, drawn from its own random stream), and that
write lands in the shared, partly filled last block, which is then copied first (copy-on-write).
So a k-sample request holds its prompt once, not k times, and computes
`num_prompt_tokens + (k - 1)` prompt tokens instead of `k * num_prompt_tokens`.

A forked sample is a running sequence like any other: when memory runs out a preemption may pick
it (it then frees its references and recomputes later). It never waits in the queue holding
blocks: a waiting sample holding shared prompt blocks would keep its preempted leader, or
another sample, from ever being re-admitted under a tight pool (head of line), and every request
would end rejected as stalled.

Forks happen at the leader's first commit, from committed state (its KV exists then); a manager
without `fork` (contiguous, none), KV eviction, a sharded functional model or a scheduler whose
batch sequences cannot join (static batching) make each sample a new queued request that
computes its own prompt. Random streams: sample i draws from seed `seed + i` when the request
has a seed (as vLLM v1's `ParentRequest` does), so each sample equals an `n=1` run with that
seed; without a seed sample i uses the stream `(engine seed, request index, 0, i)` (sample 0:
`(..., 0)`, the `n=1` stream).

References: Kwon et al., SOSP'23 (PagedAttention) section 4.4, parallel sampling with
copy-on-write; vLLM v1 `vllm/v1/engine/parallel_sampling.py` (child seeds `seed + index`,
child ids `"{index}_{request_id}"`); vLLM v0 `vllm/sequence.py`
(`SequenceGroup.get_max_num_running_seqs`: a group's seats before it forks).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from sim.core.protocols import ForkableKV, JoinableScheduler, KVCacheManager, Scheduler
from sim.core.request import Request, SamplingParams
from sim.core.step import StepPlan


def sample_params(params: SamplingParams, index: int) -> SamplingParams:
    """The parameters of sample `index` of an `n > 1` request: one sample, seed + index."""
    seed = None if params.seed is None else params.seed + index
    return dataclasses.replace(params, n=1, seed=seed)


def sample_rng(params: SamplingParams, engine_seed: int, request_index: int,
               sample_index: int = 0) -> np.random.Generator | None:
    """The random stream of one sample (None when greedy)."""
    if params.greedy:
        return None
    if params.seed is not None:
        return np.random.default_rng(np.random.SeedSequence(params.seed))
    key = (request_index, 0) + ((sample_index,) if sample_index else ())
    return np.random.default_rng(np.random.SeedSequence(engine_seed, spawn_key=key))


def make_samples(leader: Request, make: Callable[[str, SamplingParams, int], Request]) -> None:
    """Give `leader` (an `n > 1` or `best_of > 1` request) its other samples, in
    `leader.forks`; `make(id, params, sample_index)` builds one `Request`."""
    leader.forks = [
        make(f"{i}_{leader.request_id}", sample_params(leader.sampling, i), i)
        for i in range(1, leader.sampling.num_samples)
    ]


class SampleForks:
    """Starts the samples of one scheduler's `n > 1` requests (see the module doc). Whether they
    share the prompt's blocks is decided once, here, from the capabilities of the KV manager
    (`ForkableKV`) and of the scheduler (`JoinableScheduler`)."""

    def __init__(self, scheduler: Scheduler, kv: KVCacheManager, share: bool = True) -> None:
        self.scheduler = scheduler
        joinable = scheduler if isinstance(scheduler, JoinableScheduler) else None
        forkable = kv if isinstance(kv, ForkableKV) and kv.retains_kv else None
        #: seats of `max_num_seqs`, where the scheduler reserves them for a leader's samples
        self.max_num_seqs = None if joinable is None else joinable.max_num_seqs
        self._join = joinable if share and forkable is not None else None
        self._fork = forkable if self._join is not None else None

    def check(self, leader: Request) -> str | None:
        """Why the samples of `leader` could never run together here, or None."""
        if self.max_num_seqs is not None and leader.num_seats > self.max_num_seqs:
            return (f"more samples than max_num_seqs: n={leader.num_seats} > max_num_seqs="
                    f"{self.max_num_seqs}; lower n or raise max_num_seqs")
        return None

    def start(self, plan: StepPlan, now_s: float) -> list[tuple[Request, str]]:
        """At the completion of `plan` (before it is committed): every leader whose prompt this
        step finished forks its prompt KV to its other samples, which join the running batch
        (or, without sharing, the queue). Returns the samples the scheduler refused, with the
        reason."""
        refused = []
        for seq in plan.seqs:
            leader = seq.request
            if not leader.forks or not seq.samples or leader.num_output_tokens:
                continue
            num_shared = leader.num_prompt_tokens - 1
            children, leader.forks = leader.forks, []  # its reserved seats pass to them
            for child in children:
                if self._fork is not None and self._join is not None and num_shared > 0:
                    self._fork.fork(leader, child, num_shared)
                    child.num_computed = num_shared
                    child.first_scheduled_s = now_s
                    self._join.join(child)
                    continue
                reason = self.scheduler.add(child)  # holds nothing: queued like any request
                if reason is not None:
                    refused.append((child, reason))
        return refused
