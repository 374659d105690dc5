"""Continuous (iteration-level) batching: requests join and leave the batch every step.

Each step first gives every running request its next tokens (a decode, or the rest of its
prompt), then admits waiting requests in policy order (`batching.policy`: FCFS by default) while
`max_num_seqs`, the token budget `max_num_batched_tokens` and KV memory allow; a request that
cannot be admitted blocks the ones behind it (no overtaking). Finished requests leave at once and
free their KV, so a short request never waits for a long one.

Without chunked prefill a prompt is computed in one step; one that cannot fit beside the running
decodes gets a step of its own (the decodes wait one step) rather than waiting for the batch to
drain. With `enable_chunked_prefill` (Sarathi-Serve) the budget goes to decodes first and prompts
are split into chunks that ride along with them: at most `long_prefill_token_threshold` tokens of
one prompt per step (0: no cap) and at most `max_num_partial_prefills` prompts in progress.

When KV memory runs out the most recently admitted running request is preempted (vLLM's victim
choice); under the `priority` policy a waiting request may also preempt a running one of worse
priority.

Sequences that hold KV already may join the running batch between steps (`join`: the forked
samples of an `n > 1` request, the beams of a beam search); a leader whose samples or beams have
not forked yet holds a seat of `max_num_seqs` for each (`Request.num_seats`). The scheduler keeps
no state of those features: it reads the request (and its beam group) only. With speculative
decoding the policy given at construction (`SpecPolicy`) says how many drafts each decode verifies.

References: Yu et al., "Orca: A Distributed Serving System for Transformer-Based Generative
Models" (OSDI'22), iteration-level scheduling; Agrawal et al., "Taming Throughput-Latency
Tradeoff in LLM Inference with Sarathi-Serve" (OSDI'24), chunked prefill; vLLM
`vllm/v1/core/sched/scheduler.py`.
"""

from __future__ import annotations

from collections.abc import Iterable

from batching.admission import never_runs
from batching.commit import StopCriteria, commit_step, finish
from batching.plan import build_plan
from batching.policy import WaitingQueue
from sim.core.protocols import GrowthCertifier, KVCacheManager, SpecPolicy
from sim.core.request import Request, Status
from sim.core.step import ScheduledSeq, StepPlan, StepResult


class ContinuousScheduler:
    def __init__(
        self,
        kv: KVCacheManager,
        stop: StopCriteria,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        enable_chunked_prefill: bool = False,
        long_prefill_token_threshold: int = 0,
        max_num_partial_prefills: int = 1,
        scheduling_policy: str = "fcfs",
        kv_watermark: float = 0.01,
        speculation: SpecPolicy | None = None,
    ) -> None:
        self.kv = kv
        self.stop = stop
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.chunked = enable_chunked_prefill
        self.long_prefill_token_threshold = long_prefill_token_threshold
        self.max_num_partial_prefills = max_num_partial_prefills
        self.policy = scheduling_policy
        # vLLM v0's block watermark: admit only while this share of the KV pool stays free, so
        # the running requests have room to grow before anyone must be preempted
        self.watermark_tokens = int(kv_watermark * kv.usage().num_total_tokens)
        self.waiting = WaitingQueue(scheduling_policy)
        self.running: list[Request] = []
        # the head of `waiting` could not be admitted beside a plain-decode batch at the last
        # schedule() and nothing has been freed since
        self._head_blocked = False
        self.num_preemptions = 0
        #: KV tokens reserved after each step `coast_horizon` certified (per-step series)
        self.coast_reserved_tokens: list[int] = []
        #: speculative decoding: how many drafts each decode verifies (None: no speculation)
        self.speculation = speculation
        # paged KV: how many plain-decode steps its free blocks surely serve
        self._coast_growth = kv.coast_growth if isinstance(kv, GrowthCertifier) else None
        # running requests admitted while holding more than one seat (`Request.num_seats`)
        self._reserving: dict[Request, None] = {}

    def add(self, request: Request) -> str | None:
        reason = never_runs(request, self.kv, self.stop, self.max_num_batched_tokens,
                            chunked=self.chunked)
        if reason is None:
            self.waiting.add(request)
        return reason

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def waiting_requests(self) -> Iterable[Request]:
        return self.waiting

    def next_wakeup_s(self, now_s: float) -> float | None:
        return None  # only an arrival or a completion gives an idle continuous batch work

    def _seats_taken(self) -> int:
        """Seats of `max_num_seqs` the running requests hold: one each, plus what leaders whose
        samples or beams have not forked yet reserve for them (`Request.num_seats`)."""
        if not self._reserving:
            return len(self.running)
        self._reserving = {r: None for r in self._reserving
                           if r.status is Status.RUNNING and r.num_seats > 1}
        return len(self.running) + sum(r.num_seats - 1 for r in self._reserving)

    def _chunk(self, req: Request, start: int, budget: int) -> int:
        """Tokens of `req` to compute this step from `start`: all of them, or with chunked
        prefill a chunk of the prompt capped by the budget and the long-prefill threshold."""
        n = req.num_tokens - start
        if self.chunked and n > 1:
            if self.long_prefill_token_threshold:
                n = min(n, self.long_prefill_token_threshold)
            n = min(n, budget)
        return n

    def schedule(self, now_s: float) -> StepPlan | None:
        budget = self.max_num_batched_tokens
        seqs: list[ScheduledSeq] = []
        kv = self.kv
        preempted = False
        i = 0
        running, allocate = self.running, kv.allocate  # (the hot loop: names bound once)
        no_spec = self.speculation is None
        while i < len(running):
            req = running[i]
            computed = req.num_computed
            n = req.num_prompt_tokens + req.num_output_tokens - computed
            if n != 1:  # a prompt (or a recompute): chunked with chunked prefill
                n = self._chunk(req, computed, budget)
            if n > budget or n == 0 or (req.beam is not None and req.beam.waits(req)):
                # (a beam that already proposed this round waits for its siblings)
                i += 1
                continue
            # speculative drafts after a decode token, leaving one token for each later request
            k = 0 if no_spec else self._num_spec(req, n, budget - n - (len(running) - i - 1))
            while not allocate(req, computed + n + k):
                # out of KV memory: preempt the most recently admitted running request (vLLM's
                # victim choice), possibly this one, until this one fits
                victim = running.pop()
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
            else:
                seqs.append(ScheduledSeq(req, computed, n + k, k))
                budget -= n + k
                i += 1
        # no admissions in a step that had to preempt (vLLM): memory is short
        partial = sum(1 for r in self.running if r.num_computed < r.num_prompt_tokens)
        while not preempted and self.waiting:
            req = self.waiting.peek()
            short = self._seats_taken() + req.num_seats - self.max_num_seqs
            while short > 0:
                # all seats taken; under the priority policy a better request takes one
                better = self._preempt_worse(req) if self.policy == "priority" else None
                if better is None:
                    break
                budget += self._unschedule(seqs, better)
                preempted = True
                short = self._seats_taken() + req.num_seats - self.max_num_seqs
            if short > 0:
                break
            hit = kv.cached_prefix(req) if req.num_computed == 0 else 0
            start = max(req.num_computed, hit)
            n = self._chunk(req, start, budget)
            if self.chunked and (n == 0 or partial >= self.max_num_partial_prefills):
                break
            # a preempted request longer than the token budget recomputes alone in one step
            alone = not seqs and req.num_preemptions > 0
            own_step = False
            if n > budget and not alone:
                # only running decodes may wait a step (not a prompt, even a 1-token one)
                if self.chunked or any(s.num_new_tokens - s.num_spec_tokens > 1
                                       or s.start < s.request.num_prompt_tokens
                                       for s in seqs) or (
                        n > self.max_num_batched_tokens):
                    break
                # the prompt cannot fit beside the running decodes: it gets this step to itself
                # (the decodes wait one step) instead of waiting for the batch to drain
                own_step = True
            admitted = self._above_watermark(req, start + n - hit) and kv.allocate(req, start + n, hit)
            while not admitted and self.policy == "priority":
                # memory for a better request: preempt running requests of worse priority
                worse = self._preempt_worse(req)
                if worse is None:
                    break
                budget += self._unschedule(seqs, worse)
                preempted = True
                admitted = kv.allocate(req, start + n, hit)
            if not admitted:
                break
            if own_step:
                seqs, budget = [], self.max_num_batched_tokens
            self._admit(req, hit, now_s, seqs, n)
            budget -= n
            partial += req.num_computed + n < req.num_prompt_tokens
        # a head blocked beside a plain-decode batch stays blocked while that batch decodes
        self._head_blocked = (bool(self.waiting) and not preempted
                              and all(s.num_new_tokens == 1 for s in seqs))
        if not seqs:
            return None  # KV work queued here (preemptions) stays queued for the next plan
        return build_plan(kv, seqs)

    def _num_spec(self, req: Request, n: int, budget: int) -> int:
        """Draft tokens to verify after `req`'s decode token this step (0 without speculation,
        and for prefills); they count against the token budget and need KV slots."""
        if self.speculation is None or n != 1 or req.num_computed != req.num_tokens - 1:
            return 0
        return self.speculation.num_spec_tokens(req, budget, self.stop.max_model_len)

    def _admit(self, req: Request, hit: int, now_s: float, seqs: list[ScheduledSeq],
               n: int) -> None:
        self.waiting.pop()
        self.running.append(req)
        if req.num_seats > 1:
            self._reserving[req] = None
        req.status = Status.RUNNING
        if req.first_scheduled_s != req.first_scheduled_s:  # NaN: first time
            req.first_scheduled_s = now_s
            req.num_cached_tokens = hit
        req.num_computed = max(req.num_computed, hit)
        seqs.append(ScheduledSeq(req, req.num_computed, n))

    def _above_watermark(self, req: Request, num_new_tokens: int) -> bool:
        """Whether admitting `req` (its first admission) leaves the watermark free; never blocks
        a request when nothing runs (that would stall)."""
        if not self.watermark_tokens or not self.running or req.num_preemptions:
            return True
        return self.kv.num_free_tokens() - num_new_tokens >= self.watermark_tokens

    def _preempt_worse(self, req: Request) -> Request | None:
        """Priority policy: preempt the running request of worst priority (latest first) if it
        is worse than `req`; the victim, or None when no running request is worse."""
        worse = [r for r in self.running if r.priority > req.priority]
        if not worse:
            return None
        victim = max(worse, key=lambda r: (r.priority, r.arrival_s, r.index))
        self.running.remove(victim)
        self._preempt(victim)
        return victim

    @staticmethod
    def _unschedule(seqs: list[ScheduledSeq], victim: Request) -> int:
        """Drop a preempted request's work from this step; the tokens it had taken."""
        freed = sum(s.num_new_tokens for s in seqs if s.request is victim)
        seqs[:] = [s for s in seqs if s.request is not victim]
        return freed

    def update(self, plan: StepPlan, result: StepResult, now_s: float) -> list[Request]:
        stopped = commit_step(plan, result, now_s, self.kv.retains_kv, self.stop)
        for req in stopped:
            finish(req, now_s)
            self.kv.free(req)
        if stopped:
            self.running = [r for r in self.running if not r.is_finished]
            self._head_blocked = False
        return stopped

    def coast_horizon(self, max_steps: int) -> int:
        """How many upcoming steps (at most `max_steps`) are certain to be plain decodes of
        exactly the running batch with no request stopping, admission or KV change (a blocked
        queue head stays blocked while the batch only decodes; in timing-only mode only
        `max_tokens` and `max_model_len` can stop a request). 0 when unsure.

        The engine uses it to run such steps without building a plan per step; the result is
        identical to scheduling them one by one (tested).
        """
        if (self.waiting and not self._head_blocked) or not self.running or not self.kv.retains_kv:
            return 0
        if len(self.running) > self.max_num_batched_tokens:
            return 0
        horizon = min(self.stop.max_model_len, max_steps)
        for req in self.running:
            if req.num_computed != req.num_tokens - 1:
                return 0
            left = self.stop.max_model_len - req.num_tokens
            if req.sampling.max_tokens is not None:
                left = min(left, req.sampling.max_tokens - req.num_output_tokens)
            horizon = min(horizon, left - 1)  # the step that may stop a request is not coasted
            if horizon <= 0:
                return 0
        if self._coast_growth is not None:  # paged: steps whose new blocks the pool surely has
            self.coast_reserved_tokens = self._coast_growth(self.running, horizon)
            return len(self.coast_reserved_tokens)
        # otherwise no coasted step may need new KV memory (step k allocates num_tokens + k)
        for req in self.running:
            horizon = min(horizon, self.kv.capacity(req) - req.num_tokens + 1)
        self.coast_reserved_tokens = [self.kv.num_reserved_tokens()] * max(horizon, 0)
        return max(horizon, 0)

    def coast(self, step_end_times_s: list[float]) -> None:
        """Commit plain decode steps of every running request, ending at these times."""
        num_steps = len(step_end_times_s)
        for req in self.running:
            if num_steps and req.num_output_tokens == 0:
                # its last prompt token ran as a 1-token step: that step sampled the first token
                req.first_token_s = step_end_times_s[0]
            req.num_computed += num_steps
            req.num_output_tokens += num_steps
            req.token_times_s.extend(step_end_times_s)
            if num_steps:  # what the last coasted step's schedule() would have allocated
                self.kv.allocate(req, req.num_tokens - 1)

    def _preempt(self, victim: Request) -> None:
        """Take the victim's KV (swapped out, or freed for recompute) and requeue it first. A
        beam of a beam search frees its KV and its whole search restarts once the step is done
        (`cache.beam_search`): beams only move in lockstep."""
        if victim.beam is not None:
            self.kv.free(victim)
            victim.beam.restart_pending = True
            victim.num_computed = 0
        elif not self.kv.preempt(victim):
            victim.num_computed = 0
        victim.status = Status.WAITING
        victim.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.requeue(victim)

    def join(self, request: Request, parent: Request | None = None) -> None:
        """`request`, which holds KV already, runs from the next step on: a beam forked from
        `parent` beside it (so victims are still chosen by when the search was admitted), a
        forked sample after everything running (admitted now, it is the first victim)."""
        request.status = Status.RUNNING
        if parent is None or parent not in self.running:
            self.running.append(request)
        else:
            self.running.insert(self.running.index(parent) + 1, request)

    def requeue(self, request: Request) -> None:
        """Queue a request holding no KV first in line (a beam search that restarts)."""
        request.status = Status.WAITING
        self.waiting.requeue(request)

    def remove(self, request: Request) -> None:
        """Take a request out of the queues and free its KV (a beam search drops a beam)."""
        if request in self.running:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self.kv.free(request)
        self._head_blocked = False

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def abort_all(self, reason: str) -> list[Request]:
        aborted = [*self.running, *self.waiting.clear()]
        for req in aborted:
            self.kv.free(req)
        self.running = []
        self._reserving = {}
        return aborted

