"""Speculative decoding in the engine: how many drafts each step, what they cost, what they gave.

`Speculation` is built by the engine from `EngineArgs.speculative_config` and plugs into one run:

- **control**: the continuous scheduler asks `num_spec_tokens(req, budget, max_model_len)` for
  every decoding request: k (fixed, or `AdaptiveK` from the measured acceptance), capped by the
  token budget (draft tokens count against `max_num_batched_tokens`), by `max_tokens` and by
  `max_model_len`; for n-gram lookup in functional mode, by the drafts actually found in the
  request's committed tokens (as vLLM's CPU-side proposer, so a miss costs nothing);
- **functional**: the functional executor with this run's `DraftVerifier` (`verifier`): the
  n-gram or draft-model proposer (a controlled proxy of the target, or `model`'s own
  functional weights), over the same store and KV codec as a run without speculation;
- **timing**: the target verifies k + 1 tokens per speculating sequence in one pass (the step
  shape carries them, with `num_logits`); a draft model is priced as its own model shape on the
  target's GPUs (one GPU, the TP group, or one rank of it), k autoregressive draft steps
  per engine step (the first one catching up on the tokens the draft has not seen); n-gram
  lookup is free. Timing-only runs take acceptance from `acceptance_rate` (i.i.d.) or
  `acceptance_trace` (replayed) (`acceptance`);
- **observation**: accepted / proposed counts per step, per draft position and per request.

The draft model's weights and KV come out of the target's KV pool (`sim.engine.build
build_memory_plan`). With tensor parallelism the target verifies sharded and the draft runs on the
TP group or on one rank (`draft_tensor_parallel_size`; priced by `sim.engine.build
build_draft_cost`). Left out (said in the README): pipeline and data parallelism (the engine loop
runs speculation on one lane).

References: vLLM `vllm/v1/spec_decode/` and `vllm/v1/core/sched/scheduler.py` (spec tokens in the
token budget, `num_computed_tokens` moved back by the rejected count); Leviathan et al. 2023.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from sim.core.errors import ConfigError
from sim.core.protocols import Pricer
from sim.core.request import Request
from sim.core.step import StepPlan, StepResult
from sim.timing.cost_model import CostModel
from speculative.analysis import AdaptiveK, cost_ratio
from speculative.config import SpeculativeConfig, draft_model_shape

if TYPE_CHECKING:  # the executors import the functional model: only functional runs need it
    from sim.executor.functional import Speculator
    from speculative.executor import AcceptanceModel, BatchProposer


#: acceptance over a run (`Speculation.summary`): counts, rates, per-position acceptance
SpeculationSummary = dict[str, str | int | float | list[float]]


class Speculation:
    """The engine's speculative-decoding component (see module doc)."""

    def __init__(self, engine: Any, draft_cost: Pricer | None = None) -> None:
        args = engine.args
        cfg = SpeculativeConfig.from_any(args.speculative_config)
        self.config = cfg
        from speculative.tree import TreeShape

        self.tree = None if cfg.tree is None else TreeShape(cfg.tree)
        # drafts verified per step: the tree's node count; draft positions observed: its depth
        self.k_max = cfg.num_speculative_tokens if self.tree is None else self.tree.num_nodes
        self.num_positions = self.k_max if self.tree is None else self.tree.depth
        # (combinations with other settings are refused when EngineArgs is built:
        # sim.engine.compat's speculative_config rules)
        self.functional = args.mode == "functional"
        self.seed = args.seed
        self.draft_shape = draft_model_shape(cfg, engine.model_config)
        #: the draft's pricer: given by the engine (`sim.engine.build.build_draft_cost`: on
        #: the TP group or one rank), else the draft shape on one GPU
        self.draft_cost: Pricer | None = draft_cost
        self.c = 0.0  # draft step / target step, batch 1 (n-gram lookup: free)
        if self.draft_shape is not None:
            if self.draft_cost is None:
                self.draft_cost = CostModel(self.draft_shape, engine.hardware,
                                            dtype=engine.timing_dtype)
            self.c = cost_ratio(self.draft_cost, engine.cost_model)
        self._target_cost = engine.cost_model
        self._c_by_batch: dict[int, float] = {}  # batch size (a power of two) -> c
        self._batch_size = 1  # sequences in the last priced step: the current batch's estimate
        self.proposer: BatchProposer | None = None  # functional mode's
        self.draft_description = "" if self.draft_shape is None else self.draft_shape.name
        memory = engine.memory  # the plan took the draft's weights and KV out of the pool
        self.memory_text = "" if self.draft_shape is None else (
            f"draft memory {memory.draft_weight_bytes / 2**30:.2f} GiB of weights + "
            f"{memory.draft_kv_bytes_per_token / 2**10:.1f} KiB of KV per token per GPU")
        if self.functional:
            self.proposer = self._proposer(engine)
        self.reset()

    # ------------------------------------------------------------------ building
    def _proposer(self, engine: Any) -> BatchProposer:
        from speculative.proposers import DraftModelProposer, NgramProposer, noisy_model

        cfg = self.config
        if cfg.method == "ngram":
            return NgramProposer(cfg.prompt_lookup_min, cfg.prompt_lookup_max)
        target = engine.functional_model
        if cfg.controlled_proxy:
            from speculative.acceptance import truncated_model

            draft = target
            if cfg.draft_num_layers is not None:
                layers = min(cfg.draft_num_layers, target.config.n_layer)
                draft = truncated_model(draft, layers)
            if cfg.draft_noise_scale is not None:
                draft = noisy_model(draft, cfg.draft_noise_scale, cfg.draft_seed)
        else:
            from sim.model.proxy import load_functional_model

            assert cfg.model is not None  # a draft model needs a model or a controlled proxy
            draft, _ = load_functional_model(cfg.model, dtype=engine.args.functional_dtype)
        self.draft_description = draft.config.name
        if self.tree is not None:
            from speculative.tree_proposer import TreeDraftProposer

            return TreeDraftProposer(draft, target.config.n_vocab, self.tree)
        return DraftModelProposer(draft, target.config.n_vocab)

    def describe(self) -> str:
        text = self.config.describe()
        if self.draft_shape is not None:
            if self.functional:
                text += f"; functional draft {self.draft_description}"
            text += f"; draft priced as {self.draft_shape.name} (c={self.c:.3f})"
            text += f"; {self.memory_text}"
        return text

    def verifier(self, num_layers: int) -> Speculator:
        """The functional executor's speculation hook: this run's proposer and the verification
        against a target of `num_layers` layers (`sim.engine.build.build_executor` passes it to
        the one functional executor, with the plain run's store and options)."""
        from speculative.executor import DraftVerifier

        if self.proposer is None:
            raise ConfigError("speculative verification of real drafts needs mode='functional'")
        return DraftVerifier(self.proposer, num_layers, on_release=self.release)

    def acceptance(self) -> AcceptanceModel:
        """Timing-only acceptance: i.i.d. per token at `acceptance_rate`, or the replay of
        `acceptance_trace`."""
        from speculative.executor import IidAcceptance, TraceAcceptance

        cfg = self.config
        if cfg.acceptance_rate is not None:
            return IidAcceptance(cfg.acceptance_rate, self.seed)
        if cfg.acceptance_trace is None:
            raise ConfigError("mode='timing' speculation needs speculative_config "
                              "'acceptance_rate' or 'acceptance_trace'")
        from speculative.acceptance import AcceptanceReplay, AcceptanceTrace

        return TraceAcceptance(AcceptanceReplay(AcceptanceTrace.load(cfg.acceptance_trace)))

    def reset(self) -> None:
        """Fresh counters (one run)."""
        k = self.k_max
        self.adaptive = (AdaptiveK(self.c, k, cost_at=self._c_at) if self.config.adaptive
                         else None)
        self._draft_seen: dict[str, tuple[int, int]] = {}  # rid -> (num_tokens, k) last drafted
        self.num_steps = 0  # verification steps (one per speculating sequence per step)
        self.num_proposed = 0
        self.num_accepted = 0
        self.num_emitted = 0
        self.num_rejections = 0  # steps that rejected a draft (for the i.i.d. estimate of a)
        self.draft_s = 0.0
        self.position_proposed = np.zeros(self.num_positions, dtype=np.int64)  # [k]
        self.position_accepted = np.zeros(self.num_positions, dtype=np.int64)  # [k]

    # ------------------------------------------------------------------ control
    def _c_at(self, batch_size: int) -> float:
        """c (draft step / target step) at `batch_size` rounded up to a power of two (cached):
        at large batches the target's step turns compute-bound and the draft's share grows."""
        bucket = 1 << (batch_size - 1).bit_length()
        if bucket not in self._c_by_batch:
            self._c_by_batch[bucket] = (0.0 if self.draft_cost is None else cost_ratio(
                self.draft_cost, self._target_cost, batch_size=bucket))
        return self._c_by_batch[bucket]

    def num_spec_tokens(self, req: Request, budget: int, max_model_len: int) -> int:
        """Draft tokens to verify after `req`'s decode token this step."""
        k = self.adaptive.k(self._batch_size) if self.adaptive is not None else self.k_max
        left = max_model_len - req.num_tokens - 1  # drafts + bonus stay within max_model_len
        if req.sampling.max_tokens is not None:  # no point drafting past max_tokens
            left = min(left, req.sampling.max_tokens - req.num_output_tokens - 1)
        if self.tree is not None:  # the whole tree or nothing; emits at most depth + 1 tokens
            slots = req.max_len(max_model_len) - req.num_tokens  # the tree's KV slots fit
            return k if min(left, budget) >= self.tree.depth and min(slots, budget) >= k else 0
        k = max(0, min(k, left, budget))
        if k and self.proposer is not None and self.config.method == "ngram":
            k = len(self.proposer.propose(req, k).token_ids)  # a miss proposes nothing
        return k

    # ------------------------------------------------------------------ timing
    def draft_time_s(self, plan: StepPlan) -> float:
        """Seconds the draft model runs this step: k autoregressive draft steps on the target's
        GPU, TP group or one rank of it, as `draft_cost` prices them (0 for n-gram lookup)."""
        self._batch_size = len(plan.seqs)
        if self.draft_cost is None:
            return 0.0
        new: list[int] = []
        ctx: list[int] = []
        ks: list[int] = []
        for s in plan.seqs:
            k = s.num_spec_tokens
            if not k:
                continue
            req = s.request
            last = self._draft_seen.get(req.request_id)
            # the draft holds KV of the context it drafted from plus its first k - 1 drafts;
            # what still matches the committed tokens is kept, the rest is recomputed
            seen = 0 if last is None else min(last[0] + last[1] - 1, req.num_tokens - 1)
            new.append(req.num_tokens - seen)
            ctx.append(seen)
            ks.append(k)
            # a tree's draft KV is dropped after drafting: only the context stays seen
            self._draft_seen[req.request_id] = (req.num_tokens, 1 if self.tree else k)
        if not ks:
            return 0.0
        draft_s = self.draft_cost.step_time_s(tuple(new), tuple(ctx))
        if self.tree is not None:  # one draft step per deeper level: its nodes as new tokens
            sizes = self.tree.level_sizes
            for j in range(1, self.tree.depth):
                draft_s += self.draft_cost.step_time_s(
                    (sizes[j - 1],) * len(ks), tuple(c + n + sum(sizes[: j - 1])
                                                     for c, n in zip(ctx, new, strict=True)))
            self.draft_s += draft_s
            return draft_s
        base = np.array([c + n for c, n in zip(ctx, new, strict=True)])  # [n_spec]
        kk = np.array(ks)  # [n_spec]
        for j in range(1, max(ks)):
            alive = kk > j  # [n_spec] sequences that draft a (j+1)-th token
            num = int(alive.sum())
            draft_s += self.draft_cost.step_time_s((1,) * num, tuple((base[alive] + j - 1).tolist()))
        self.draft_s += draft_s
        return draft_s

    # ------------------------------------------------------------------ observation
    def observe(self, plan: StepPlan, result: StepResult) -> None:
        """Record what a completed step's verification accepted."""
        emitted = result.emitted
        if emitted is None:
            return
        for i, s in enumerate(plan.seqs):
            k = s.num_spec_tokens
            if not k:
                continue
            accepted = len(emitted[i]) - 1
            self.num_steps += 1
            self.num_proposed += k
            self.num_accepted += accepted
            self.num_emitted += accepted + 1
            n_pos = k if self.tree is None else self.tree.depth
            self.num_rejections += accepted < n_pos
            self.position_proposed[:n_pos] += 1
            self.position_accepted[:accepted] += 1
            s.request.spec_proposed.append(k)
            s.request.spec_accepted.append(accepted)
            if self.adaptive is not None:
                self.adaptive.observe(accepted, k)

    def release(self, req: Request) -> None:
        self._draft_seen.pop(req.request_id, None)

    def summary(self) -> SpeculationSummary:
        """Acceptance over the run: overall, per draft position, mean tokens per step."""
        per_pos = np.divide(self.position_accepted, self.position_proposed,
                            out=np.zeros(self.num_positions), where=self.position_proposed > 0)  # [k]
        return {
            "method": self.config.method,
            "num_speculative_tokens": self.k_max,
            "num_verification_steps": self.num_steps,
            "num_draft_tokens": self.num_proposed,
            "num_accepted_tokens": self.num_accepted,
            "acceptance_rate": self.num_accepted / self.num_proposed if self.num_proposed else 0.0,
            # the i.i.d. per-token rate a that explains the counts (maximum likelihood)
            "alpha_estimate": (self.num_accepted / (self.num_accepted + self.num_rejections)
                               if self.num_accepted + self.num_rejections else 0.0),
            "mean_tokens_per_step": self.num_emitted / self.num_steps if self.num_steps else 0.0,
            "per_position_acceptance": per_pos.tolist(),
            "draft_s": self.draft_s,
            "cost_ratio_c": self.c,
        }
