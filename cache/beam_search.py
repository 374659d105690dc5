"""Beam search in the engine: beams are sequences that fork each other's KV blocks.

A beam-search request (`SamplingParams(n=w, use_beam_search=True)`) starts as one sequence, the
submitted request, which computes the prompt like any other. Each step in which every live beam
of the prompt has sampled completes a *round* (`sim.model.beam_search.next_beams`, on the `2w`
log-probabilities each beam's step reported):

- a live beam chosen once continues with its chosen token;
- chosen again, it is *forked*: the new beam shares all its KV blocks by reference count
  (`PagedKVCache.fork`) and joins the running batch; the partly filled last block is copied only
  when one of the two writes into it (copy-on-write), so w beams hold their common past once;
- a beam not chosen is dropped: it leaves the batch and its block references are released.

Beams move in lockstep. One that proposed while a sibling could not run (out of token budget)
is *held*: not scheduled, its proposals kept, its token not committed, until the round
completes. A preempted beam restarts its whole search: every beam is dropped and the submitted
request recomputes the prompt (prefix caching may give part of it back); so a search never
waits on a beam stuck in the queue. (vLLM v0 instead swaps a sequence group out and in as a
unit; not modelled.) A beam search reserves `w` seats of `max_num_seqs` from its admission on
(vLLM v0 counts a sequence group's most running sequences), and must fit `w` full-length
sequences in the KV cache and in one step, else it is rejected with the reason at arrival.

Without `fork` (contiguous or no KV cache, or a sharded functional model) a forked beam
recomputes its whole sequence instead: exactly the cost that block sharing removes.

The submitted request is the record the caller gets: after the last round it carries the best
`n` beams (`BeamGroup.result`), one token time per round (TTFT = the first round) and the
best beam's tokens; the internal beams never reach the metrics.

References: Kwon et al., SOSP'23 (PagedAttention) section 4.4 and Fig. 9 (beam search with
copy-on-write block sharing); vLLM v0 `SequenceGroup` and `BlockSpaceManager.fork`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator

from sim.core.errors import InfersimError
from sim.core.protocols import BlockKV, ForkableKV, JoinableScheduler, KVCacheManager, ReservingKV
from sim.core.request import Logprob, Request, Status, reject
from sim.core.step import StepPlan, StepResult
from sim.model.beam_search import BeamSequence, best_beams, next_beams

Entry = tuple[float, dict[int, Logprob]]



def group_of(req: Request) -> BeamGroup:
    """The beam group of a beam-search request (`Request.beam`, typed by its protocol)."""
    group = req.beam
    if not isinstance(group, BeamGroup):
        raise InfersimError(f"request {req.request_id!r} is not a beam of a beam search")
    return group

class BeamGroup:
    """One prompt's beams: the live sequences, this round's proposals, the finished beams."""

    def __init__(self, leader: Request, eos_token_ids: frozenset[int], max_model_len: int) -> None:
        params = leader.sampling
        self.leader = leader
        self.width = params.n
        self.length_penalty = params.length_penalty
        # EOS (unless ignore_eos) and the stop token ids end a beam
        self.eos = (frozenset() if params.ignore_eos else eos_token_ids) | set(
            params.stop_token_ids)
        self.max_model_len = max_model_len
        self.live: list[Request] = [leader]
        self.proposals: dict[str, dict[int, float]] = {}  # request_id -> token -> logprob
        self.finished: list[BeamSequence] = []
        self.round_times_s: list[float] = []
        self.result: list[BeamSequence] | None = None  # the best beams, once done
        #: set by the scheduler when it preempts a beam: the search restarts after the step
        self.restart_pending = False
        self._ids = itertools.count(1)

    @property
    def num_rounds(self) -> int:
        return len(self.round_times_s)

    @property
    def done(self) -> bool:
        return self.result is not None

    def num_seats(self) -> int:
        """Seats of `max_num_seqs` each live beam takes: before the first round the leader
        alone reserves one per beam (vLLM v0 counts a sequence group's most running
        sequences), then one each."""
        return self.width if not self.round_times_s else 1

    def waits(self, req: Request) -> bool:
        """Whether beam `req` proposed this round already: it is held (not scheduled) until its
        siblings have proposed too, so that beams move in lockstep."""
        return req.request_id in self.proposals

    def beam(self, req: Request) -> BeamSequence:
        assert req.prompt_token_ids is not None
        return BeamSequence(req.prompt_token_ids + req.output_token_ids, req.cumulative_logprob,
                            req.num_prompt_tokens)

    def is_last_round(self) -> bool:
        """Whether the round being completed gives every beam its last token."""
        req = self.live[0]
        max_tokens = req.sampling.max_tokens
        return ((max_tokens is not None and req.num_output_tokens + 1 >= max_tokens)
                or req.num_tokens + 1 >= self.max_model_len)

    def fork_request(self, parent: Request, token: int, cum_logprob: float) -> Request:
        """A new beam: `parent`'s sequence plus `token` (no KV of its own yet)."""
        return Request(
            request_id=f"{self.leader.request_id}_beam{next(self._ids)}", index=parent.index,
            num_prompt_tokens=parent.num_prompt_tokens, sampling=parent.sampling,
            arrival_s=parent.arrival_s, prompt_token_ids=parent.prompt_token_ids,
            prompt=parent.prompt, output_token_ids=[*parent.output_token_ids, token],
            num_output_tokens=parent.num_output_tokens + 1, cumulative_logprob=cum_logprob,
            first_scheduled_s=parent.first_scheduled_s, priority=parent.priority, beam=self)

    def finish(self, now_s: float) -> Request:
        """Rank the finished beams and write the best onto the submitted request."""
        self.result = best_beams(self.finished, self.width, self.length_penalty)
        best, leader = self.result[0], self.leader
        leader.output_token_ids = best.output_token_ids
        leader.num_output_tokens = len(leader.output_token_ids)
        leader.cumulative_logprob = best.cum_logprob
        leader.finish_reason = best.finish_reason
        leader.token_times_s = self.round_times_s[: leader.num_output_tokens]
        leader.first_token_s = self.round_times_s[0]
        leader.status = Status.FINISHED
        leader.finished_s = now_s
        self.live = []
        return leader


class BeamSearch:
    """The engine's beam-search hook for one run: completes rounds as steps finish."""

    def __init__(self, scheduler: JoinableScheduler, kv: KVCacheManager,
                 release: Callable[[Request], None], share: bool) -> None:
        self.scheduler = scheduler
        self.kv = kv
        self.release = release  # the executor's: drops a beam's KV contents
        # capabilities, checked once: block sharing, slab reservations, block rounding
        self.forker = kv if share and kv.retains_kv and isinstance(kv, ForkableKV) else None
        self.reservation = kv.reservation_tokens if isinstance(kv, ReservingKV) else None
        self.block_size = kv.block_size if isinstance(kv, BlockKV) else 1
        self.groups: dict[int, BeamGroup] = {}  # searches under way, by id

    def check(self, req: Request) -> str | None:
        """Why this beam search could never complete here, or None."""
        width = req.sampling.n
        max_num_seqs = self.scheduler.max_num_seqs  # the continuous scheduler's limits
        budget = self.scheduler.max_num_batched_tokens
        if width > max_num_seqs:
            return (f"beam width larger than max_num_seqs: {width} beams > max_num_seqs="
                    f"{max_num_seqs}; lower n or raise max_num_seqs")
        if width > budget:
            return (f"beam width larger than max_num_batched_tokens: {width} beams decode in one "
                    f"step > {budget}; raise max_num_batched_tokens")
        longest = req.max_len(group_of(req).max_model_len)
        if self.forker is None and longest > budget and not self.scheduler.chunked:
            return (f"step larger than max_num_batched_tokens: without shared KV a forked beam "
                    f"recomputes up to {longest} tokens in one step > max_num_batched_tokens="
                    f"{budget}; raise it or enable chunked prefill")
        total = self.kv.usage().num_total_tokens
        # contiguous: a slab per beam; paged: whole blocks
        per_beam = self.reservation(req) if self.reservation is not None else longest
        per_beam = -(-per_beam // self.block_size) * self.block_size
        if self.kv.retains_kv and width * per_beam > total:
            return (f"beam search larger than the KV cache: {width} beams of up to {longest} "
                    f"tokens need {width * per_beam} KV slots > the whole cache ({total}); "
                    "lower n or max_tokens, or use a larger GPU")
        return None

    def step_done(self, plan: StepPlan, result: StepResult, now_s: float
                  ) -> tuple[StepPlan, StepResult, list[Request]]:
        """Before `plan` is committed: restart the searches that lost a beam to preemption,
        record the proposals of the beams that sampled, and complete every round that is now
        complete (fork, drop, choose tokens). Returns the plan and result to commit (held,
        dropped and restarted beams taken out, chosen tokens put in) and the submitted requests
        whose search ended."""
        for seq in plan.seqs:
            if seq.request.beam is not None:
                group = group_of(seq.request)
                self.groups[id(group)] = group
        if not self.groups or result.token_ids is None or result.logprobs is None:
            return plan, result, []
        restarted = self.restart_preempted()
        touched: dict[int, BeamGroup] = {}
        for seq, entry in zip(plan.seqs, result.logprobs, strict=True):
            if seq.request.beam is None:
                continue
            group = group_of(seq.request)
            if seq.samples and entry is not None and group not in restarted:
                group.proposals[seq.request.request_id] = {
                    t: lp.logprob for t, lp in entry[1].items()}
                touched[id(group)] = group
        chosen: dict[str, tuple[int, Entry]] = {}  # request_id -> (token, entry) to commit
        ended: list[Request] = []
        for group in touched.values():
            if all(r.request_id in group.proposals for r in group.live):
                ended.extend(self._round(group, plan, now_s, chosen))
        seqs, tokens, entries = [], [], []
        for seq, token, entry in zip(plan.seqs, result.token_ids, result.logprobs, strict=True):
            req = seq.request
            if req.beam is not None and (req.beam in restarted or seq.samples):
                if req.request_id not in chosen:  # restarted, held for its round, or dropped
                    if req.beam not in restarted:
                        req.num_computed = max(req.num_computed, seq.end - 1)
                    continue
                token, entry = chosen.pop(req.request_id)
            seqs.append(seq)
            tokens.append(token)
            entries.append(entry)
        for req_id, (token, entry) in chosen.items():  # held beams outside this step
            held = next(r for g in touched.values() for r in g.live if r.request_id == req_id)
            _append(held, token, entry[0])
        return (StepPlan(tuple(seqs), plan.shape),
                StepResult(tuple(tokens), tuple(entries)), ended)

    def restart_preempted(self) -> list[BeamGroup]:
        """Restart every search that lost a beam to preemption; those restarted."""
        restarted = [g for g in self.groups.values() if g.restart_pending]
        for group in restarted:
            self._restart(group)
        return restarted

    def _restart(self, group: BeamGroup) -> None:
        """A beam was preempted: drop every beam and start the search again from the prompt
        (the submitted request recomputes it; prefix caching may give part of it back)."""
        leader = group.leader
        for req in group.live:
            self._drop(req)
        if leader not in group.live:
            self.release(leader)
        leader.output_token_ids = []
        leader.num_output_tokens = 0
        leader.cumulative_logprob = 0.0
        leader.num_computed = 0
        leader.status = Status.WAITING
        group.live = [leader]
        group.proposals.clear()
        group.finished.clear()
        group.round_times_s.clear()
        group.restart_pending = False
        self.scheduler.requeue(leader)

    def _round(self, group: BeamGroup, plan: StepPlan, now_s: float,
               chosen: dict[str, tuple[int, Entry]]) -> list[Request]:
        live = group.live
        picks, finished = next_beams([group.beam(r) for r in live],
                                     [group.proposals[r.request_id] for r in live],
                                     group.width, group.eos)
        group.proposals.clear()
        group.finished.extend(finished)
        group.round_times_s.append(now_s)
        if group.is_last_round():
            for _, beam in picks:
                beam.finish_reason = "length"
                group.finished.append(beam)
            for req in live:
                self._drop(req)
            self.groups.pop(id(group), None)
            return [group.finish(now_s)]
        sampled = {s.request.request_id for s in plan.seqs if s.samples}
        new_live: list[Request] = []
        for i, beam in picks:
            parent = live[i]
            token = beam.tokens[-1]
            if parent.request_id not in chosen:  # the first pick of a beam continues it
                chosen[parent.request_id] = (token, (beam.cum_logprob - parent.cumulative_logprob,
                                                     {}))
                new_live.append(parent)
                continue
            child = group.fork_request(parent, token, beam.cum_logprob)
            if self.forker is not None:  # blocks shared; copy-on-write when written
                # a parent held from an earlier step has KV up to its num_computed
                shared = parent.num_tokens if parent.request_id in sampled else parent.num_computed
                self.forker.fork(parent, child, shared)
                child.num_computed = shared
            # (without sharing the new beam recomputes its sequence in the running batch)
            self.scheduler.join(child, parent)
            new_live.append(child)
        kept = {id(r) for r in new_live}
        for req in live:
            if id(req) not in kept:
                self._drop(req)
        group.live = new_live
        return []

    def _drop(self, req: Request) -> None:
        if req.status is Status.RUNNING or req.status is Status.WAITING:
            self.scheduler.remove(req)
        self.release(req)
        if req is not group_of(req).leader:
            req.status = Status.FINISHED

    def surface(self, reqs: Iterable[Request]) -> Iterator[Request]:
        """The requests the engine should report among `reqs`, which ended outside a round
        (aborted): others as they are; an aborted beam ends its whole search, reported once,
        rejected with the beam's reason, on the submitted request."""
        for req in reqs:
            if req.beam is None:
                yield req
                continue
            group = group_of(req)
            if req is not group.leader:
                self.release(req)
            if group.done:
                continue
            self._abort(group, req)
            if req is not group.leader:
                reject(group.leader, req.reject_reason or "a beam was aborted")
            yield group.leader

    def _abort(self, group: BeamGroup, cause: Request) -> None:
        for req in group.live:
            if req is not cause and req is not group.leader:
                self._drop(req)
        group.live = []
        group.result = []
        self.groups.pop(id(group), None)


def _append(req: Request, token: int, logprob: float) -> None:
    """Commit a chosen token to a held beam that is not in the step (it recomputes after)."""
    req.output_token_ids.append(token)
    req.num_output_tokens += 1
    req.cumulative_logprob += logprob
    req.num_computed = min(req.num_computed, req.num_tokens - 1)
