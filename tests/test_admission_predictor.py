"""The look-ahead admission predictor: replays the continuous scheduler on the cost model."""

from __future__ import annotations

from batching.admission import AdmissionControl
from sim.core.request import SamplingParams, Status
from sim.engine.args import EngineArgs
from sim.engine.engine import Engine
from sim.workload.specs import make_workload


def _run(specs, **kwargs):
    engine = Engine(EngineArgs(mode="timing", **kwargs))
    return engine, engine.run(specs)


def test_look_ahead_keeps_admitted_tail_ttft_near_the_slo():
    # overload: 400-token prompts at 40 req/s; the running decodes slow every prefill step
    specs = list(make_workload(300, 80.0, 400, 128, seed=0))
    slo_s = 0.5
    _, loose = _run(specs)
    assert loose.summary.ttft.p99_s > 2 * slo_s  # without admission the tail blows up
    _, result = _run(specs, admission_ttft_slo_s=slo_s)
    finished = [r for r in result.requests if r.status is Status.FINISHED]
    rejected = [r for r in result.requests if r.status is Status.REJECTED]
    assert rejected and finished
    assert all("TTFT SLO" in r.reject_reason for r in rejected)
    ttft_s = sorted(r.first_token_s - r.arrival_s for r in finished)
    # the look-ahead errs long, so admitted requests meet the SLO at the tail, not only median
    assert ttft_s[int(0.99 * (len(ttft_s) - 1))] <= slo_s * 1.05


def test_look_ahead_counts_running_decodes():
    # the same queue costs more when a full batch of decodes shares every step
    engine = Engine(EngineArgs(mode="timing"))
    control = engine.admission_control()
    assert isinstance(control, AdmissionControl)

    class Batch:
        def __init__(self, running):
            self.running, self.max_num_seqs = running, 256
            self.max_num_batched_tokens, self.chunked = 2048, False

    req = engine.make_request("new", 0, 1000, SamplingParams(max_tokens=8), 0.0)
    decoding = []
    for i in range(64):
        r = engine.make_request(f"d{i}", i + 1, 500, SamplingParams(max_tokens=512), 0.0)
        r.num_computed = r.num_prompt_tokens
        decoding.append(r)
    alone_s = control.look_ahead_s(req, Batch([]), [], 10.0)
    busy_s = control.look_ahead_s(req, Batch(decoding), [], 10.0)
    assert 0 < alone_s < busy_s
