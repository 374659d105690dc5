"""Speculative decoding through the whole engine.

Oracles: in float64, greedy output with speculation equals the plain engine's for every method,
several k, batch mixes, paged and contiguous KV, prefix caching, preemption and a tight token
budget; sampled output follows the target's exact distribution (seeded chi-square); a draft
equal to the target is always accepted; timing-only acceptance replays its rate or trace.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from scipy import stats

from sim import LLM, SamplingParams
from sim.cli.main import build_parser, engine_args_from
from sim.core.errors import ConfigError
from sim.engine.args import EngineArgs
from sim.engine.engine import Engine
from sim.workload.specs import RequestSpec
from speculative.acceptance import AcceptanceTrace, RequestAcceptance
from speculative.config import SpeculativeConfig
from tests.utils import create_scheduler

MODEL = "meta-llama/Llama-2-7b-hf"
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1}
NOISY = {"method": "draft_model", "draft_noise_scale": 0.1, "num_speculative_tokens": 4}
LAYERS = {"method": "draft_model", "draft_num_layers": 1, "num_speculative_tokens": 2,
          "model": "JackFram/llama-68m"}


def _prompts(n: int, seed: int = 0, vocab: int = 12) -> list[dict]:
    rng = np.random.default_rng(seed)  # a small id range: repeats for n-gram lookup
    return [{"prompt_token_ids": rng.integers(3, vocab, int(rng.integers(4, 20))).tolist()}
            for _ in range(n)]


def _greedy(spec, prompts, max_tokens=12, **kw) -> list[list[int]]:
    llm = LLM(MODEL, dtype="float64", speculative_config=spec, **kw)
    params = [SamplingParams(temperature=0, max_tokens=max_tokens + i % 5, ignore_eos=True)
              for i in range(len(prompts))]
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


CASES = {
    "paged": {},
    "contiguous": {"kv_cache": "contiguous"},
    "prefix": {"enable_prefix_caching": True, "block_size": 4},
    "preempt": {"num_gpu_blocks_override": 10, "block_size": 4, "max_model_len": 40},
    "swap": {"num_gpu_blocks_override": 10, "block_size": 4, "max_model_len": 40,
             "preemption_mode": "swap"},
    "budget": {"max_num_batched_tokens": 24, "max_num_seqs": 3},
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("spec", [NGRAM, NOISY, LAYERS], ids=["ngram", "noisy", "layers"])
def test_greedy_output_is_unchanged_by_speculation(case, spec):
    prompts = _prompts(6, seed=len(case))
    if case == "prefix":  # shared prefixes
        prompts = [{"prompt_token_ids": [5, 6, 7, 8, 9, 5, 6, 7] + p["prompt_token_ids"]}
                   for p in prompts]
    kw = CASES[case]
    assert _greedy(spec, prompts, **kw) == _greedy(None, prompts, **kw)


@pytest.mark.parametrize("k", [1, 2, 5])
def test_greedy_equality_across_k_and_stops_mid_draft(k):
    prompts = _prompts(4, seed=k)
    base = _greedy(None, prompts, max_tokens=9)
    spec = {"method": "draft_model", "draft_noise_scale": 0.0, "num_speculative_tokens": k}
    assert _greedy(spec, prompts, max_tokens=9) == base
    # a stop token inside an accepted run of drafts ends the request right there
    stop = base[0][3]
    llm = LLM(MODEL, dtype="float64", speculative_config=spec)
    out = llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=20,
                                                   stop_token_ids=[stop]))[0].outputs[0]
    plain = LLM(MODEL, dtype="float64").generate(
        prompts[:1], SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop]))
    assert out.token_ids == plain[0].outputs[0].token_ids
    assert out.finish_reason == "stop"


def test_a_draft_equal_to_the_target_is_always_accepted():
    spec = {"method": "draft_model", "draft_noise_scale": 0.0, "num_speculative_tokens": 3}
    llm = LLM(MODEL, dtype="float64", speculative_config=spec)
    llm.generate(_prompts(2), SamplingParams(temperature=0, max_tokens=13, ignore_eos=True))
    summary = llm.last_result.speculation
    assert summary["acceptance_rate"] == 1.0
    assert summary["mean_tokens_per_step"] == 4.0  # k + 1 every step
    assert summary["per_position_acceptance"] == [1.0, 1.0, 1.0]


def _exact_law(prompt: list[int], params: SamplingParams) -> dict[tuple[int, int], float]:
    """P(first two output tokens) under the target, from cacheless forwards (float64)."""
    engine = Engine(EngineArgs(MODEL, dtype="float64"))
    model = engine.functional_model
    from sim.model.sampling import sampling_probs

    p1 = sampling_probs(model.forward(prompt)[-1], params)
    law = {}
    for t1 in np.flatnonzero(p1):
        p2 = sampling_probs(model.forward([*prompt, int(t1)])[-1], params)
        for t2 in np.flatnonzero(p2):
            law[(int(t1), int(t2))] = p1[t1] * p2[t2]
    return law


@pytest.mark.parametrize("spec", [
    {"method": "draft_model", "draft_noise_scale": 0.15, "num_speculative_tokens": 2},
    {"method": "ngram", "num_speculative_tokens": 2},
], ids=["draft_model", "ngram"])
def test_sampled_output_follows_the_target_distribution(spec):
    # n-gram: every token id occurs in the prompt, so lookup always finds a draft
    prompt = (np.random.default_rng(0).permutation(258).tolist() if spec["method"] == "ngram"
              else [5, 6, 5, 6, 5])
    params = SamplingParams(temperature=1.5, top_k=3, max_tokens=3, ignore_eos=True)
    law = _exact_law(prompt, params)
    n = 1200
    llm = LLM(MODEL, dtype="float64", seed=11, speculative_config=spec, max_num_seqs=256,
              enable_prefix_caching=True)  # the shared prompt is computed once
    outs = llm.generate([{"prompt_token_ids": prompt}] * n, params)
    counts = dict.fromkeys(law, 0)
    for o in outs:
        counts[tuple(o.outputs[0].token_ids[:2])] += 1
    summary = llm.last_result.speculation
    assert summary["num_draft_tokens"] > n / 2
    if spec["method"] == "draft_model":  # both accept and reject paths ran
        assert 0.0 < summary["acceptance_rate"] < 1.0
    cells = sorted(law)
    observed = np.array([counts[c] for c in cells])
    expected = np.array([law[c] for c in cells]) * n
    assert stats.chisquare(observed, expected).pvalue > 1e-3


def test_sampled_speculation_is_deterministic_per_seed():
    spec = {"method": "draft_model", "draft_noise_scale": 0.3, "num_speculative_tokens": 3}
    params = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=10, ignore_eos=True)

    def run():
        llm = LLM(MODEL, seed=3, speculative_config=spec)
        return [o.outputs[0].token_ids for o in llm.generate(_prompts(3), params)]

    assert run() == run()


def _timing(spec, n=4, output_len=64, **kw):
    engine = Engine(EngineArgs(MODEL, mode="timing", speculative_config=spec, **kw))
    reqs = [RequestSpec(f"r{i}", 0.0, 100, output_len) for i in range(n)]
    return engine.run(reqs), engine


def test_timing_mode_iid_acceptance_rate_and_speedup():
    spec = {"method": "draft_model", "model": "JackFram/llama-68m",
            "num_speculative_tokens": 4, "acceptance_rate": 0.8}
    base, _ = _timing(None, n=1, output_len=400)
    res, engine = _timing(spec, n=1, output_len=400)
    assert res.requests[0].num_output_tokens == 400
    assert abs(res.speculation["alpha_estimate"] - 0.8) < 0.06
    from speculative.analysis import walltime_improvement

    measured = base.stats.busy_s / res.stats.busy_s
    formula = walltime_improvement(0.8, 4, engine.speculation.c)
    assert abs(measured / formula - 1) < 0.1
    assert res.stats.draft_s > 0
    again, _ = _timing(spec, n=1, output_len=400)
    assert again.stats.busy_s == res.stats.busy_s  # same seed, bit-identical


def test_timing_mode_replays_an_acceptance_trace(tmp_path):
    trace = AcceptanceTrace("ngram", 3, "x", (RequestAcceptance(8, (3, 0, 1), (3, 3, 3)),))
    path = trace.save(tmp_path / "trace.json")
    spec = {"method": "ngram", "num_speculative_tokens": 3, "acceptance_trace": str(path)}
    res, _ = _timing(spec, n=2, output_len=40)
    assert all(r.num_output_tokens == 40 for r in res.requests)
    acc = res.requests[0].spec_accepted
    assert acc[:6] == [3, 0, 1, 3, 0, 1]


def test_speculative_tokens_count_against_the_token_budget():
    spec = {"method": "draft_model", "model": "JackFram/llama-68m",
            "num_speculative_tokens": 4, "acceptance_rate": 0.5}
    engine, _kv, sched = create_scheduler(model=MODEL, speculative_config=spec,
                                         max_num_batched_tokens=2048, max_num_seqs=8)
    assert sched.speculation is engine.speculation  # build_scheduler wires it
    for i in range(8):
        sched.add(engine.request_from_spec(RequestSpec(f"r{i}", 0.0, 200, 50), i))
    plan = sched.schedule(0.0)
    assert plan is not None
    for seq in plan.seqs:  # commit the prefills: every request samples its first token
        seq.request.num_computed = seq.end
        seq.request.num_output_tokens = 1
    sched.max_num_batched_tokens = 20  # 8 decodes + at most 12 draft tokens
    plan = sched.schedule(0.0)
    assert plan.num_new_tokens <= 20
    assert sum(s.num_spec_tokens for s in plan.seqs) == 12
    assert plan.shape.num_logits == tuple(s.num_spec_tokens + 1 for s in plan.seqs)


def test_config_errors_and_the_cli_flag():
    with pytest.raises(ConfigError, match="num_speculative_tokens"):
        SpeculativeConfig.from_any({"method": "ngram", "num_speculative_token": 3})
    with pytest.raises(ConfigError, match="method"):
        EngineArgs(speculative_config={"method": "medusa"})
    with pytest.raises(ConfigError, match="acceptance_rate"):
        Engine(EngineArgs(MODEL, mode="timing", speculative_config={"method": "ngram"}))
    with pytest.raises(ConfigError, match="timing"):
        Engine(EngineArgs(MODEL, speculative_config={**NGRAM, "acceptance_rate": 0.5}))
    with pytest.raises(ConfigError, match="kv_cache"):
        Engine(EngineArgs(MODEL, kv_cache="none", speculative_config=NGRAM))
    ns = build_parser().parse_args(["simulate", "--mode", "timing", "--speculative-config",
                                    json.dumps({**NGRAM, "acceptance_rate": 0.6})])
    args = engine_args_from(ns)
    assert args.speculative_config == SpeculativeConfig(**NGRAM, acceptance_rate=0.6)


def test_adaptive_k_follows_the_measured_acceptance():
    out = {}
    for rate, in itertools.product((0.1, 0.95)):
        spec = {"method": "draft_model", "model": "JackFram/llama-68m", "adaptive": True,
                "num_speculative_tokens": 8, "acceptance_rate": rate}
        res, _ = _timing(spec, n=1, output_len=300)
        out[rate] = res.requests[0].spec_proposed[-20:]
    assert max(out[0.1]) <= 2 and min(out[0.95]) >= 6
