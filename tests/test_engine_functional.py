"""The engine with real tokens: the oracles every optimisation is held to.

- KV-cached greedy output == cacheless one-sequence-at-a-time `generate` (float64);
- batch invariance: a request's output (greedy or seeded sampling) does not depend on its batch;
- no KV cache == KV cache; static == continuous;
- tokens do not depend on the hardware profile (the functional side never reads the clock);
- same seed, bit-identical results.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from sim.core.request import SamplingParams, Status
from sim.engine.args import EngineArgs
from sim.engine.engine import Engine
from sim.model.reference import generate
from sim.workload.specs import make_workload

MODEL = "meta-llama/Llama-2-7b-hf"


def engine(**kwargs) -> Engine:
    kwargs.setdefault("dtype", "float64")
    return Engine(EngineArgs(model=MODEL, **kwargs))


def prompts(num: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=int(rng.integers(3, 40))).tolist() for _ in range(num)]


def run_prompts(eng: Engine, token_lists, params, arrivals_s=None) -> dict[str, list[int]]:
    arrivals_s = arrivals_s or [0.0] * len(token_lists)
    reqs = [eng.make_request(f"r{i}", i, len(ids), params, arrivals_s[i], list(ids))
            for i, ids in enumerate(token_lists)]
    result = eng.run(reqs)
    assert all(r.status is Status.FINISHED for r in result.requests)
    return {r.request_id: r.output_token_ids for r in result.requests}


GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.mark.parametrize("scheduler", ["static", "continuous"])
@pytest.mark.parametrize("kv_cache", ["none", "contiguous"])
def test_greedy_equals_cacheless_reference(scheduler, kv_cache):
    eng = engine(scheduler=scheduler, kv_cache=kv_cache, max_num_seqs=3)
    token_lists = prompts(7)
    got = run_prompts(eng, token_lists, GREEDY, arrivals_s=[0.0, 0.0, 0.01, 0.02, 0.02, 0.5, 0.9])
    model = eng.functional_model
    for i, ids in enumerate(token_lists):
        assert got[f"r{i}"] == generate(model, ids, 12), f"request r{i} diverged"


def test_reference_is_float64_and_proxy_keeps_structure():
    eng = engine()
    assert eng.functional_model.dtype == np.float64
    assert eng.functional_model.config.n_q_per_kv == eng.model_config.n_q_per_kv


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True),
    SamplingParams(temperature=0.9, top_p=0.9, top_k=50, max_tokens=10, ignore_eos=True),
])
def test_batch_invariance(params):
    """Alone, or in a batch of 6 arriving at different times: the same tokens."""
    token_lists = prompts(6, seed=1)
    batched = run_prompts(engine(max_num_seqs=4), token_lists, params,
                          arrivals_s=[0.0, 0.0, 0.003, 0.004, 0.1, 0.1])
    for i, ids in enumerate(token_lists):
        # the same index keeps the same derived random stream
        eng = engine()
        req = eng.make_request(f"r{i}", i, len(ids), params, 0.0, list(ids))
        alone = eng.run([req]).requests[0].output_token_ids
        assert batched[f"r{i}"] == alone


def test_per_request_seed_overrides_engine_seed():
    params = SamplingParams(temperature=1.0, seed=42, max_tokens=8, ignore_eos=True)
    ids = prompts(1)[0]
    a = run_prompts(engine(seed=0), [ids], params)["r0"]
    b = run_prompts(engine(seed=123), [ids], params)["r0"]
    assert a == b


def test_tokens_do_not_depend_on_hardware():
    token_lists = prompts(4, seed=2)
    params = SamplingParams(temperature=0.8, max_tokens=8, ignore_eos=True)
    a100 = run_prompts(engine(hardware="a100-sxm4-80gb"), token_lists, params)
    l4 = run_prompts(engine(hardware="l4", max_model_len=2048), token_lists, params)
    assert a100 == l4


def test_rerun_is_bit_identical():
    def once():
        eng = Engine(EngineArgs(model=MODEL, seed=5))
        result = eng.run(make_workload(12, 30.0, 24, 10, seed=5))
        return [(r.request_id, tuple(r.output_token_ids), tuple(r.token_times_s))
                for r in result.requests]

    assert once() == once()


def test_eos_stops_and_stays_in_token_ids():
    eng = engine()
    ids = prompts(1, seed=3)[0]
    free_run = run_prompts(eng, [ids], SamplingParams(temperature=0.0, max_tokens=30,
                                                       ignore_eos=True))["r0"]
    stop_at = free_run[4]
    params = SamplingParams(temperature=0.0, max_tokens=30, stop_token_ids=(stop_at,))
    eng2 = engine()
    req = eng2.make_request("s", 0, len(ids), params, 0.0, list(ids))
    out = eng2.run([req]).requests[0]
    first = free_run.index(stop_at)
    assert out.output_token_ids == free_run[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_at


def test_conv_trace_slice_end_to_end(conv_trace):
    from sim.workload.specs import workload_from_trace

    eng = Engine(EngineArgs(model=MODEL, seed=0))
    workload = workload_from_trace(conv_trace, num_requests=24, max_prompt_len=256,
                                   max_output_len=24)
    result = eng.run(workload)
    assert result.summary.num_completed == 24
    assert result.stats.num_tokens_computed == sum(
        r.num_prompt_tokens + r.num_output_tokens - 1 for r in result.requests)
    assert all(len(r.output_token_ids) == r.num_output_tokens for r in result.requests)
    assert math.isfinite(result.summary.ttft.p99_s)
