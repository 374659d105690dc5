"""One engine loop for every parallel layout (`sim.engine.loop`): with data or pipeline
parallelism, `n > 1` forks stay within their leader's lane and equal the one-lane samples, beam
search equals the cacheless reference, every lane's steps are recorded (labelled by lane),
admission control applies, and timing-only coasting is bit-identical to step-by-step runs."""

from __future__ import annotations

import math

import numpy as np
import pytest

import sim.engine.loop as engine_loop
from sim import LLM, SamplingParams
from sim.core.request import Status
from sim.engine.args import EngineArgs
from sim.engine.engine import Engine
from sim.model.beam_search import BeamSearchParams
from sim.model.reference import beam_search as reference_beam_search
from sim.workload.specs import RequestSpec, make_workload

RNG = np.random.default_rng(5)
PROMPTS = [{"prompt_token_ids": RNG.integers(1, 200, n).tolist()} for n in (7, 19, 33, 12)]
SAMPLED = SamplingParams(n=3, temperature=0.9, top_p=0.95, max_tokens=8, ignore_eos=True)
LAYOUTS = [{"data_parallel_size": 2}, {"pipeline_parallel_size": 2},
           {"data_parallel_size": 2, "pipeline_parallel_size": 2}]


def _ids(kw: dict) -> str:
    return "-".join(f"{k.split('_')[0]}={v}" for k, v in kw.items())


def _record_adds(monkeypatch) -> dict[str, int]:
    """request id -> the lane whose scheduler it entered (every `add`, and every `join` of a
    forked sample, in the run)."""
    joined: dict[str, int] = {}
    make = engine_loop.build_lanes

    def build_lanes(engine):
        lanes = make(engine)
        for lane in lanes:
            add, join = lane.scheduler.add, lane.scheduler.join

            def recording_add(req, _add=add, _i=lane.index):
                joined[req.request_id] = _i
                return _add(req)

            def recording_join(req, parent=None, _join=join, _i=lane.index):
                joined[req.request_id] = _i
                return _join(req, parent)
            lane.scheduler.add, lane.scheduler.join = recording_add, recording_join
        return lanes
    monkeypatch.setattr(engine_loop, "build_lanes", build_lanes)
    return joined


@pytest.mark.parametrize("kwargs", LAYOUTS, ids=_ids)
def test_samples_stay_in_their_lane_and_equal_the_one_lane_samples(monkeypatch, kwargs):
    def samples(**kw):
        llm = LLM(dtype="float64", max_num_seqs=16, max_model_len=96, **kw)
        return [[c.token_ids for c in o.outputs] for o in llm.generate(PROMPTS, SAMPLED)]
    one = samples()
    joined = _record_adds(monkeypatch)
    assert samples(**kwargs) == one
    leaders = [rid for rid in joined if "_" not in rid]
    assert len({joined[rid] for rid in leaders}) > 1  # the leaders spread over lanes
    for rid in leaders:
        assert {joined[f"{i}_{rid}"] for i in (1, 2)} == {joined[rid]}


def test_timing_samples_share_their_prompt_within_the_lane():
    engine = Engine(EngineArgs(mode="timing", block_size=4, max_model_len=96,
                               num_gpu_blocks_override=64, data_parallel_size=2))
    reqs = [engine.make_request(str(i), i, 30, SAMPLED, 0.0) for i in range(4)]
    result = engine.run(reqs)
    assert len(result.requests) == 12
    assert all(r.num_output_tokens == 8 for r in result.requests)
    # the prompt is computed once per request plus its last token per extra sample: the forks
    # shared the leader's blocks, which only its own lane holds
    assert result.stats.num_tokens_computed == 4 * (30 + 2) + 12 * 7
    assert engine.parallel_stats.requests_per_replica == [2, 2]


@pytest.mark.parametrize("kwargs", [*LAYOUTS, {"data_parallel_size": 2, "block_size": 4,
                                               "num_gpu_blocks_override": 40}], ids=_ids)
def test_beam_search_with_lanes_equals_the_cacheless_reference(kwargs):
    llm = LLM(dtype="float64", max_model_len=64, **kwargs)
    outs = llm.beam_search(PROMPTS, BeamSearchParams(beam_width=3, max_tokens=7))
    model, eos = llm.engine.functional_model, set(llm.engine.eos_token_ids)
    for prompt, out in zip(PROMPTS, outs, strict=True):
        ref = reference_beam_search(model, prompt["prompt_token_ids"], 3, 7, eos,
                                    max_model_len=llm.engine.max_model_len)
        assert [s.tokens for s in out.sequences] == [b.tokens for b in ref]
        np.testing.assert_allclose([s.cum_logprob for s in out.sequences],
                                   [b.cum_logprob for b in ref], atol=1e-9)
    # beams fork their lane's blocks (copy-on-write); a sharded model's beams recompute
    sharded = kwargs.get("pipeline_parallel_size", 1) > 1
    assert (llm.last_result.stats.num_copied_blocks > 0) == (not sharded)


@pytest.mark.parametrize("dp, pp", [(2, 1), (2, 2), (1, 3)])
def test_step_series_records_every_lanes_steps(dp, pp):
    engine = Engine(EngineArgs(mode="timing", data_parallel_size=dp, pipeline_parallel_size=pp,
                               max_num_seqs=8))
    result = engine.run(make_workload(40, 20.0, 128, 24, seed=2), record_steps=True)
    steps = result.steps
    assert steps is not None and len(steps) == result.stats.num_steps
    cols = steps.columns()
    assert set(cols["lane"].astype(int).tolist()) == set(range(dp * pp))
    assert sum(len(steps.for_lane(i)) for i in range(dp * pp)) == len(steps)
    tokens = cols["num_prefill_tokens"] + cols["num_decode_tokens"]
    assert tokens.sum() == result.stats.num_tokens_computed
    for i in range(dp * pp):  # one micro-batch in flight per lane
        lane = steps.for_lane(i).columns()
        assert (lane["start_s"][1:] >= lane["end_s"][:-1]).all()


@pytest.mark.parametrize("kwargs", [{"data_parallel_size": 2},
                                    {"data_parallel_size": 3, "max_num_seqs": 4,
                                     "num_gpu_blocks_override": 60, "max_model_len": 512},
                                    {"data_parallel_size": 2, "enable_chunked_prefill": True,
                                     "max_num_batched_tokens": 128}], ids=_ids)
@pytest.mark.parametrize("rate", [5.0, math.inf])
def test_coasting_with_lanes_is_identical_to_step_by_step(kwargs, rate):
    def run(coast: bool):
        engine = Engine(EngineArgs(mode="timing", **kwargs))
        engine.coast_enabled = coast
        result = engine.run(make_workload(40, rate, 300, 30, seed=1), record_steps=True)
        stats = engine.parallel_stats
        return ([(r.request_id, tuple(r.token_times_s)) for r in result.requests],
                result.steps.rows, result.stats, stats.stage_busy_s, stats.requests_per_replica)

    assert run(True) == run(False)


def test_admission_control_with_lanes():
    # queue limit: per lane (where the request waits); all arrive at once, 10 per replica
    specs = [RequestSpec(f"r{i}", 0.0, 64, 8) for i in range(20)]
    result = Engine(EngineArgs(mode="timing", max_num_seqs=2, admission_max_waiting=3,
                               data_parallel_size=2)).run(specs)
    assert result.summary.rejected_by_reason == {"queue full": 14}
    assert result.summary.num_completed == 6
    # token bucket: the front end's, so the same requests pass as on one lane
    specs = list(make_workload(100, 50.0, 32, 4, seed=0))

    def passed(**kw):
        res = Engine(EngineArgs(mode="timing", admission_rate_per_s=10.0, admission_burst=5,
                                **kw)).run(specs)
        return sorted(r.request_id for r in res.requests if r.status is Status.FINISHED)
    assert passed(data_parallel_size=2, pipeline_parallel_size=2) == passed()
