"""The OpenAI API's request and response shapes that `infersim serve` speaks.

Requests are pydantic models of the fields OpenAI's `/v1/completions` and
`/v1/chat/completions` take, plus vLLM's extensions that benchmarks send (`ignore_eos`,
`min_tokens`, `top_k`, ...); unknown fields are ignored, as OpenAI's server does. A field the
simulator cannot honour (`n > 1`, `logprobs`, `echo`, tools) is refused with a 400 naming it,
rather than silently dropped. Responses and stream chunks are plain dicts in OpenAI's layout
(`text_completion`, `chat.completion`, `chat.completion.chunk`, `usage`), and every error is
OpenAI's `{"error": {"message", "type", "param", "code"}}`.

References: OpenAI API reference (completions, chat completions, streaming, errors); vLLM
`vllm/entrypoints/openai/protocol.py` (the same models, with vLLM's extensions).
"""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from sim.core.errors import ConfigError
from sim.core.request import SamplingParams


class OpenAIError(Exception):
    """An error the client caused (or the server met), sent as OpenAI's error JSON."""

    def __init__(self, message: str, status_code: int = 400,
                 error_type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.status_code = message, status_code
        self.error_type, self.param, self.code = error_type, param, code

    def body(self) -> dict[str, dict[str, str | None]]:
        return {"error": {"message": self.message, "type": self.error_type,
                          "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    """The sampling fields both endpoints share (OpenAI's, then vLLM's extensions)."""

    model_config = ConfigDict(extra="ignore")

    model: str
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's extensions
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    ignore_eos: bool = False
    skip_special_tokens: bool = True

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def refuse_unsupported(self) -> None:
        if self.n != 1:
            raise OpenAIError(f"n={self.n}: infersim serve returns one choice per request; "
                              "send n=1 (or the request n times)", param="n")

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        """The engine's `SamplingParams` (OpenAI's defaults: temperature 1, top_p 1); a value
        the engine refuses is a 400 naming it."""
        try:
            return SamplingParams(
                temperature=1.0 if self.temperature is None else self.temperature,
                top_p=1.0 if self.top_p is None else self.top_p,
                top_k=self.top_k, min_p=self.min_p, seed=self.seed, max_tokens=max_tokens,
                min_tokens=self.min_tokens, ignore_eos=self.ignore_eos,
                presence_penalty=self.presence_penalty,
                frequency_penalty=self.frequency_penalty,
                repetition_penalty=self.repetition_penalty, stop=self.stop_strings(),
                skip_special_tokens=self.skip_special_tokens,
                logit_bias=(None if not self.logit_bias
                            else {int(k): v for k, v in self.logit_bias.items()}))
        except (ConfigError, ValueError) as exc:
            raise OpenAIError(str(exc)) from None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Sampling):
    """`POST /v1/completions`: one prompt, as text or token ids."""

    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for completions
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        for name, bad in (("echo", self.echo), ("logprobs", self.logprobs is not None),
                          ("suffix", self.suffix is not None)):
            if bad:
                raise OpenAIError(f"{name} is not supported by infersim serve; leave it unset",
                                  param=name)

    def single_prompt(self) -> str | list[int]:
        """The one prompt of the request (a list of one prompt is unwrapped)."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
            if len(prompt) != 1:
                raise OpenAIError(f"got {len(prompt)} prompts: infersim serve takes one prompt "
                                  "per request; send them as separate requests",
                                  param="prompt")
            return prompt[0]
        return prompt  # type: ignore[return-value]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, object]] | None = None

    def text(self) -> str:
        """The message's text (a list of content parts must be all text parts)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        texts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise OpenAIError(f"content part of type {part.get('type')!r}: infersim serve "
                                  "reads text parts only", param="messages")
            texts.append(str(part["text"]))
        return "".join(texts)


class ChatCompletionRequest(_Sampling):
    """`POST /v1/chat/completions`."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    tools: list[dict[str, object]] | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.logprobs:
            raise OpenAIError("logprobs is not supported by infersim serve; leave it unset",
                              param="logprobs")
        if self.tools:
            raise OpenAIError("tools are not supported by infersim serve", param="tools")

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# ---------------------------------------------------------------------- responses
def usage(num_prompt_tokens: int, num_completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": num_prompt_tokens, "completion_tokens": num_completion_tokens,
            "total_tokens": num_prompt_tokens + num_completion_tokens}


def now_unix() -> int:
    return int(time.time())


def completion_response(rid: str, model: str, text: str, finish_reason: str | None,
                        usage_: dict[str, int]) -> dict[str, object]:
    return {"id": rid, "object": "text_completion", "created": now_unix(), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None,
                         "finish_reason": finish_reason}],
            "usage": usage_}


def completion_chunk(rid: str, model: str, text: str, finish_reason: str | None,
                     with_usage: bool) -> dict[str, object]:
    chunk: dict[str, object] = {
        "id": rid, "object": "text_completion", "created": now_unix(), "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None,
                     "finish_reason": finish_reason}]}
    if with_usage:  # OpenAI: every chunk has "usage": null when the last one carries it
        chunk["usage"] = None
    return chunk


def chat_response(rid: str, model: str, text: str, finish_reason: str | None,
                  usage_: dict[str, int]) -> dict[str, object]:
    return {"id": rid, "object": "chat.completion", "created": now_unix(), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage_}


def chat_chunk(rid: str, model: str, delta: dict[str, str], finish_reason: str | None,
               with_usage: bool) -> dict[str, object]:
    chunk: dict[str, object] = {
        "id": rid, "object": "chat.completion.chunk", "created": now_unix(), "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None,
                     "finish_reason": finish_reason}]}
    if with_usage:
        chunk["usage"] = None
    return chunk


def usage_chunk(rid: str, model: str, obj: str, usage_: dict[str, int]) -> dict[str, object]:
    """The last chunk of a stream with `stream_options.include_usage`: no choices, the usage."""
    return {"id": rid, "object": obj, "created": now_unix(), "model": model, "choices": [],
            "usage": usage_}
