"""Parallel plans through the engine: identical greedy tokens, no lost or duplicated request,
a measured pipeline bubble, the CLI flags and `infersim plans`."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sim import LLM, SamplingParams
from sim.cli.main import main
from sim.engine.args import EngineArgs
from sim.engine.engine import Engine
from sim.workload.specs import make_workload

PROMPTS = ["Hello, my name is", "The capital of France is", "abc", "x" * 40, "0123456789"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=10)


def _tokens(model: str, **kwargs) -> list[list[int]]:
    llm = LLM(model=model, dtype="float64", **kwargs)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]


@pytest.fixture(scope="module")
def llama_ref() -> list[list[int]]:
    return _tokens("meta-llama/Llama-2-7b-hf")


@pytest.mark.parametrize("kwargs", [
    {"tensor_parallel_size": 2},
    {"tensor_parallel_size": 8},
    {"pipeline_parallel_size": 2},
    {"tensor_parallel_size": 2, "pipeline_parallel_size": 2},
    {"data_parallel_size": 3},
    {"data_parallel_size": 2, "data_parallel_router": "least_outstanding"},
    {"data_parallel_size": 2, "data_parallel_router": "prefix_affinity",
     "tensor_parallel_size": 2},
], ids=str)
def test_greedy_tokens_identical_end_to_end(llama_ref, kwargs):
    assert _tokens("meta-llama/Llama-2-7b-hf", **kwargs) == llama_ref


def test_classic_snippet_with_tensor_parallel_runs():
    llm = LLM(model="meta-llama/Llama-2-7b-chat-hf", tensor_parallel_size=2)
    outputs = llm.generate(["Hello, my name is", "The capital of France is"],
                           SamplingParams(temperature=0.7, top_p=0.9, max_tokens=8))
    assert all(o.outputs[0].finish_reason for o in outputs)
    assert "tp=2" in llm.engine.description


@pytest.mark.parametrize("ep", [False, True])
def test_mixtral_tensor_and_expert_parallel_tokens_identical(ep):
    ref = _tokens("mistralai/Mixtral-8x7B-v0.1", hardware="h200-sxm")
    got = _tokens("mistralai/Mixtral-8x7B-v0.1", tensor_parallel_size=2,
                  enable_expert_parallel=ep)
    assert got == ref


@settings(max_examples=12, deadline=None)
@given(st.integers(1, 4), st.sampled_from(["round_robin", "least_outstanding",
                                           "prefix_affinity"]),
       st.integers(1, 2), st.integers(1, 40), st.floats(0.5, 200.0))
def test_data_parallel_loses_and_duplicates_no_request(dp, router, pp, num, rate):
    args = EngineArgs(model="meta-llama/Llama-2-7b-hf", mode="timing", data_parallel_size=dp,
                      pipeline_parallel_size=pp, data_parallel_router=router,
                      max_num_seqs=8)
    engine = Engine(args)
    result = engine.run(make_workload(num, rate, 64, 16, seed=num))
    ids = [r.request_id for r in result.requests]
    assert sorted(ids) == sorted(set(ids)) and len(ids) == num
    assert all(r.num_output_tokens == 16 for r in result.requests)
    if dp * pp > 1:
        assert sum(engine.parallel_stats.requests_per_replica) == num
    assert result.stats.num_tokens_computed == num * (64 + 15)


def test_round_robin_spreads_evenly_and_dp_raises_throughput():
    def run(dp: int) -> tuple[float, list[int]]:
        engine = Engine(EngineArgs(model="meta-llama/Llama-2-7b-hf", mode="timing",
                                   data_parallel_size=dp, max_num_seqs=16))
        res = engine.run(make_workload(64, float("inf"), 256, 64, seed=0))
        per = engine.parallel_stats.requests_per_replica if dp > 1 else [64]
        return res.summary.output_throughput, per
    one, _ = run(1)
    four, per = run(4)
    assert per == [16, 16, 16, 16]
    assert four > 3 * one


def test_pipeline_keeps_several_micro_batches_in_flight_and_measures_the_bubble():
    def run(pp: int, num: int) -> Engine:
        engine = Engine(EngineArgs(model="meta-llama/Llama-2-70b-hf", mode="timing",
                                   tensor_parallel_size=2, pipeline_parallel_size=pp,
                                   max_num_seqs=32))
        engine.last = engine.run(make_workload(num, float("inf"), 256, 32, seed=0))
        return engine
    single = run(4, 1)  # one request: one micro-batch at a time, the stages mostly idle
    full = run(4, 128)  # 4 virtual engines keep every stage busy
    assert single.parallel_stats.bubble_fraction() > 0.7
    assert full.parallel_stats.bubble_fraction() < 0.3
    # pp=4 on 8 GPUs vs tp=2 alone: more KV room and overlapped stages raise throughput
    assert full.last.summary.output_throughput > run(1, 128).last.summary.output_throughput


def test_cli_flags_and_plans(capsys, tmp_path):
    out = tmp_path / "r.json"
    assert main(["simulate", "--mode", "timing", "--model", "meta-llama/Llama-2-70b-hf",
                 "--tensor-parallel-size", "4", "--pipeline-parallel-size", "2",
                 "--data-parallel-size", "2", "--num-prompts", "20", "--no-progress",
                 "--result-json", str(out)]) == 0
    assert json.loads(out.read_text())["completed"] == 20
    assert main(["simulate", "--mode", "timing", "--model", "mistralai/Mixtral-8x7B-v0.1",
                 "--tensor-parallel-size", "2", "--enable-expert-parallel",
                 "--num-prompts", "5", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["plans", "--model", "meta-llama/Llama-2-70b-hf", "--hardware",
                 "a100-sxm4-80gb", "--num-gpus", "4", "--num-prompts", "30"]) == 0
    text = capsys.readouterr().out
    assert "does not fit" in text and "out tok/s" in text
    assert main(["simulate", "--mode", "timing", "--model", "meta-llama/Llama-2-70b-hf",
                 "--num-prompts", "2", "--no-progress"]) == 2
    assert "Parallel plans that fit on 2 GPUs" in capsys.readouterr().err
