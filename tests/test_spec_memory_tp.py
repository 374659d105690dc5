"""The speculative draft in the memory plan, and speculation with tensor parallelism.

Oracles: the draft's weights and its KV per token come out of the KV pool exactly as the plan's
arithmetic says (the pool re-cut into blocks of target + draft KV), n-gram lookup costs no memory;
in float64 greedy, speculation under TP gives the same tokens as TP without speculation and as
speculation without TP, with the draft on the TP group or on one rank; the sharded draft is
priced with its collectives (cheaper than on one rank for a large draft, dearer than a perfect
1/tp split); pipeline and data parallelism stay refused with a reason.
"""

from __future__ import annotations

import numpy as np
import pytest

from sim import LLM, SamplingParams
from sim.core.errors import ConfigError, DoesNotFitError
from sim.engine.args import EngineArgs
from sim.engine.engine import Engine
from sim.model.zoo import resolve_model
from sim.timing.cost_model import CostModel
from sim.timing.memory_plan import kv_bytes_per_token_per_gpu, weight_bytes_per_gpu
from speculative.config import SpeculativeConfig

MODEL = "meta-llama/Llama-2-7b-hf"
DRAFT = "JackFram/llama-68m"
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1}
NOISY = {"method": "draft_model", "draft_noise_scale": 0.1, "num_speculative_tokens": 4}
LAYERS = {"method": "draft_model", "draft_num_layers": 1, "num_speculative_tokens": 2,
          "model": DRAFT}


def _timing(spec: dict | None, **kw) -> Engine:
    if spec is not None:
        spec = {"acceptance_rate": 0.7, **spec}
    return Engine(EngineArgs(model=kw.pop("model", MODEL), mode="timing",
                             speculative_config=spec, **kw))


# ------------------------------------------------------------------ memory plan
def test_draft_weights_and_kv_come_out_of_the_pool():
    plain = _timing(None).memory
    eng = _timing({"method": "draft_model", "model": DRAFT, "num_speculative_tokens": 3})
    plan, draft = eng.memory, resolve_model(DRAFT)
    assert plan.draft_model_name == draft.name
    assert plan.draft_weight_bytes == pytest.approx(weight_bytes_per_gpu(draft, "float16"))
    assert plan.draft_kv_bytes_per_token == pytest.approx(
        kv_bytes_per_token_per_gpu(draft, plan.kv_cache_dtype))
    pool = plain.budget_bytes - plain.weight_bytes - plan.draft_weight_bytes \
        - plain.activation_peak_bytes
    block_bytes = (plain.kv_bytes_per_token + plan.draft_kv_bytes_per_token) * plan.block_size
    assert plan.num_kv_blocks == int(pool // block_bytes) < plain.num_kv_blocks
    assert plan.num_kv_tokens == plan.num_kv_blocks * plan.block_size
    # a swapped block moves both models' KV
    assert eng.kv_block_bytes == pytest.approx(block_bytes)
    text = plan.format()
    assert "draft weights" in text and "draft KV per token" in text and draft.name in text
    assert "draft memory" in eng.description
    assert "draft weights" not in plain.format()


def test_a_draft_as_large_as_the_target_halves_the_pool_roughly():
    plain = _timing(None).memory
    # no model / num_layers: the draft is priced and sized as the target itself
    plan = _timing({"method": "draft_model", "draft_noise_scale": 0.1}).memory
    assert plan.draft_weight_bytes == pytest.approx(plain.weight_bytes)
    assert plan.draft_kv_bytes_per_token == pytest.approx(plain.kv_bytes_per_token)
    expected = (plain.kv_pool_bytes - plain.weight_bytes) / (2 * plain.kv_bytes_per_token)
    assert plan.num_kv_tokens == pytest.approx(expected, abs=plan.block_size)
    assert plan.num_kv_tokens < plain.num_kv_tokens / 2


def test_ngram_lookup_takes_no_memory():
    assert _timing(NGRAM).memory == _timing(None).memory


def test_a_draft_that_leaves_no_block_is_refused_with_the_ways_out():
    # 7B fp16 (13.5 GB) fits 0.25 x 80 GB once, not twice
    assert _timing(None, gpu_memory_utilization=0.25).memory.num_kv_blocks > 0
    with pytest.raises(DoesNotFitError, match="draft.*draft_tensor_parallel_size"):
        _timing({"method": "draft_model", "draft_noise_scale": 0.1},
                gpu_memory_utilization=0.25, max_model_len=256)


def test_draft_on_one_rank_holds_all_its_weights_and_kv():
    big = "meta-llama/Llama-2-13b-hf"
    spec = {"method": "draft_model", "model": MODEL}
    group = _timing(spec, model=big, tensor_parallel_size=2).memory
    rank = _timing({**spec, "draft_tensor_parallel_size": 1}, model=big,
                   tensor_parallel_size=2).memory
    draft = resolve_model(MODEL)
    assert group.draft_tensor_parallel_size == 2 and rank.draft_tensor_parallel_size == 1
    assert group.draft_weight_bytes == pytest.approx(weight_bytes_per_gpu(draft, "float16", 2))
    assert rank.draft_weight_bytes == pytest.approx(2 * group.draft_weight_bytes)
    assert rank.draft_kv_bytes_per_token == pytest.approx(2 * group.draft_kv_bytes_per_token)
    assert rank.num_kv_blocks < group.num_kv_blocks
    assert "on this rank" in rank.format() and "TP=2" in group.format()


# ------------------------------------------------------------------ pricing under TP
def test_draft_priced_on_the_tp_group_or_one_rank():
    from parallel.cost import ParallelCostModel

    big = "meta-llama/Llama-2-13b-hf"
    spec = {"method": "draft_model", "model": MODEL}
    group = _timing(spec, model=big, tensor_parallel_size=2).speculation
    rank = _timing({**spec, "draft_tensor_parallel_size": 1}, model=big,
                   tensor_parallel_size=2).speculation
    alone = CostModel(resolve_model(MODEL), _timing(None).hardware, dtype="float16")
    assert group is not None and rank is not None
    assert isinstance(group.draft_cost, ParallelCostModel)
    assert isinstance(rank.draft_cost, CostModel)
    new, ctx = (1,) * 8, (512,) * 8
    t_group = group.draft_cost.step_time_s(new, ctx)
    t_rank = rank.draft_cost.step_time_s(new, ctx)
    assert t_rank == pytest.approx(alone.step_time_s(new, ctx))
    # a 7B draft decodes faster sharded, but its all-reduces keep it above half the time
    assert t_rank / 2 < t_group < t_rank
    assert group.c < rank.c


def test_timing_run_with_tp_speculates_and_draft_time_follows_the_placement():
    big = "meta-llama/Llama-2-13b-hf"
    spec = {"method": "draft_model", "model": MODEL, "num_speculative_tokens": 3}
    from sim.workload.specs import make_workload

    results = {}
    for dtp in (1, 2):
        eng = _timing({**spec, "draft_tensor_parallel_size": dtp}, model=big,
                      tensor_parallel_size=2, seed=0)
        res = eng.run(list(make_workload(16, 20.0, 64, 32, seed=1)))
        assert res.speculation is not None
        assert res.summary.num_completed == 16
        results[dtp] = res
    # same acceptance draws (seeded per request); only the draft's price differs
    assert results[1].speculation["num_accepted_tokens"] == results[2].speculation["num_accepted_tokens"]
    assert results[2].speculation["draft_s"] < results[1].speculation["draft_s"]
    assert results[2].summary.duration_s < results[1].summary.duration_s


# ------------------------------------------------------------------ functional oracle
def _prompts(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)  # a small id range: repeats for n-gram lookup
    return [{"prompt_token_ids": rng.integers(3, 12, int(rng.integers(4, 20))).tolist()}
            for _ in range(n)]


def _greedy(spec, prompts, **kw) -> list[list[int]]:
    llm = LLM(MODEL, dtype="float64", speculative_config=spec, **kw)
    params = [SamplingParams(temperature=0, max_tokens=10 + i % 4, ignore_eos=True)
              for i in range(len(prompts))]
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


@pytest.mark.parametrize("spec", [NGRAM, NOISY, LAYERS, {**NOISY, "draft_tensor_parallel_size": 1}],
                         ids=["ngram", "noisy", "layers", "noisy-draft-on-one-rank"])
def test_greedy_tokens_under_tp_match_tp_alone_and_speculation_alone(spec):
    prompts = _prompts(5, seed=3)
    tp_plain = _greedy(None, prompts, tensor_parallel_size=2)
    assert _greedy(spec, prompts, tensor_parallel_size=2) == tp_plain
    assert _greedy(spec, prompts) == tp_plain


def test_speculation_under_tp_accepts_drafts():
    llm = LLM(MODEL, dtype="float64", tensor_parallel_size=2,
              speculative_config={"method": "draft_model", "draft_noise_scale": 0.0,
                                  "num_speculative_tokens": 3})
    llm.generate(_prompts(3), SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    spec = llm.last_result.speculation
    assert spec is not None and spec["num_accepted_tokens"] == spec["num_draft_tokens"] > 0


# ------------------------------------------------------------------ refusals
@pytest.mark.parametrize("kw", [{"data_parallel_size": 2}, {"pipeline_parallel_size": 2}],
                         ids=["dp", "pp"])
def test_pipeline_and_data_parallel_speculation_stay_refused(kw):
    with pytest.raises(ConfigError, match="one lane"):
        EngineArgs(model=MODEL, speculative_config=NOISY, **kw)


def test_draft_tp_must_be_one_or_the_target_tp():
    with pytest.raises(ConfigError, match="draft_tensor_parallel_size must be 1"):
        EngineArgs(model=MODEL, tensor_parallel_size=2,
                   speculative_config={**NOISY, "draft_tensor_parallel_size": 4})
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match="draft_tensor_parallel_size"):
            SpeculativeConfig(draft_noise_scale=0.1, draft_tensor_parallel_size=bad)
    with pytest.raises(ConfigError, match="ngram.*draft_tensor_parallel_size"):
        SpeculativeConfig(method="ngram", draft_tensor_parallel_size=1)


def test_token_trees_under_tp_are_refused():
    with pytest.raises(ConfigError, match="tree.*tensor_parallel_size"):
        EngineArgs(model=MODEL, tensor_parallel_size=2,
                   speculative_config={**NOISY, "tree": (2, 2)})
