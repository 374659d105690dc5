"""The HTTP application of `infersim serve`: OpenAI's endpoints over a simulated engine.

`build_app(driver, model_name)` returns a FastAPI app (vLLM's own stack) with

- `GET /v1/models`: the one served model;
- `POST /v1/completions` and `POST /v1/chat/completions`: one choice per request, streamed by
  server-sent events when `stream` is true (`data: {chunk}` lines, then `data: [DONE]`; with
  `stream_options.include_usage` a last chunk with the usage and no choices), else one JSON
  response with `usage`;
- `GET /health` (200 while the engine's thread runs) and `GET /metrics` (Prometheus text with
  vLLM's metric names, `sim.serve.metrics`).

The request is tokenized here (functional mode: the model's tokenizer, and for chat its chat
template, else ChatML; timing mode: the same count rule as the ShareGPT workload, ceil(UTF-8
bytes / 4), unless token ids are sent), checked against `max_model_len` as vLLM checks it, and
handed to the engine driver (`sim.serve.driver`), whose deltas are the response. A request the
engine refuses at arrival (admission control, a prompt that never fits the KV cache) is a 400
with the engine's reason; the response (streamed or not) starts only once the first token or
the refusal is known, so a refusal is always an error status, never a broken stream.

Every error is OpenAI's JSON (`sim.serve.protocol.OpenAIError`): 400 for a malformed or
unsupported request, 404 for an unknown model or path, 405 for a wrong method, 500 (without a
traceback) for a fault of the server.

References: vLLM `vllm/entrypoints/openai/api_server.py` (routes, error handlers, the
max_model_len check and its message); OpenAI API reference (streaming format).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from sim.core.errors import ConfigError
from sim.model.gguf_tokenizer import GGUFTokenizer
from sim.serve.driver import Delta, EngineDriver, RequestHandle
from sim.serve.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    OpenAIError,
    chat_chunk,
    chat_response,
    completion_chunk,
    completion_response,
    usage,
    usage_chunk,
)
from sim.workload.sharegpt import approx_num_tokens

#: ChatML, the template SmolLM2 and Qwen use: the fallback for a tokenizer without its own
CHATML_TURN = "<|im_start|>{role}\n{content}<|im_end|>\n"
CHATML_GENERATION_PROMPT = "<|im_start|>assistant\n"

_HTTP_ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error",
                     405: "method_not_allowed", 500: "internal_server_error",
                     503: "service_unavailable"}


def _error_response(exc: OpenAIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status_code)


def build_app(driver: EngineDriver, model_name: str) -> FastAPI:
    """The FastAPI app serving `driver`'s engine as `model_name`; the driver's thread runs
    for the app's lifespan (started at startup, stopped at shutdown)."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        driver.start()
        try:
            yield
        finally:
            driver.stop()

    app = FastAPI(title="infersim serve", lifespan=lifespan)
    engine = driver.engine
    max_model_len = engine.max_model_len
    tokenizer = driver.tokenizer

    # ------------------------------------------------------------------ errors
    @app.exception_handler(OpenAIError)
    async def openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = [str(p) for p in first.get("loc", ()) if p != "body" and not (
            isinstance(p, int) and first.get("type") == "json_invalid")]
        param = ".".join(where) or None
        message = first.get("msg", "invalid request")
        if param:
            message = f"{param}: {message}"
        return _error_response(OpenAIError(message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        return _error_response(OpenAIError(str(exc.detail), status,
                                           _HTTP_ERROR_TYPES.get(status, "error")))

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        return _error_response(OpenAIError(f"internal server error: {type(exc).__name__}: {exc}",
                                           500, "internal_server_error"))

    # ------------------------------------------------------------------ prompts
    def check_model(name: str) -> None:
        if name != model_name:
            raise OpenAIError(f"The model `{name}` does not exist; this server serves "
                              f"`{model_name}` (GET /v1/models)", 404, "NotFoundError",
                              "model", "model_not_found")

    def encode(text: str, add_bos: bool = True) -> tuple[int, list[int] | None]:
        """The prompt's token count and ids (timing mode: the count only)."""
        if driver.functional:
            ids = tokenizer.encode(text, add_bos=add_bos)
            return len(ids), ids
        return approx_num_tokens(text), None

    def token_ids(ids: Sequence[int], param: str) -> tuple[int, list[int]]:
        vocab = (engine.functional_model.config.n_vocab if driver.functional
                 else engine.model_config.n_vocab)
        for i, token in enumerate(ids):
            if not 0 <= token < vocab:
                raise OpenAIError(f"{param}[{i}] = {token} is outside the model's vocabulary "
                                  f"[0, {vocab})", param=param)
        return len(ids), list(ids)

    def chat_prompt(messages: list[ChatMessage]) -> str:
        turns = [{"role": m.role, "content": m.text()} for m in messages]
        if isinstance(tokenizer, GGUFTokenizer) and tokenizer.chat_template:
            try:
                text = tokenizer.apply_chat_template(turns, add_generation_prompt=True)
            except ConfigError as exc:
                raise OpenAIError(str(exc), param="messages") from None
            assert isinstance(text, str)  # tokenize=False: the prompt text
            return text
        return "".join(CHATML_TURN.format(**t) for t in turns) + CHATML_GENERATION_PROMPT

    def budget(num_prompt_tokens: int, max_tokens: int | None, where: str) -> int:
        """max_tokens checked against the context window (vLLM's check and message); None:
        the rest of the window."""
        if num_prompt_tokens < 1:
            raise OpenAIError("the prompt has no tokens; give it at least one", param=where)
        if max_tokens is None:
            max_tokens = max_model_len - num_prompt_tokens
        if max_tokens < 1 or num_prompt_tokens + max_tokens > max_model_len:
            raise OpenAIError(
                f"This model's maximum context length is {max_model_len} tokens. However, you "
                f"requested {num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the "
                f"{where}, {max_tokens} in the completion). Please reduce the length of the "
                f"{where} or completion.",
                param=where if num_prompt_tokens >= max_model_len else "max_tokens",
                code="context_length_exceeded")
        return max_tokens

    async def submit(body: CompletionRequest | ChatCompletionRequest,
                     prompt: tuple[int, list[int] | None], text: str | None,
                     max_tokens: int | None, where: str) -> tuple[RequestHandle, Delta]:
        """Submit the request (`prompt`: its token count and ids); its handle and first delta
        (an error raises)."""
        body.refuse_unsupported()
        num_prompt_tokens, ids = prompt
        params = body.sampling_params(budget(num_prompt_tokens, max_tokens, where))
        try:
            req = driver.new_request(num_prompt_tokens, ids, params, text)
        except ConfigError as exc:  # what the engine cannot honour (e.g. stop in timing mode)
            raise OpenAIError(" ".join(str(exc).split())) from None
        try:
            handle = driver.submit(req, body.stop_strings())
        except RuntimeError as exc:
            raise OpenAIError(str(exc), 503, "service_unavailable") from None
        first = await handle.queue.get()
        if first.error is not None:
            raise OpenAIError(first.error, first.status_code,
                              _HTTP_ERROR_TYPES.get(first.status_code, "error"),
                              code="rejected" if first.status_code == 400 else None)
        return handle, first

    async def collect(handle: RequestHandle, first: Delta) -> tuple[str, str | None]:
        """The whole text and finish reason of a non-streamed request."""
        parts, delta = [first.text], first
        while delta.finish_reason is None:
            delta = await handle.queue.get()
            if delta.error is not None:
                raise OpenAIError(delta.error, delta.status_code,
                                  _HTTP_ERROR_TYPES.get(delta.status_code, "error"))
            parts.append(delta.text)
        return "".join(parts), delta.finish_reason

    async def deltas(handle: RequestHandle, first: Delta) -> AsyncIterator[Delta]:
        delta = first
        while True:
            yield delta
            if delta.finish_reason is not None or delta.error is not None:
                return
            delta = await handle.queue.get()

    def sse(chunk: object) -> str:
        return f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n"

    def stream(events: Callable[[], AsyncIterator[str]]) -> StreamingResponse:
        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    def usage_of(handle: RequestHandle) -> dict[str, int]:
        req = handle.request
        return usage(req.num_prompt_tokens, req.num_output_tokens)

    def stream_error(delta: Delta) -> str:
        return sse(OpenAIError(delta.error or "", delta.status_code,
                               _HTTP_ERROR_TYPES.get(delta.status_code, "error")).body())

    # ------------------------------------------------------------------ routes
    @app.get("/health")
    async def health() -> Response:
        if driver.failure is not None:
            raise OpenAIError(f"the engine failed: {driver.failure!r}", 500,
                              "internal_server_error")
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        s = driver.state
        text = driver.metrics.render(model_name, s.num_running, s.num_waiting, s.kv_usage,
                                     s.num_preemptions, s.simulated_now_s)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> dict[str, object]:
        return {"object": "list", "data": [{
            "id": model_name, "object": "model", "created": 0, "owned_by": "infersim",
            "root": engine.args.model, "max_model_len": max_model_len}]}

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest) -> Response | dict[str, object]:
        check_model(body.model)
        prompt = body.single_prompt()
        if isinstance(prompt, str):
            encoded, text = encode(prompt), prompt
        else:
            encoded, text = token_ids(prompt, "prompt"), None
        handle, first = await submit(body, encoded, text, body.max_tokens, "prompt")
        rid = f"cmpl-{handle.request.request_id}"
        if not body.stream:
            text_out, reason = await collect(handle, first)
            return completion_response(rid, model_name, text_out, reason, usage_of(handle))
        with_usage = body.include_usage

        async def events() -> AsyncIterator[str]:
            async for delta in deltas(handle, first):
                if delta.error is not None:
                    yield stream_error(delta)
                    break
                if delta.text or delta.finish_reason is not None:
                    yield sse(completion_chunk(rid, model_name, delta.text,
                                               delta.finish_reason, with_usage))
            else:
                if with_usage:
                    yield sse(usage_chunk(rid, model_name, "text_completion", usage_of(handle)))
            yield "data: [DONE]\n\n"

        return stream(events)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest) -> Response | dict[str, object]:
        check_model(body.model)
        text = chat_prompt(body.messages)
        # (a GGUF chat template writes its own BOS)
        encoded = encode(text, add_bos=not isinstance(tokenizer, GGUFTokenizer))
        handle, first = await submit(body, encoded, text, body.max_new_tokens(), "messages")
        rid = f"chatcmpl-{handle.request.request_id}"
        if not body.stream:
            text_out, reason = await collect(handle, first)
            return chat_response(rid, model_name, text_out, reason, usage_of(handle))
        with_usage = body.include_usage

        async def events() -> AsyncIterator[str]:
            yield sse(chat_chunk(rid, model_name, {"role": "assistant", "content": ""}, None,
                                 with_usage))
            async for delta in deltas(handle, first):
                if delta.error is not None:
                    yield stream_error(delta)
                    break
                if delta.text:
                    yield sse(chat_chunk(rid, model_name, {"content": delta.text}, None,
                                         with_usage))
                if delta.finish_reason is not None:
                    yield sse(chat_chunk(rid, model_name, {}, delta.finish_reason, with_usage))
            else:
                if with_usage:
                    yield sse(usage_chunk(rid, model_name, "chat.completion.chunk",
                                          usage_of(handle)))
            yield "data: [DONE]\n\n"

        return stream(events)

    return app
