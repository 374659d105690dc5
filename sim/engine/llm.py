"""`LLM`: vLLM's offline API over the simulator.

    from sim import LLM, SamplingParams
    llm = LLM(model="meta-llama/Llama-2-7b-chat-hf", max_num_seqs=256)
    outputs = llm.generate(["Hello, my name is"], SamplingParams(temperature=0.7, top_p=0.9))
    print(outputs[0].outputs[0].text, outputs[0].metrics.first_token_time)

Tokens come from the functional model (a seeded tiny proxy of the named shape, or the real
weights of a local checkpoint folder); times are simulated seconds for the named model on the
named hardware. `llm.last_result` holds the run's summary metrics.

References: vLLM `vllm/entrypoints/llm.py`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, cast

from tqdm.auto import tqdm

from cache.beam_search import group_of
from sim.core.errors import ConfigError
from sim.core.request import (
    CompletionOutput,
    Request,
    RequestMetrics,
    RequestOutput,
    SamplingParams,
    Status,
)
from sim.engine.args import EngineArgs
from sim.engine.engine import Engine
from sim.engine.records import SimulationResult
from sim.model.gguf_tokenizer import GGUFTokenizer
from sim.model.tokenizer import ByteTokenizer
from sim.model.zoo import DEFAULT_MODEL
from sim.workload.specs import RequestSpec

PromptType = str | dict[str, Any]


class LLM:
    """An offline inference engine whose clock is simulated (vLLM's `LLM`)."""

    def __init__(self, model: str = DEFAULT_MODEL, **kwargs: Any) -> None:
        self.engine_args = EngineArgs.from_kwargs(model=model, **kwargs)
        self.engine = Engine(self.engine_args)
        self.last_result: SimulationResult | None = None
        self._counter = 0

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer or ByteTokenizer()

    def _encode(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.get_tokenizer().encode(prompt)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            ids = [int(t) for t in prompt["prompt_token_ids"]]
            return prompt.get("prompt"), ids
        if isinstance(prompt, dict) and "prompt" in prompt:
            return self._encode(prompt["prompt"])
        raise ConfigError(
            f"a prompt must be a string or a dict with 'prompt_token_ids' (or 'prompt'), got "
            f"{type(prompt).__name__}"
        )

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt (all arriving at t = 0) and return outputs in prompt order.

        `priority` (one per prompt; lower runs first) matters with
        `scheduling_policy="priority"`, as in vLLM."""
        if isinstance(prompts, str | dict):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params_list = (
            [sampling_params] * len(prompts)
            if isinstance(sampling_params, SamplingParams)
            else list(sampling_params)
        )
        if len(params_list) != len(prompts):
            raise ConfigError(
                f"got {len(params_list)} SamplingParams for {len(prompts)} prompts; pass one, or "
                "one per prompt"
            )
        requests: list[Request] = []
        for prompt, params in zip(prompts, params_list, strict=True):
            text, ids = self._encode(prompt)
            if not ids:
                raise ConfigError("an empty prompt cannot be generated from; give it a token")
            requests.append(self.engine.make_request(
                str(self._counter), len(requests), len(ids), params, 0.0, ids, text))
            self._counter += 1
        if priority is not None:
            if len(priority) != len(requests):
                raise ConfigError(f"got {len(priority)} priorities for {len(requests)} prompts")
            for req, value in zip(requests, priority, strict=True):
                req.priority = int(value)
        bar = tqdm(total=len(requests), desc="Processed prompts", disable=not use_tqdm)
        try:
            result = self.engine.run(requests, on_finish=lambda _: bar.update())
        finally:
            bar.close()
        self.last_result = result
        samples: dict[int, list[Request]] = {}  # n > 1: every sample of a prompt, by index
        for req in result.requests:
            samples.setdefault(req.index, []).append(req)
        return [self._output(sorted(samples[i], key=lambda r: r.sample_index))
                for i in sorted(samples)]

    def beam_search(self, prompts: Sequence[PromptType], params: Any) -> list[Any]:
        """Beam search (vLLM's `LLM.beam_search`): `params` a `sim.model.beam_search.BeamSearchParams`;
        one `BeamSearchOutput` per prompt, its beams best first."""
        from sim.model.beam_search import beam_search

        return beam_search(self, list(prompts), params)

    def chat(
        self,
        messages: Sequence[dict[str, Any]] | Sequence[Sequence[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of `{"role", "content"}` dicts) or to
        several (a list of such lists), with the model's chat template applied (vLLM's `chat`)."""
        tokenizer = self.get_tokenizer()
        if not isinstance(tokenizer, GGUFTokenizer):  # the one tokenizer with a chat template
            raise ConfigError(
                f"model {self.engine_args.model!r} has no chat template (its tokenizer is "
                f"{type(tokenizer).__name__}); use a model with one, e.g. "
                "HuggingFaceTB/SmolLM2-135M-Instruct, or generate() with a plain prompt")
        one = bool(messages) and isinstance(messages[0], dict)  # one conversation, not a list
        conversations = cast(Sequence[Sequence[dict[str, Any]]], [messages] if one else messages)
        prompts: list[PromptType] = []
        for conversation in conversations:
            text = tokenizer.apply_chat_template(
                list(conversation), add_generation_prompt=add_generation_prompt,
                chat_template=chat_template)
            assert isinstance(text, str)  # tokenize=False: the prompt text
            prompts.append({"prompt": text,
                            "prompt_token_ids": tokenizer.encode(text, add_bos=False)})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def simulate(self, workload: Iterable[RequestSpec], keep_requests: bool = False) -> SimulationResult:
        """Serve a workload (arrivals over time) and return its metrics."""
        self.last_result = self.engine.run(workload, keep_requests=keep_requests)
        return self.last_result

    def _completion(self, req: Request) -> CompletionOutput:
        ids = list(req.output_token_ids)
        tokenizer = self.get_tokenizer()
        text = tokenizer.decode(ids, skip_special_tokens=req.sampling.skip_special_tokens) if ids else ""
        return CompletionOutput(
            index=req.sample_index,
            text=text,
            token_ids=ids,
            cumulative_logprob=req.cumulative_logprob if req.logprobs is not None else None,
            logprobs=req.logprobs,
            finish_reason=req.finish_reason,
            stop_reason=req.stop_reason if req.stop_reason is not None else req.reject_reason,
        )

    def _beam_completion(self, index: int, beam: Any) -> CompletionOutput:
        """One beam of a beam search (`sim.model.beam_search.BeamSequence`), best first."""
        ids = beam.output_token_ids
        return CompletionOutput(index=index, text=self.get_tokenizer().decode(ids),
                                token_ids=ids, cumulative_logprob=beam.cum_logprob,
                                logprobs=None, finish_reason=beam.finish_reason)

    def _output(self, samples: list[Request]) -> RequestOutput:
        """One prompt's `RequestOutput` from its samples (one unless `n > 1`), sample 0 first;
        times span all samples (first token of any, last token and finish of all)."""
        req = samples[0]
        ran = all(r.status is Status.FINISHED for r in samples)
        beams = group_of(req).result if req.beam is not None and ran else None
        last_s = max((r.token_times_s[-1] for r in samples if r.token_times_s),
                     default=req.arrival_s)
        metrics = RequestMetrics(
            arrival_time=req.arrival_s,
            last_token_time=last_s,
            first_scheduled_time=req.first_scheduled_s if ran else None,
            first_token_time=min(r.first_token_s for r in samples) if ran else None,
            time_in_queue=req.first_scheduled_s - req.arrival_s if ran else None,
            finished_time=max(r.finished_s for r in samples) if ran else None,
        )
        return RequestOutput(
            request_id=req.request_id,
            prompt=req.prompt,
            prompt_token_ids=req.prompt_token_ids,
            outputs=([self._completion(r) for r in samples] if not beams
                     else [self._beam_completion(i, b) for i, b in enumerate(beams)]),
            finished=True,
            metrics=metrics,
            num_cached_tokens=req.num_cached_tokens,
            reject_reason=req.reject_reason,
        )
