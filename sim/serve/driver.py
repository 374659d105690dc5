"""The engine driver: one engine run that requests join while it runs, on a paced clock.

A server cannot hand the engine its workload up front: requests arrive while earlier ones are
decoding. `EngineDriver` owns one `EngineLoop` (`sim.engine.loop`) in a thread of its own and
drives it incrementally (`start`, `submit`, `advance_until`): a request that arrives over HTTP
is submitted at the simulated instant that corresponds to its wall-clock arrival, simulated
time is advanced one event instant at a time, and each request's tokens are released to its
client once the simulated clock has reached the step that produced them.

`time_scale` ties the two clocks: `wall_elapsed_s = time_scale x simulated_elapsed_s`.
1 is real time (a client-side benchmark measures the simulated latencies); 2 runs at half
speed; 0 runs as fast as the engine computes (simulated time then advances only through the
engine's own events, and a request arrives at the engine's current instant).

Coasting (`sim.engine.coasting`, the timing-only fast path) is turned off for a served engine:
it commits a stretch of decode steps when the stretch ends, which would hold a stretch's tokens
back from the client until its last step. Step-by-step dispatch gives the same simulated times
(the coasting tests prove it), so the latencies are unchanged.

The engine's thread is the only one that touches the engine; the HTTP side talks to it through
a condition variable (submissions) and asyncio queues (token deltas, `RequestHandle`).

References: vLLM `vllm/v1/engine/async_llm.py` (an engine core loop fed by the API server,
outputs streamed back per request); llm-d's inference simulator (an OpenAI server whose
latencies are configured rather than computed).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sim.core.errors import ConfigError
from sim.core.request import Request, SamplingParams, Status
from sim.engine.engine import Engine
from sim.engine.loop import EngineLoop
from sim.engine.records import SimulationResult
from sim.model.tokenizer import ByteTokenizer
from sim.serve.metrics import ServeMetrics

#: the text of one timing-mode token (a timing-only run computes counts, not tokens)
PLACEHOLDER_TOKEN_TEXT = " tok"

#: how often (wall seconds) the gauges of `/metrics` are refreshed from the engine's state
GAUGE_PERIOD_S = 0.05


@dataclass(frozen=True, slots=True)
class Delta:
    """What a client receives from one release: new text and token count, and at the end the
    finish reason (or the error that ended the request before it produced anything)."""

    text: str
    num_new_tokens: int
    finish_reason: str | None = None
    error: str | None = None
    #: the HTTP status an error maps to: 400 the engine refused the request (with its
    #: reason), 503 the server is shutting down, 500 the engine failed
    status_code: int = 400


@dataclass(eq=False)
class RequestHandle:
    """One submitted request: the engine's `Request` and the queue its deltas arrive on."""

    request: Request
    queue: asyncio.Queue[Delta]
    event_loop: asyncio.AbstractEventLoop
    stop_strings: tuple[str, ...] = ()
    num_released: int = 0  # tokens released to the client
    emitted_text: str = ""  # text released to the client
    done: bool = False

    def push(self, delta: Delta) -> None:
        """Hand `delta` to the client's event loop (called from the engine's thread)."""
        # (a RuntimeError: the server's event loop has closed at shutdown, nobody listens)
        with contextlib.suppress(RuntimeError):
            self.event_loop.call_soon_threadsafe(self.queue.put_nowait, delta)


@dataclass
class DriverState:
    """What the HTTP side may read without the engine's lock: refreshed by the engine thread."""

    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    num_preemptions: int = 0
    simulated_now_s: float = 0.0


@dataclass
class _Inbox:
    handles: list[RequestHandle] = field(default_factory=list)
    stopping: bool = False


class EngineDriver:
    """Runs `engine` in a background thread; `submit` adds a request while it runs.

    `record` keeps the run's requests and per-step series (for `--trace-json`); `on_result`
    receives the run's `SimulationResult` when the driver stops.
    """

    def __init__(self, engine: Engine, time_scale: float = 1.0, record: bool = False,
                 on_result: Callable[[SimulationResult], None] | None = None) -> None:
        if not (isinstance(time_scale, int | float) and math.isfinite(time_scale)
                and time_scale >= 0):
            raise ConfigError(f"--time-scale {time_scale!r} must be a finite number >= 0 "
                              "(wall seconds per simulated second: 1 = real time, 0 = as fast "
                              "as computed)")
        self.engine = engine
        self.time_scale = float(time_scale)
        engine.coast_enabled = False  # see the module doc: tokens are released step by step
        self.metrics = ServeMetrics()
        self.state = DriverState()
        self._record = record
        self._on_result = on_result
        self._loop = EngineLoop(engine, keep_requests=record, record_steps=record,
                                on_finish=self.metrics.observe_finished)
        self._cond = threading.Condition()
        self._inbox = _Inbox()
        self._active: dict[str, RequestHandle] = {}
        self._thread: threading.Thread | None = None
        self._wall0_s = 0.0
        self._next_gauge_s = 0.0
        self._num_requests = 0
        self.tokenizer = (engine.tokenizer if engine.tokenizer is not None
                          else ByteTokenizer())
        self.result: SimulationResult | None = None
        self.failure: BaseException | None = None

    # ------------------------------------------------------------------ the HTTP side
    @property
    def functional(self) -> bool:
        return self.engine.args.mode == "functional"

    def start(self) -> None:
        """Start the engine's thread (once)."""
        if self._thread is not None:
            return
        self._wall0_s = time.perf_counter()
        self._loop.start()
        self._thread = threading.Thread(target=self._run, name="infersim-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> SimulationResult | None:
        """Stop the engine's thread: requests still in flight end with an error; the run's
        result (what `--trace-json` is written from) is returned and passed to `on_result`."""
        with self._cond:
            self._inbox.stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout_s)
        return self.result

    def new_request(self, num_prompt_tokens: int, prompt_token_ids: list[int] | None,
                    params: SamplingParams, prompt: str | None) -> Request:
        """The engine's request for one prompt of `num_prompt_tokens` tokens (its ids: what a
        functional run computes on, and prefix caching hashes; None in timing mode without
        ids), checked by the engine: a `ConfigError` names what it cannot honour. Its arrival
        time is set when the driver submits it."""
        with self._cond:
            index = self._num_requests
            self._num_requests += 1
        return self.engine.make_request(f"req-{index}", index, num_prompt_tokens, params, 0.0,
                                        prompt_token_ids, prompt)

    def submit(self, request: Request, stop_strings: tuple[str, ...] = ()) -> RequestHandle:
        """Queue `request` to join the run now; its deltas arrive on the returned handle's
        queue (call from the server's event loop)."""
        if self.failure is not None:
            raise RuntimeError("the engine thread has failed") from self.failure
        handle = RequestHandle(request, asyncio.Queue(), asyncio.get_running_loop(),
                               stop_strings)
        with self._cond:
            if self._inbox.stopping:
                raise RuntimeError("the server is shutting down")
            self._inbox.handles.append(handle)
            self._cond.notify()
        return handle

    # ------------------------------------------------------------------ the engine's thread
    def _sim_now_s(self) -> float:
        """The simulated instant of the wall clock now (time_scale 0: the engine's own)."""
        if self.time_scale == 0:
            return self._loop.clock.now_s
        return (time.perf_counter() - self._wall0_s) / self.time_scale

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as exc:  # report to every waiting client, never hang them
            self.failure = exc
            for handle in self._active.values():
                handle.push(Delta("", 0, error=f"internal error in the engine: {exc!r}",
                                  status_code=500))
            self._active.clear()
            raise
        finally:
            self._finish()

    def _serve(self) -> None:
        loop = self._loop
        while True:
            with self._cond:
                handles, self._inbox.handles = self._inbox.handles, []
                stopping = self._inbox.stopping
            if stopping:
                return
            now_s = self._sim_now_s()
            for handle in handles:
                handle.request.arrival_s = now_s
                loop.submit(handle.request)  # (clamped to the engine's clock)
                self._active[handle.request.request_id] = handle
            next_s = loop.next_event_s()
            if next_s <= now_s or (self.time_scale == 0 and next_s < math.inf):
                loop.advance_until(next_s)  # one instant: then new arrivals may join
                self._release()
                continue
            self._release()
            self._refresh_gauges(force=True)
            # sleep until the next event is due in wall time, or a request arrives
            timeout_s = None if next_s == math.inf else (next_s - now_s) * self.time_scale
            with self._cond:
                if not self._inbox.handles and not self._inbox.stopping:
                    self._cond.wait(timeout_s)

    def _release(self) -> None:
        """Hand every active request's committed tokens to its client (the engine's clock has
        reached them: only events at or before the paced instant are handled)."""
        ended: list[str] = []
        for rid, handle in self._active.items():
            req = handle.request
            num_new = req.num_output_tokens - handle.num_released
            finished = req.is_finished
            if num_new <= 0 and not finished:
                continue
            if req.status is Status.REJECTED and handle.num_released == 0:
                handle.push(Delta("", 0, error=req.reject_reason or "rejected"))
                ended.append(rid)
                continue
            if num_new > 0:
                self.metrics.observe_tokens(req, handle.num_released)
            handle.num_released = req.num_output_tokens
            text = self._text(handle, max(num_new, 0), finished)
            handle.emitted_text += text
            reason = None
            if finished:
                reason = req.finish_reason if req.finish_reason in ("length", "stop") else "abort"
                ended.append(rid)
            handle.push(Delta(text, max(num_new, 0), reason))
        for rid in ended:
            self._active[rid].done = True
            del self._active[rid]
        self._refresh_gauges()

    def _text(self, handle: RequestHandle, num_new: int, finished: bool) -> str:
        """The text to release now: timing mode, one placeholder per token; functional mode,
        the detokenized output past what was released, holding back an incomplete UTF-8
        character, and (with stop strings) the last characters that could begin one."""
        req = handle.request
        if not self.functional:
            return PLACEHOLDER_TOKEN_TEXT * num_new
        skip = req.sampling.skip_special_tokens
        if finished and isinstance(req.stop_reason, str):  # cut at the stop string at commit
            full = req.output_text
        else:
            full = self.tokenizer.decode(req.output_token_ids, skip_special_tokens=skip)
        if not finished:
            full = full.rstrip("\ufffd")  # an incomplete multi-byte character: wait for it
            hold = max((len(s) for s in handle.stop_strings), default=1) - 1
            full = full[:max(len(full) - hold, 0)]
        emitted = handle.emitted_text
        if not full.startswith(emitted):  # (a stop string cut into held-back text only)
            return ""
        return full[len(emitted):]

    def _refresh_gauges(self, force: bool = False) -> None:
        wall_s = time.perf_counter()
        if not force and wall_s < self._next_gauge_s:
            return
        self._next_gauge_s = wall_s + GAUGE_PERIOD_S
        running = sum(1 for h in self._active.values() if h.request.status is Status.RUNNING)
        waiting = sum(1 for h in self._active.values() if h.request.status is Status.WAITING)
        total = free = 0
        for lane in self._loop.lanes:
            usage = lane.kv.usage()
            total += usage.num_total_tokens
            free += usage.num_free_tokens
        self.state = DriverState(
            num_running=running, num_waiting=waiting,
            kv_usage=1.0 - free / total if total else 0.0,
            num_preemptions=sum(getattr(lane.scheduler, "num_preemptions", 0)
                                for lane in self._loop.lanes),
            simulated_now_s=self._loop.clock.now_s)

    def _finish(self) -> None:
        for handle in self._active.values():
            handle.push(Delta("", 0, error="the server shut down before the request finished",
                              status_code=503))
        self._active.clear()
        with self._cond:
            for handle in self._inbox.handles:
                handle.push(Delta("", 0, error="the server shut down before the request ran",
                                  status_code=503))
            self._inbox.handles.clear()
        if self.failure is not None:
            return
        self.result = self._loop.finish()
        if self._on_result is not None:
            self._on_result(self.result)
