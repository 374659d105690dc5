"""A run as a Chrome / Perfetto trace: every engine step on its lane's track, every request on
its own, openable in `ui.perfetto.dev` or `chrome://tracing`.

The file is the Trace Event Format's JSON object form (`{"traceEvents": [...]}`): complete
events (`ph: "X"`, a start `ts` and a duration `dur`, both in microseconds as the format
wants), instant events (`ph: "i"`) for rejections, and metadata events (`ph: "M"`) naming the
tracks. Two processes:

- pid 1, "engine": one thread per lane (`tid` = lane index; a replica with pipeline
  parallelism has one lane per virtual engine). Each step is an event named by its batch
  composition (`prefill`, `decode` or `mixed`), its `args` the step series' row
  (`sim.metrics.step_series`: sequences, prefill and decode tokens, requests waiting, KV held)
  and its KV events (preemptions made while planning it, blocks swapped out and in,
  copy-on-write copies). A step's span is its priced time, so the spans of one lane sum to its
  busy time (`StepStats.busy_s`) when it has one pipeline stage.
- pid 2, "requests": one thread per request, in the order they ended: `queued` (arrival to
  first scheduled), `prefill` (to the first token), `decode` (to the last), their args the
  request's token counts and finish reason; a rejected request is an instant event with its
  reason.

Everything comes from what a run already records (the per-step series, and each request's
`RequestTimes`), so writing a trace changes no result.

References: Google, "Trace Event Format" (the JSON schema Chrome's tracing and Perfetto read);
Perfetto's legacy JSON importer documentation.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

from sim.metrics.collector import RequestTimes
from sim.metrics.step_series import StepSeries

ENGINE_PID = 1
REQUESTS_PID = 2

TraceEvent = dict[str, object]


def _us(seconds: float) -> float:
    """Simulated seconds as the format's microseconds."""
    return seconds * 1e6


def _meta(pid: int, tid: int, name: str, value: str | int) -> TraceEvent:
    key = "sort_index" if name.endswith("sort_index") else "name"
    return {"ph": "M", "pid": pid, "tid": tid, "name": name, "args": {key: value}}


def lane_name(lane: int, num_stages: int) -> str:
    """A lane's track name: its replica, and with pipeline parallelism its virtual engine."""
    replica, virtual = divmod(lane, num_stages)
    return f"replica {replica}" if num_stages == 1 else f"replica {replica} / virtual engine {virtual}"


def step_events(steps: StepSeries, num_stages: int = 1) -> list[TraceEvent]:
    """One complete event per step of `steps`, plus the metadata naming each lane's track."""
    events: list[TraceEvent] = [_meta(ENGINE_PID, 0, "process_name", "engine"),
                                _meta(ENGINE_PID, 0, "process_sort_index", 0)]
    lanes: set[int] = set()
    for (start_s, end_s, num_seqs, num_prefill, num_decode, num_waiting, kv_used, kv_reserved,
         lane) in steps.rows:
        lanes.add(lane)
        name = "decode" if not num_prefill else "prefill" if not num_decode else "mixed"
        args: dict[str, int] = {
            "num_seqs": num_seqs, "num_prefill_tokens": num_prefill,
            "num_decode_tokens": num_decode, "num_waiting": num_waiting,
            "kv_used_tokens": kv_used, "kv_reserved_tokens": kv_reserved}
        preempted, swapped_out, swapped_in, copied = steps.kv_events.get((lane, start_s),
                                                                         (0, 0, 0, 0))
        args.update(num_preemptions=preempted, num_swapped_out_blocks=swapped_out,
                    num_swapped_in_blocks=swapped_in, num_copied_blocks=copied)
        events.append({"ph": "X", "cat": "step", "name": name, "pid": ENGINE_PID, "tid": lane,
                       "ts": _us(start_s), "dur": _us(end_s - start_s), "args": args})
    for lane in sorted(lanes):
        events.append(_meta(ENGINE_PID, lane, "thread_name", lane_name(lane, num_stages)))
        events.append(_meta(ENGINE_PID, lane, "thread_sort_index", lane))
    return events


def request_events(requests: Iterable[RequestTimes]) -> list[TraceEvent]:
    """A track per request: its queued, prefill and decode spans (or its rejection)."""
    events: list[TraceEvent] = [_meta(REQUESTS_PID, 0, "process_name", "requests"),
                                _meta(REQUESTS_PID, 0, "process_sort_index", 1)]
    for tid, t in enumerate(requests, start=1):
        events.append(_meta(REQUESTS_PID, tid, "thread_name", f"request {t.request_id}"))
        events.append(_meta(REQUESTS_PID, tid, "thread_sort_index", tid))
        args: dict[str, object] = {
            "request_id": t.request_id, "num_prompt_tokens": t.num_prompt_tokens,
            "num_output_tokens": t.num_output_tokens,
            "num_cached_prompt_tokens": t.num_cached_prompt_tokens,
            "finish_reason": t.finish_reason}
        if math.isnan(t.first_scheduled_s):  # rejected (or never ran): an instant, its reason
            events.append({"ph": "i", "s": "t", "cat": "request", "name": t.finish_reason,
                           "pid": REQUESTS_PID, "tid": tid, "ts": _us(t.arrival_s),
                           "args": {**args, "reason": t.reject_reason or ""}})
            continue
        last_s = t.token_times_s[-1] if t.token_times_s else t.finished_s
        spans = (("queued", t.arrival_s, t.first_scheduled_s),
                 ("prefill", t.first_scheduled_s, t.first_token_s),
                 ("decode", t.first_token_s, max(last_s, t.first_token_s)))
        for name, start_s, end_s in spans:
            events.append({"ph": "X", "cat": "request", "name": name, "pid": REQUESTS_PID,
                           "tid": tid, "ts": _us(start_s), "dur": _us(end_s - start_s),
                           "args": args})
    return events


def chrome_trace(steps: StepSeries | None, requests: Iterable[RequestTimes],
                 num_stages: int = 1, description: str = "") -> dict[str, object]:
    """The trace object of a run: its steps (None: not recorded) and its requests."""
    events = step_events(steps, num_stages) if steps is not None else []
    events += request_events(requests)
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"generator": "infersim", "description": description,
                          "clock": "simulated seconds, written as microseconds"}}


def write_trace(path: str | Path, steps: StepSeries | None, requests: Iterable[RequestTimes],
                num_stages: int = 1, description: str = "") -> None:
    """Write `chrome_trace(...)` to `path` (its parent folders made as needed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    trace = chrome_trace(steps, requests, num_stages, description)
    path.write_text(json.dumps(trace, separators=(",", ":")), encoding="utf-8")
