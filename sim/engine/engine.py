"""The engine: requests in, a discrete-event simulation, tokens and metrics out.

One loop drives everything (`sim.engine.loop`, for every parallel layout; each optional feature
is a hook of it, `sim.engine.hooks`): at each dispatch the scheduler plans a step from committed
state, the executor computes it (real tokens, or none in timing mode), the cost model prices its
shape, and a `StepDone` event at `now + cost` commits the results. Arrivals stream in lazily from
any iterable, so a million-request workload never sits in memory.

A request that can never run is rejected with a reason when it arrives; if the queue ever stalls
with nothing running and nothing left to arrive, the remaining requests are rejected with a
reason rather than retried forever.

References: vLLM `vllm/v1/engine/core.py` (step loop); Vidur (Agrawal et al., MLSys'24) for the
simulated-clock serving loop.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from batching.admission import AdmissionControl
from cache.beam_search import BeamGroup
from cache.parallel_sampling import make_samples, sample_rng
from parallel.plan import ParallelPlan
from sim.core.errors import ConfigError
from sim.core.protocols import Pricer
from sim.core.quantization import quant_spec
from sim.core.request import Request, SamplingParams
from sim.core.step import StepPlan
from sim.engine.args import EngineArgs
from sim.engine.build import (
    build_cost_model,
    build_draft_cost,
    build_functional,
    build_memory_plan,
    kv_text,
)
from sim.engine.compat import check_compatible
from sim.engine.lanes import ParallelStats
from sim.engine.loop import run_engine
from sim.engine.records import SimulationResult, StepCharge
from sim.model.sampling import bad_words_token_ids
from sim.model.tokenizer import ByteTokenizer
from sim.model.zoo import resolve_model
from sim.timing.hardware import load_profile
from sim.timing.memory_plan import MemoryPlan
from sim.workload.specs import RequestSpec

if TYPE_CHECKING:
    from speculative.decoding import Speculation


class Engine:
    """Builds the model, cost model, memory plan, KV manager, scheduler and executor from
    `EngineArgs`, then simulates request streams with `run`."""

    #: timing-only fast path for plain-decode stretches (identical results; off only in tests)
    coast_enabled = True

    def __init__(self, args: EngineArgs) -> None:
        self.args = args
        self.model_config = resolve_model(args.model)
        self.hardware = load_profile(args.hardware)
        self.timing_dtype = args.timing_dtype(self.model_config.dtype)
        kv_dtype = None if args.kv_cache_dtype == "auto" else args.kv_cache_dtype
        spec = quant_spec(args.quantization, args.quantization_group_size)
        #: the quantization method as it runs on this device (fp8 may fall back to weight-only)
        self.quantization = None if spec is None else spec.resolve(self.hardware)
        self.plan = ParallelPlan.from_args(args.tensor_parallel_size,
                                           args.pipeline_parallel_size, args.data_parallel_size,
                                           args.enable_expert_parallel)
        self.sharded = self.plan.tp * self.plan.pp > 1  # one replica spans several GPUs
        #: what the lanes did in the last run (None when it ran on one lane)
        self.parallel_stats: ParallelStats | None = None
        self.cost_model: Pricer = build_cost_model(self, kv_dtype)
        self.max_model_len = args.max_model_len or self.model_config.max_position_embeddings
        if self.max_model_len > self.model_config.max_position_embeddings:
            raise ConfigError(
                f"max_model_len={self.max_model_len} exceeds the model's "
                f"max_position_embeddings ({self.model_config.max_position_embeddings}); "
                "lower max_model_len"
            )
        # vLLM's defaults: a whole prompt must fit one step, unless prompts are chunked
        self.max_num_batched_tokens = args.max_num_batched_tokens or (
            2048 if args.enable_chunked_prefill else max(self.max_model_len, 2048))
        self.memory: MemoryPlan = build_memory_plan(self, kv_dtype)
        #: the KV pool: the memory plan's, or `num_gpu_blocks_override` blocks (as in vLLM)
        self.num_kv_blocks = args.num_gpu_blocks_override or self.memory.num_kv_blocks
        self.num_kv_tokens = self.num_kv_blocks * args.block_size
        # (under KV eviction a request holds at most its prompt or its budget: checked per
        # request when it arrives)
        if (args.kv_cache != "none" and args.kv_eviction is None
                and self.num_kv_tokens < self.max_model_len):
            raise ConfigError(
                f"max_model_len={self.max_model_len} is larger than the KV cache "
                f"({self.num_kv_tokens} tokens for {self.model_config.name} on "
                f"{self.hardware.name}); lower max_model_len, raise gpu_memory_utilization or "
                "use a larger GPU"
            )
        self.tokenizer = None
        self.functional_description = "none (timing-only: token counts)"
        self.eos_token_ids: frozenset[int] = frozenset()
        self.functional_model: Any = None  # the NumPy model (functional mode only)
        if args.mode == "functional":
            (self.functional_model, self.tokenizer, self.eos_token_ids,
             self.functional_description) = build_functional(self)
        self.description = (
            f"functional: {self.functional_description}; timing: {self.model_config.name} "
            f"({self.timing_dtype}) on {self.hardware.display_name}; kv_cache={kv_text(self)}, "
            f"scheduler={args.scheduler}"
        )
        if self.quantization is not None:
            self.description += f"; quantization={self.quantization.describe()}"
        self._warned_no_ids = False  # the prefix-caching warning is given once per engine
        self.speculation: Speculation | None = None
        if args.speculative_config is not None:
            from speculative.decoding import Speculation

            self.speculation = Speculation(self, draft_cost=build_draft_cost(self))
            self.description += f"; speculative: {self.speculation.describe()}"

    # ------------------------------------------------------------------ building blocks
    @property
    def kv_block_bytes(self) -> float:
        """Bytes of one KV block on one GPU (what a swap moves): the target's KV, plus the
        speculative draft's for the same tokens when a draft model shares the pool."""
        per_token = self.memory.kv_bytes_per_token + self.memory.draft_kv_bytes_per_token
        return per_token * self.args.block_size

    def charge(self, plan: StepPlan, busy_s: float, draft_s: float = 0.0) -> StepCharge:
        """The step's charge: `busy_s` of compute (`draft_s` of it the draft model's), then the
        KV block moves `plan` needs (`StepPlan.kv`, what its scheduler's manager queued):
        blocks swapped out and in over the host link, and copy-on-write copies in device
        memory (read + write)."""
        work = plan.kv
        num_copied = work.num_copied_blocks
        if not (work.num_swapped_out_blocks or work.num_swapped_in_blocks or num_copied):
            return StepCharge(busy_s, draft_s)
        hw = self.hardware
        link, eff = hw.host_link, hw.efficiency["host_link_bandwidth"]
        swap_s = (link.transfer_s(work.num_swapped_out_blocks * self.kv_block_bytes, eff)
                  + link.transfer_s(work.num_swapped_in_blocks * self.kv_block_bytes, eff))
        copy_s = (2 * num_copied * self.kv_block_bytes
                  / (hw.hbm_bytes_per_s * hw.efficiency["memory_bandwidth"]))
        return StepCharge(busy_s, draft_s, swap_s, copy_s, num_copied)

    def request_from_spec(self, spec: RequestSpec, index: int) -> Request:
        """A request for a workload item: greedy, `ignore_eos`, `max_tokens` = its output length
        (vLLM benchmark_serving's convention), random prompt ids in functional mode."""
        params = SamplingParams(temperature=0.0, max_tokens=spec.output_len, ignore_eos=True)
        ids = None
        if (self.args.enable_prefix_caching and spec.prompt_token_ids is None
                and self.args.mode == "timing" and not self._warned_no_ids):
            self._warned_no_ids = True
            warnings.warn(
                "enable_prefix_caching on a workload without token ids (e.g. an Azure trace: "
                "lengths only): no prefix can be shared, so every request misses the cache; use "
                "a workload with prompt_token_ids (shared-prefix, ShareGPT) to measure it",
                stacklevel=2)
        if self.args.enable_prefix_caching and spec.prompt_token_ids is not None:
            ids = list(spec.prompt_token_ids)  # timing mode too: prefix caching hashes ids
        elif self.args.mode == "functional":
            if spec.prompt_token_ids is not None:
                ids = list(spec.prompt_token_ids)
            elif spec.prompt_len > self.max_model_len:
                pass  # refused at arrival as too long: no ids drawn (1e11 of them would not fit)
            else:
                rng = np.random.default_rng(np.random.SeedSequence(self.args.seed, spawn_key=(index, 1)))
                vocab = min(self.functional_model.config.n_vocab, 256)
                ids = rng.integers(0, vocab, size=spec.prompt_len).tolist()
        return self.make_request(spec.request_id, index, spec.prompt_len, params, spec.arrival_s, ids)

    def make_request(self, request_id: str, index: int, num_prompt_tokens: int,
                     params: SamplingParams, arrival_s: float,
                     prompt_token_ids: list[int] | None = None, prompt: str | None = None) -> Request:
        check_compatible(self.args, params)  # the request-level rules (beam search)
        functional = self.args.mode == "functional"
        self._check_vllm_fields(params)
        keep = params.truncate_prompt_tokens
        if keep is not None:  # vLLM: keep the last k prompt tokens (-1: max_model_len)
            keep = self.max_model_len if keep == -1 else keep
            num_prompt_tokens = min(num_prompt_tokens, keep)
            if prompt_token_ids is not None:
                prompt_token_ids = prompt_token_ids[-num_prompt_tokens:]
        bad_words = (bad_words_token_ids(params.bad_words, self.tokenizer or ByteTokenizer())
                     if params.bad_words and functional else ())

        def build(rid: str, p: SamplingParams, sample_index: int) -> Request:
            return Request(
                request_id=rid, index=index, num_prompt_tokens=num_prompt_tokens,
                sampling=p, arrival_s=arrival_s, prompt=prompt, sample_index=sample_index,
                rng=sample_rng(p, self.args.seed, index, sample_index) if functional else None,
                prompt_token_ids=(prompt_token_ids if functional or self.args.enable_prefix_caching
                                  else None),
                keep_tokens=functional,
                logprobs=[] if p.logprobs is not None and functional else None,
                bad_words_token_ids=bad_words,
            )

        if params.use_beam_search:
            return self._beam_request(build(request_id, params, 0))
        req = build(request_id, params, 0)
        if params.num_samples > 1:  # the others fork its prompt KV (cache.parallel_sampling)
            make_samples(req, build)
        return req

    def _check_vllm_fields(self, params: SamplingParams) -> None:
        """Refuse the `SamplingParams` this engine cannot honour, with the reason."""
        functional = self.args.mode == "functional"
        if params.stop and not functional:
            raise ConfigError(
                f"SamplingParams.stop={list(params.stop)!r} needs mode='functional': a stop "
                "string ends a request where its text contains it, and a timing-only run has "
                "no text; use mode='functional', or max_tokens for the output length")
        if params.processes_logits and functional and self.args.speculative_config is not None:
            raise ConfigError(
                "penalties, min_p, logit_bias, allowed_token_ids and bad_words are not "
                "supported with speculative_config in mode='functional': drafts are verified "
                "against the model's raw distribution; drop speculative_config or those fields")

    def _beam_request(self, req: Request) -> Request:
        """A beam-search request (`cache.beam_search`): greedy, `2n` log-probabilities per
        step, its `BeamGroup` attached (what it does not combine with was refused by
        `sim.engine.compat` in `make_request`)."""
        req.sampling = dataclasses.replace(req.sampling, logprobs=2 * req.sampling.n)
        req.logprobs = None  # the search keeps cumulative log-probabilities only
        req.beam = BeamGroup(req, self.eos_token_ids, self.max_model_len)
        return req

    # ------------------------------------------------------------------ the loop
    def run(
        self,
        requests: Iterable[Request | RequestSpec],
        keep_requests: bool = True,
        on_finish: Callable[[Request], None] | None = None,
        record_steps: bool = False,
        max_concurrency: int | None = None,
    ) -> SimulationResult:
        """Simulate `requests` (sorted by arrival) to completion.

        `max_concurrency` caps the requests in flight as `vllm bench serve --max-concurrency`
        does on the client side: a request due while that many are unfinished waits and is
        sent (its arrival time set to then) when one ends.

        `keep_requests=False` keeps only streaming metrics (flat memory for huge workloads);
        `on_finish` sees each request as it ends (e.g. a progress bar); `record_steps` keeps a
        per-step time series (`SimulationResult.steps`; with data or pipeline parallelism every
        lane's steps, labelled by lane). The loop is `sim.engine.loop.EngineLoop`, one for
        every parallel layout.
        """
        return run_engine(self, requests, keep_requests, on_finish, record_steps,
                          max_concurrency)

    def admission_control(self) -> AdmissionControl:
        a = self.args
        cost = self.cost_model

        def prefill_s(num_tokens: int) -> float:
            return cost.step_time_s((max(num_tokens, 1),), (0,), 1)

        return AdmissionControl(a.admission_max_waiting, a.admission_rate_per_s,
                                a.admission_burst, a.admission_ttft_slo_s, prefill_s,
                                cost.step_time_s)

    def price(self, plan: StepPlan) -> StepCharge:
        """The charge of a one-stage step: the cost model's price of its shape, the draft
        model's steps before the verification pass, then its KV moves."""
        shape = plan.shape
        step_s = self.cost_model.step_time_s(shape.num_new_tokens, shape.num_context_tokens,
                                             shape.total_logits)
        draft_s = 0.0
        if self.speculation is not None:  # the draft model runs before the verification pass
            draft_s = self.speculation.draft_time_s(plan)
            step_s += draft_s
        return self.charge(plan, step_s, draft_s)
