"""Static and dynamic (request-level) batching: when batches launch, and the oracles."""

from __future__ import annotations

import pytest

from sim.core.errors import ConfigError
from sim.core.request import Status
from sim.engine.args import EngineArgs
from sim.engine.engine import Engine
from sim.workload.specs import RequestSpec, make_workload


def run(specs, **kwargs):
    engine = Engine(EngineArgs(mode="timing", **kwargs))
    return {r.request_id: r for r in engine.run(specs).requests}


def test_static_launches_when_full_before_max_wait():
    reqs = run([RequestSpec("a", 0.0, 16, 4), RequestSpec("b", 0.05, 16, 4)],
               scheduler="static", max_num_seqs=2, max_wait_s=1.0)
    assert reqs["a"].first_scheduled_s == reqs["b"].first_scheduled_s == 0.05


def test_static_launches_a_partial_batch_after_max_wait():
    reqs = run([RequestSpec("a", 0.0, 16, 4)], scheduler="static", max_num_seqs=4,
               max_wait_s=0.25)
    assert reqs["a"].first_scheduled_s == 0.25 and reqs["a"].status is Status.FINISHED


def test_dynamic_launches_largest_preferred_size_at_once():
    specs = [RequestSpec(f"r{i}", 0.0, 16, 4) for i in range(5)]
    reqs = run(specs, scheduler="dynamic", max_num_seqs=8, preferred_batch_sizes=(2, 4),
               max_queue_delay_s=10.0)
    first = sorted(r.first_scheduled_s for r in reqs.values())
    assert first[:4] == [0.0] * 4  # a batch of 4 at once
    assert first[4] == pytest.approx(10.0)  # the fifth waits out the queue delay


def test_dynamic_queue_delay_sends_what_is_there():
    reqs = run([RequestSpec("a", 0.0, 16, 4), RequestSpec("b", 0.01, 16, 4)],
               scheduler="dynamic", max_num_seqs=8, preferred_batch_sizes=(4,),
               max_queue_delay_s=0.1)
    assert reqs["a"].first_scheduled_s == reqs["b"].first_scheduled_s == pytest.approx(0.1)


@pytest.mark.parametrize("scheduler", ["static", "dynamic"])
def test_request_level_batching_loses_nothing(scheduler):
    specs = list(make_workload(60, 30.0, 64, 16, seed=9))
    reqs = run(specs, scheduler=scheduler, max_num_seqs=8, max_wait_s=0.02)
    assert len(reqs) == 60 and all(r.status is Status.FINISHED for r in reqs.values())


def test_bad_batching_options():
    with pytest.raises(ConfigError, match="max_wait_s"):
        EngineArgs(max_wait_s=-1)
    with pytest.raises(ConfigError, match="preferred_batch_sizes"):
        EngineArgs(max_num_seqs=4, preferred_batch_sizes=(8,))


def test_dynamic_greedy_tokens_equal_reference():
    from sim.model.reference import generate

    engine = Engine(EngineArgs(scheduler="dynamic", dtype="float64", max_num_seqs=4,
                               preferred_batch_sizes=(2,), max_queue_delay_s=0.01))
    specs = list(make_workload(5, 50.0, 12, 6, seed=2, vocab_size=256))
    result = engine.run(specs)
    for spec, req in zip(specs, sorted(result.requests, key=lambda r: r.index), strict=True):
        assert req.output_token_ids == generate(engine.functional_model, spec.prompt_token_ids, 6)
