"""Continuous (iteration-level) batching: requests join and leave the batch every step.

Each step first gives every running request its next tokens (a decode, or the rest of its
prompt), then admits waiting requests first-come-first-served while `max_num_seqs`, the token
budget `max_num_batched_tokens` and KV memory allow; a request that cannot be admitted blocks the
ones behind it (FCFS, no overtaking). Finished requests leave at once and free their KV, so a
short request never waits for a long one.

References: Yu et al., "Orca: A Distributed Serving System for Transformer-Based Generative
Models" (OSDI'22), iteration-level scheduling; vLLM `vllm/v1/core/sched/scheduler.py`.
"""

from __future__ import annotations

from collections import deque

from batching.admission import never_runs
from batching.base import ScheduledSeq, StepPlan, StepResult, shape_of
from batching.commit import StopCriteria, commit_step, finish
from cache.base import KVCacheManager
from sim.request import Request, Status


class ContinuousScheduler:
    def __init__(
        self,
        kv: KVCacheManager,
        stop: StopCriteria,
        max_num_seqs: int,
        max_num_batched_tokens: int,
    ) -> None:
        self.kv = kv
        self.stop = stop
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        # the head of `waiting` could not be admitted beside a plain-decode batch at the last
        # schedule() and nothing has been freed since
        self._head_blocked = False

    def add(self, request: Request) -> str | None:
        reason = never_runs(request, self.kv, self.stop, self.max_num_batched_tokens)
        if reason is None:
            self.waiting.append(request)
        return reason

    def schedule(self, now_s: float) -> StepPlan | None:
        budget = self.max_num_batched_tokens
        seqs: list[ScheduledSeq] = []
        kv = self.kv
        for req in self.running:
            n = req.num_tokens - req.num_computed
            if n > budget or not kv.allocate(req, req.num_tokens):
                continue
            seqs.append(ScheduledSeq(req, req.num_computed, n))
            budget -= n
        while self.waiting and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            n = req.num_tokens - req.num_computed
            if n > budget or not kv.allocate(req, req.num_tokens):
                break
            self.waiting.popleft()
            self.running.append(req)
            req.status = Status.RUNNING
            if req.first_scheduled_s != req.first_scheduled_s:  # NaN: first time
                req.first_scheduled_s = now_s
            seqs.append(ScheduledSeq(req, req.num_computed, n))
            budget -= n
        # a head blocked beside a plain-decode batch stays blocked while that batch decodes
        self._head_blocked = bool(self.waiting) and all(s.num_new_tokens == 1 for s in seqs)
        if not seqs:
            return None
        planned = tuple(seqs)
        return StepPlan(planned, shape_of(planned))

    def update(self, plan: StepPlan, result: StepResult, now_s: float) -> list[Request]:
        stopped = commit_step(plan, result, now_s, self.kv.retains_kv, self.stop)
        for req in stopped:
            finish(req, now_s)
            self.kv.free(req)
        if stopped:
            self.running = [r for r in self.running if not r.is_finished]
            self._head_blocked = False
        return stopped

    def coast_horizon(self) -> int:
        """How many upcoming steps are certain to be plain decodes of exactly the running batch
        with no request stopping, admission or KV change (a blocked queue head stays blocked
        while the batch only decodes; in timing-only mode only
        `max_tokens` and `max_model_len` can stop a request). 0 when unsure.

        The engine uses it to run such steps without building a plan per step; the result is
        identical to scheduling them one by one (tested).
        """
        if (self.waiting and not self._head_blocked) or not self.running or not self.kv.retains_kv:
            return 0
        if len(self.running) > self.max_num_batched_tokens:
            return 0
        horizon = self.stop.max_model_len
        for req in self.running:
            if req.num_computed != req.num_tokens - 1:
                return 0
            left = self.stop.max_model_len - req.num_tokens
            if req.sampling.max_tokens is not None:
                left = min(left, req.sampling.max_tokens - req.num_output_tokens)
            horizon = min(horizon, left - 1)  # the step that may stop a request is not coasted
            if not self.kv.allocate(req, req.num_tokens + max(horizon, 0)):
                return 0
        return max(horizon, 0)

    def coast(self, step_end_times_s: list[float]) -> None:
        """Commit plain decode steps of every running request, ending at these times."""
        num_steps = len(step_end_times_s)
        for req in self.running:
            req.num_computed += num_steps
            req.num_output_tokens += num_steps
            req.token_times_s.extend(step_end_times_s)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def abort_all(self, reason: str) -> list[Request]:
        aborted = [*self.running, *self.waiting]
        for req in aborted:
            self.kv.free(req)
        self.running, self.waiting = [], deque()
        return aborted

