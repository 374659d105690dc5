"""Admission control: queue limit, token bucket, SLO-aware rejection; each with a reason."""

from __future__ import annotations

import math

import pytest

from sim.core.errors import ConfigError
from sim.core.request import Status
from sim.engine.args import EngineArgs
from sim.engine.engine import Engine
from sim.workload.specs import RequestSpec, make_workload


def run(specs, **kwargs):
    engine = Engine(EngineArgs(mode="timing", **kwargs))
    result = engine.run(specs)
    return result, {r.request_id: r for r in result.requests}


def test_queue_limit_rejects_the_overflow_only():
    specs = [RequestSpec(f"r{i}", 0.0, 64, 8) for i in range(10)]
    result, reqs = run(specs, max_num_seqs=2, admission_max_waiting=3)
    rejected = [r for r in reqs.values() if r.status is Status.REJECTED]
    assert len(rejected) == 7  # all arrive at once: 3 fit in the queue, the rest are refused
    assert all(r.reject_reason.startswith("queue full") for r in rejected)
    assert result.summary.rejected_by_reason == {"queue full": 7}
    assert result.summary.num_completed == 3


def test_token_bucket_sustains_its_rate():
    # 100 requests at 50/s for 2 s through a bucket of 10/s, burst 5: about 5 + 2 * 10 admitted
    specs = list(make_workload(100, 50.0, 32, 4, seed=0))
    _, reqs = run(specs, admission_rate_per_s=10.0, admission_burst=5)
    admitted = sum(r.status is Status.FINISHED for r in reqs.values())
    span_s = max(s.arrival_s for s in specs)
    assert admitted <= 5 + math.ceil(span_s * 10) and admitted >= 0.8 * span_s * 10
    assert all(r.reject_reason.startswith("rate limited") for r in reqs.values()
               if r.status is Status.REJECTED)


def test_slo_aware_rejection_keeps_admitted_ttft_within_slo():
    specs = [RequestSpec(f"r{i}", 0.001 * i, 2000, 4) for i in range(40)]
    slo_s = 0.5
    result, reqs = run(specs, admission_ttft_slo_s=slo_s)
    rejected = [r for r in reqs.values() if r.status is Status.REJECTED]
    assert rejected and all("TTFT SLO" in r.reject_reason for r in rejected)
    # the prediction is a lower bound, so most admitted requests meet the SLO
    assert result.summary.ttft.median_s <= slo_s
    # without admission control everybody runs and the tail blows past the SLO
    loose, _ = run(specs)
    assert loose.summary.ttft.p99_s > slo_s


def test_bad_admission_arguments():
    for kwargs in ({"admission_max_waiting": -1}, {"admission_rate_per_s": 0.0},
                   {"admission_burst": 0}, {"admission_ttft_slo_s": -2.0}):
        with pytest.raises(ConfigError):
            EngineArgs(**kwargs)
