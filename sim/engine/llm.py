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

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, cast

import numpy as np
from tqdm.auto import tqdm

from cache.beam_search import group_of
from sim.core.errors import ConfigError
from sim.core.request import (
    CompletionOutput,
    Logprob,
    Request,
    RequestMetrics,
    RequestOutput,
    SamplingParams,
    Status,
)
from sim.engine.args import EngineArgs
from sim.engine.engine import Engine
from sim.engine.records import SimulationResult
from sim.model.gguf_tokenizer import GGUFTokenizer, render_chat_template
from sim.model.sampling import log_softmax
from sim.model.tokenizer import ByteTokenizer
from sim.model.zoo import DEFAULT_MODEL
from sim.workload.specs import RequestSpec

PromptType = str | dict[str, Any]


def _unique_ids(workload: Iterable[RequestSpec]) -> Iterator[RequestSpec]:
    """`workload`, streamed, refusing a request id seen before: the KV stores, the prefix cache
    and the per-request records are keyed by it, so a duplicate would mix two requests' state.
    The set of ids is the one thing kept per request (a few dozen bytes each)."""
    seen: set[str] = set()
    for index, spec in enumerate(workload):
        if spec.request_id in seen:
            raise ConfigError(f"request {index}: request_id {spec.request_id!r} is used by an "
                              "earlier request; give every request its own id")
        seen.add(spec.request_id)
        yield spec


def _refuse_lora(lora_request: object | None) -> None:
    if lora_request is not None:
        raise ConfigError(f"lora_request={lora_request!r} is not supported: infersim simulates "
                          "no LoRA adapters (neither their weights nor their kernels' cost); "
                          "pass lora_request=None, or merge the adapter into the checkpoint")


def _conversations(messages: Sequence[dict[str, Any]] | Sequence[Sequence[dict[str, Any]]]
                   ) -> Sequence[Sequence[dict[str, Any]]]:
    """One conversation (a list of message dicts) or several, as a list of conversations."""
    one = bool(messages) and isinstance(messages[0], dict)
    return cast(Sequence[Sequence[dict[str, Any]]], [messages] if one else messages)


class LLM:
    """An offline inference engine whose clock is simulated (vLLM's `LLM`)."""

    def __init__(self, model: str = DEFAULT_MODEL, **kwargs: Any) -> None:
        self.engine_args = EngineArgs.from_kwargs(model=model, **kwargs)
        self.engine = Engine(self.engine_args)
        self.last_result: SimulationResult | None = None
        self._counter = 0

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer or ByteTokenizer()

    @property
    def vocab_size(self) -> int:
        """Token ids a prompt may hold: the functional model's vocabulary (a tiny proxy's may be
        smaller than the named model's), else the named model's."""
        model = self.engine.functional_model
        return int(model.config.n_vocab if model is not None else self.engine.model_config.n_vocab)

    def _encode(self, prompt: object, where: str) -> tuple[str | None, list[int]]:
        """A prompt's text and token ids, checked (`where` names it in every error): text must be
        encodable UTF-8, ids integers in the vocabulary, and there must be at least one."""
        text: str | None
        if isinstance(prompt, dict):
            unknown = sorted(str(k) for k in prompt if k not in ("prompt", "prompt_token_ids"))
            if unknown:
                raise ConfigError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; a "
                                  "prompt dict has 'prompt' (text) and/or 'prompt_token_ids'")
            text = prompt.get("prompt")
            if text is not None and not isinstance(text, str):
                raise ConfigError(f"{where}: 'prompt' must be a string, got "
                                  f"{type(text).__name__}")
            if "prompt_token_ids" in prompt:
                ids = self._token_ids(prompt["prompt_token_ids"], where)
            elif text is not None:
                ids = self._tokenize(text, where)
            else:
                raise ConfigError(f"{where}: a prompt dict needs 'prompt' (text) or "
                                  "'prompt_token_ids'")
        elif isinstance(prompt, str):
            text, ids = prompt, self._tokenize(prompt, where)
        else:
            hint = (" (for token ids pass {'prompt_token_ids': [...]})"
                    if isinstance(prompt, int | list | tuple) else "")
            raise ConfigError(f"{where}: a prompt must be a string or a dict with 'prompt' or "
                              f"'prompt_token_ids', got {type(prompt).__name__}{hint}")
        if not ids:
            raise ConfigError(f"{where}: the prompt has no tokens; give it at least one")
        return text, ids

    def _tokenize(self, text: str, where: str) -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:  # a lone surrogate, e.g. half of a decoded emoji
            raise ConfigError(
                f"{where}: the text is not valid Unicode at character {exc.start} "
                f"({text[exc.start:exc.end]!r}, a lone surrogate); decode its bytes with "
                "errors='replace' or drop that character") from None
        return self.get_tokenizer().encode(text)

    def _token_ids(self, value: object, where: str) -> list[int]:
        if isinstance(value, str | bytes) or not isinstance(value, Sequence | np.ndarray):
            raise ConfigError(f"{where}: 'prompt_token_ids' must be a list of ints, got "
                              f"{type(value).__name__}")
        vocab = self.vocab_size
        ids: list[int] = []
        for i, token in enumerate(value):
            if isinstance(token, bool) or not isinstance(token, int | np.integer):
                raise ConfigError(f"{where}: prompt_token_ids[{i}] must be an int, got "
                                  f"{token!r} ({type(token).__name__})")
            if not 0 <= token < vocab:
                raise ConfigError(f"{where}: prompt_token_ids[{i}] = {int(token)} is outside the "
                                  f"model's vocabulary [0, {vocab}); use ids below {vocab}")
            ids.append(int(token))
        return ids

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
        lora_request: object | None = None,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt (all arriving at t = 0) and return outputs in prompt order.

        vLLM's signature; `use_tqdm` defaults to False here (vLLM: True) so that simulations
        print nothing unless asked. `lora_request` other than None is refused: no LoRA
        adapters are simulated (their weights and their cost, vLLM's punica kernels).

        `priority` (one per prompt; lower runs first) matters with
        `scheduling_policy="priority"`, as in vLLM. Every prompt, its `SamplingParams` and its
        priority are checked before anything runs: a bad one is a `ConfigError` that names its
        index (`prompt 17 of 1000: ...`), and no request is made."""
        _refuse_lora(lora_request)
        if isinstance(prompts, str | dict):
            prompts = [prompts]
        if not isinstance(prompts, Sequence):
            raise ConfigError(f"prompts must be a string, a prompt dict or a list of them, got "
                              f"{type(prompts).__name__}")
        prompts = list(prompts)
        num = len(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params_list: list[object] = [sampling_params] * num
        elif isinstance(sampling_params, Sequence) and not isinstance(sampling_params, str):
            params_list = list(sampling_params)
        else:
            raise ConfigError(f"sampling_params must be a SamplingParams or a list of them (one "
                              f"per prompt), got {type(sampling_params).__name__}")
        if len(params_list) != num:
            raise ConfigError(
                f"got {len(params_list)} SamplingParams for {num} prompts; pass one, or "
                "one per prompt"
            )
        priorities: list[int] | None = None
        if priority is not None:
            if isinstance(priority, str) or not isinstance(priority, Sequence):
                raise ConfigError(f"priority must be a list of ints (one per prompt), got "
                                  f"{type(priority).__name__}")
            if len(priority) != num:
                raise ConfigError(f"got {len(priority)} priorities for {num} prompts")
            priorities = []
            for i, value in enumerate(priority):
                if isinstance(value, bool) or not isinstance(value, int | np.integer):
                    raise ConfigError(f"prompt {i} of {num}: priority must be an int (lower runs "
                                      f"first), got {value!r} ({type(value).__name__})")
                priorities.append(int(value))
        encoded: list[tuple[str | None, list[int], SamplingParams]] = []
        for i, (prompt, params) in enumerate(zip(prompts, params_list, strict=True)):
            where = f"prompt {i} of {num}"
            if not isinstance(params, SamplingParams):
                raise ConfigError(f"{where}: sampling_params[{i}] must be a SamplingParams, got "
                                  f"{type(params).__name__}")
            text, ids = self._encode(prompt, where)
            encoded.append((text, ids, params))
        requests: list[Request] = []
        for i, (text, ids, params) in enumerate(encoded):
            try:
                req = self.engine.make_request(
                    str(self._counter + i), i, len(ids), params, 0.0, ids, text)
            except ConfigError as exc:  # the request-level compatibility rules
                raise ConfigError(f"prompt {i} of {num}: {exc}") from None
            if priorities is not None:
                req.priority = priorities[i]
            requests.append(req)
        # ids advance only once every request is made, so a refused call leaves them unused
        self._counter += num
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
        lora_request: object | None = None,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of `{"role", "content"}` dicts) or to
        several (a list of such lists), with the model's chat template applied (vLLM's `chat`).
        A `chat_template` string (Jinja, as Hugging Face's) is used instead of the model's, and
        makes any tokenizer usable; `lora_request` other than None is refused."""
        _refuse_lora(lora_request)
        tokenizer = self.get_tokenizer()
        if not isinstance(tokenizer, GGUFTokenizer) and chat_template is not None:
            special = getattr(tokenizer, "special_text", {})
            texts = [render_chat_template(
                chat_template, [dict(m) for m in conversation], add_generation_prompt,
                special.get(tokenizer.bos_token_id, ""), special.get(tokenizer.eos_token_id, ""))
                for conversation in _conversations(messages)]
            return self.generate([{"prompt": t, "prompt_token_ids": tokenizer.encode(t, add_bos=False)}
                                  for t in texts], sampling_params, use_tqdm=use_tqdm)
        if not isinstance(tokenizer, GGUFTokenizer):  # the one tokenizer with a chat template
            raise ConfigError(
                f"model {self.engine_args.model!r} has no chat template (its tokenizer is "
                f"{type(tokenizer).__name__}); use a model with one, e.g. "
                "HuggingFaceTB/SmolLM2-135M-Instruct, or generate() with a plain prompt")
        prompts: list[PromptType] = []
        for conversation in _conversations(messages):
            text = tokenizer.apply_chat_template(
                list(conversation), add_generation_prompt=add_generation_prompt,
                chat_template=chat_template)
            assert isinstance(text, str)  # tokenize=False: the prompt text
            prompts.append({"prompt": text,
                            "prompt_token_ids": tokenizer.encode(text, add_bos=False)})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def simulate(self, workload: Iterable[RequestSpec], keep_requests: bool = False) -> SimulationResult:
        """Serve a workload (arrivals over time) and return its metrics."""
        self.last_result = self.engine.run(_unique_ids(workload), keep_requests=keep_requests)
        return self.last_result

    def _completion(self, req: Request, index: int) -> CompletionOutput:
        ids = list(req.output_token_ids)
        params = req.sampling
        if isinstance(req.stop_reason, str):  # a stop string: the text as cut at commit
            text = req.output_text
        else:
            text = (self.get_tokenizer().decode(ids, skip_special_tokens=params.skip_special_tokens)
                    if ids else "")
        ranked = params.best_of is not None and params.best_of > params.n
        return CompletionOutput(
            index=index,
            text=text,
            token_ids=ids,
            cumulative_logprob=(req.cumulative_logprob
                                if req.logprobs is not None or ranked else None),
            logprobs=req.logprobs,
            finish_reason=req.finish_reason,
            stop_reason=req.stop_reason if req.stop_reason is not None else req.reject_reason,
        )

    def _prompt_logprobs(self, req: Request) -> list[dict[int, Logprob] | None] | None:
        """vLLM's `prompt_logprobs`: None for the first token, then each prompt token's raw
        log-probability given the tokens before it, with the `prompt_logprobs` most likely.
        One full forward of the prompt by the functional model (outside the simulated clock:
        the engine's cost of the extra logits, `[n_prompt, n_vocab]` through the LM head, is
        not charged)."""
        num_top = req.sampling.prompt_logprobs
        model = self.engine.functional_model
        if num_top is None or model is None or req.prompt_token_ids is None:
            return None
        ids = list(req.prompt_token_ids)
        logits = model.forward(np.asarray(ids, dtype=np.int64))  # [n_prompt, n_vocab]
        lp = log_softmax(logits[:-1])  # [n_prompt - 1, n_vocab]: row i predicts token i + 1
        out: list[dict[int, Logprob] | None] = [None]
        for row, token in zip(lp, ids[1:], strict=True):
            order = np.argsort(-row, kind="stable")  # [n_vocab]
            ranks = np.empty_like(order)  # [n_vocab]
            ranks[order] = np.arange(1, order.size + 1)
            chosen = {int(t) for t in order[:num_top]} | {token}
            out.append({t: Logprob(logprob=float(row[t]), rank=int(ranks[t])) for t in chosen})
        return out

    def _beam_completion(self, index: int, beam: Any) -> CompletionOutput:
        """One beam of a beam search (`sim.model.beam_search.BeamSequence`), best first."""
        ids = beam.output_token_ids
        return CompletionOutput(index=index, text=self.get_tokenizer().decode(ids),
                                token_ids=ids, cumulative_logprob=beam.cum_logprob,
                                logprobs=None, finish_reason=beam.finish_reason)

    def _output(self, samples: list[Request]) -> RequestOutput:
        """One prompt's `RequestOutput` from its samples (one unless `n > 1` or `best_of`),
        sample 0 first; times span all samples (first token of any, last token and finish of
        all). With `best_of > n` the `n` samples of highest cumulative log-probability are
        returned, best first (vLLM v0), re-indexed 0..n-1."""
        req = samples[0]
        ran = all(r.status is Status.FINISHED for r in samples)
        beams = group_of(req).result if req.beam is not None and ran else None
        metrics = _metrics(samples, ran)
        params = req.sampling
        kept = samples
        if params.best_of is not None and params.best_of > params.n and ran:
            kept = sorted(samples, key=lambda r: -r.cumulative_logprob)[: params.n]
        return RequestOutput(
            request_id=req.request_id,
            prompt=req.prompt,
            prompt_token_ids=req.prompt_token_ids,
            outputs=([self._completion(r, i) for i, r in enumerate(kept)] if not beams
                     else [self._beam_completion(i, b) for i, b in enumerate(beams)]),
            finished=True,
            metrics=metrics,
            num_cached_tokens=req.num_cached_tokens,
            reject_reason=req.reject_reason,
            prompt_logprobs=self._prompt_logprobs(req) if ran else None,
        )


def _metrics(samples: list[Request], ran: bool) -> RequestMetrics:
    """vLLM v0's and v1's per-request metrics of one prompt's samples."""
    req = samples[0]
    last_s = max((r.token_times_s[-1] for r in samples if r.token_times_s),
                 default=req.arrival_s)
    metrics = RequestMetrics(
        arrival_time=req.arrival_s,
        last_token_time=last_s,
        first_scheduled_time=req.first_scheduled_s if ran else None,
        first_token_time=min(r.first_token_s for r in samples) if ran else None,
        time_in_queue=req.first_scheduled_s - req.arrival_s if ran else None,
        finished_time=max(r.finished_s for r in samples) if ran else None,
        num_prompt_tokens=req.num_prompt_tokens,
        num_cached_tokens=req.num_cached_tokens,
    )
    if not ran:
        return metrics
    num_generated = sum(r.num_output_tokens for r in samples)
    scheduled_s = req.first_scheduled_s
    first_s = min(r.first_token_s for r in samples)
    metrics.num_generation_tokens = num_generated
    metrics.queued_ts = req.arrival_s
    metrics.scheduled_ts = scheduled_s
    metrics.first_token_ts = first_s
    metrics.last_token_ts = last_s
    metrics.first_token_latency = first_s - req.arrival_s
    metrics.e2e_latency = max(r.finished_s for r in samples) - req.arrival_s
    metrics.queued_time = scheduled_s - req.arrival_s
    metrics.prefill_time = first_s - scheduled_s
    metrics.decode_time = last_s - first_s
    metrics.inference_time = last_s - scheduled_s
    # v1: decode time over the tokens after the first (0 for a one-token output)
    metrics.mean_time_per_output_token = (metrics.decode_time / (num_generated - 1)
                                          if num_generated > 1 else 0.0)
    return metrics
