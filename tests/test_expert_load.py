"""Expert parallelism priced from routing: the `expert_load` skew (uniform, Zipf, a recorded
routing trace) in timing runs, the real router's per-step load in functional runs, and proxies
with the target's real expert count."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from parallel.cost import ParallelCostModel
from parallel.expert import (
    ExpertImbalanceModel,
    ExpertLoadSpec,
    read_routing_trace,
    write_routing_trace,
)
from parallel.plan import ParallelPlan
from parallel.tensor import ShardedModel
from sim.core.errors import ConfigError
from sim.core.step_shape import StepShape
from sim.engine.args import EngineArgs
from sim.engine.engine import Engine
from sim.model.proxy import load_functional_model, tiny_proxy_config
from sim.model.zoo import resolve_model
from sim.timing.hardware import load_profile
from sim.workload.specs import make_workload

A100 = load_profile("a100-sxm4-80gb")
MIXTRAL = resolve_model("mistralai/Mixtral-8x7B-v0.1")
QWEN_MOE = resolve_model("Qwen/Qwen1.5-MoE-A2.7B")
EP4 = ParallelPlan(tp=4, ep=4)


def _skew(text: str, ep: int = 4, seed: int = 0) -> ExpertImbalanceModel:
    return ExpertImbalanceModel(ExpertLoadSpec.parse(text), MIXTRAL.n_expert,
                                MIXTRAL.n_expert_per_tok, ep, seed)


def _pricer(text: str, seed: int = 0) -> ParallelCostModel:
    return ParallelCostModel(MIXTRAL, A100, EP4, expert_load=_skew(text, seed=seed))


def _timing_engine(**kwargs: object) -> Engine:
    return Engine(EngineArgs(mode="timing", model="mistralai/Mixtral-8x7B-v0.1",
                             hardware="A100-SXM4-80GB", tensor_parallel_size=4,
                             enable_expert_parallel=True, **kwargs))  # type: ignore[arg-type]


# ---------------------------------------------------------------------- uniform = before
def test_uniform_prices_exactly_as_before_and_keeps_the_fast_path() -> None:
    before = ParallelCostModel(MIXTRAL, A100, EP4)
    uniform = _pricer("uniform")
    assert uniform._simple and before._simple and uniform.expert_load is None
    new, ctx = (1,) * 32 + (512,), (900,) * 32 + (0,)
    assert uniform.step_time_s(new, ctx) == before.step_time_s(new, ctx)
    shape = StepShape(new, ctx)
    assert uniform.step_cost(shape) == before.step_cost(shape)
    stretch = np.array([700, 1200, 3000])
    np.testing.assert_array_equal(uniform.decode_stretch_s(stretch, 5),
                                  before.decode_stretch_s(stretch, 5))


def test_uniform_engine_run_matches_the_default() -> None:
    specs = list(make_workload(12, 8.0, 128, 16, seed=3))
    default = _timing_engine().run(specs).summary.to_benchmark_json()
    uniform = _timing_engine(expert_load="uniform").run(specs).summary.to_benchmark_json()
    assert default == uniform


# ---------------------------------------------------------------------- zipf
def test_zipf_raises_the_moe_time_monotonically_with_the_skew() -> None:
    shape = StepShape((1,) * 64, (1000,) * 64)
    base = ParallelCostModel(MIXTRAL, A100, EP4).step_cost(shape).parts["moe"]
    moe = [_pricer(f"zipf:{s}").step_cost(shape).parts["moe"] for s in (0.25, 0.5, 1.0, 1.2, 2.0)]
    assert base < moe[0]
    assert all(a < b for a, b in itertools.pairwise(moe)), moe
    for num_tokens in (16, 256, 2048):  # the factor itself, across step sizes
        factors = [_skew(f"zipf:{s}").imbalance(num_tokens) for s in (0.5, 1.0, 1.5, 3.0)]
        assert all(a < b for a, b in itertools.pairwise(factors)), factors
        assert factors[0] > 1.0 and factors[-1] <= EP4.ep  # the busiest rank takes it all


def test_the_skew_is_bounded_by_top_k_routing() -> None:
    """Each token reaches k distinct experts, so one expert gets at most every token once: with
    ep = n_expert ranks, max / mean <= n_expert / k, even at an extreme skew."""
    skew = _skew("zipf:8", ep=8)
    for num_tokens in (1, 4, 64):
        assert skew.imbalance(num_tokens) <= MIXTRAL.n_expert / MIXTRAL.n_expert_per_tok


def test_the_zipf_price_is_deterministic_per_seed_and_independent_of_the_caller() -> None:
    a, b, other = _skew("zipf:1.2", seed=5), _skew("zipf:1.2", seed=5), _skew("zipf:1.2", seed=6)
    sizes = [7, 64, 300, 64, 7]
    assert [a.imbalance(t) for t in sizes] == [b.imbalance(t) for t in reversed(sizes)][::-1]
    assert a.imbalance(64) != other.imbalance(64)  # a different seed draws other routings
    state = np.random.get_state()  # the global RNG is never touched
    _skew("zipf:1.2", seed=9).imbalance(33)
    assert all(np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y
               for x, y in zip(state, np.random.get_state(), strict=True))


def test_a_skewed_decode_stretch_is_bit_identical_to_its_steps() -> None:
    pricer = _pricer("zipf:1.2")
    assert not pricer._simple
    ctx = np.array([100, 2000, 40, 900])
    steps = [pricer.step_time_s((1,) * 4, tuple((ctx + k).tolist()), 4) for k in range(6)]
    np.testing.assert_array_equal(pricer.decode_stretch_s(ctx, 6), np.array(steps))


def test_zipf_slows_an_engine_run_and_is_deterministic() -> None:
    specs = list(make_workload(16, 8.0, 128, 16, seed=3))
    uniform = _timing_engine().run(specs).summary
    skewed = _timing_engine(expert_load="zipf:1.2", seed=4).run(specs).summary
    again = _timing_engine(expert_load="zipf:1.2", seed=4).run(specs).summary
    assert skewed.to_benchmark_json() == again.to_benchmark_json()
    assert skewed.to_benchmark_json()["mean_tpot_ms"] > uniform.to_benchmark_json()["mean_tpot_ms"]


# ---------------------------------------------------------------------- traces
def test_a_routing_trace_round_trips(tmp_path: Path) -> None:
    rows = [np.array([5, 0, 3, 8, 1, 1, 0, 2]), np.array([1, 1, 1, 1, 1, 1, 1, 1])]
    path = tmp_path / "trace.json"
    write_routing_trace(path, rows, top_k=2)
    n_expert, top_k, counts = read_routing_trace(path)
    assert (n_expert, top_k) == (8, 2)
    np.testing.assert_array_equal(counts, np.stack(rows))
    spec = ExpertLoadSpec.parse(str(path))
    assert spec.kind == "trace" and spec.trace_counts is not None
    np.testing.assert_array_equal(spec.trace_counts, np.stack(rows))


def test_a_measured_functional_load_replays_as_a_trace(tmp_path: Path) -> None:
    """The real router's per-step counts, written as a trace, price a timing run."""
    model, _ = load_functional_model("mistralai/Mixtral-8x7B-v0.1")
    sharded = ShardedModel(model, ParallelPlan(tp=2, ep=2))
    for n in (40, 1, 1):  # a prefill and two decode passes
        sharded.forward(np.arange(n) % model.config.n_vocab)
    load = sharded.expert_load
    assert load is not None
    path = tmp_path / "measured.json"
    load.write_trace(path, model.config.n_expert_per_tok)
    _, _, counts = read_routing_trace(path)
    assert counts.shape == (3, 8)
    c = model.config
    n_moe = sum(c.is_moe_layer(i) for i in range(c.n_layer))
    # one row per pass: every token's k copies in every MoE layer (no capacity: none dropped)
    assert counts.sum(axis=1).tolist() == [n_moe * c.n_expert_per_tok * n for n in (40, 1, 1)]
    summary = load.take_summary()
    assert summary.num_steps == 3 and summary.mean_imbalance >= 1.0
    assert load.take_summary().num_steps == 0  # taken: the next run starts afresh
    skew = ExpertImbalanceModel(ExpertLoadSpec.parse(str(path)), 8, 2, 4, seed=0)
    assert skew.imbalance(64) > 1.0


def test_a_one_hot_trace_prices_the_busiest_rank(tmp_path: Path) -> None:
    """Every copy on experts 0 and 1 (rank 0 of 4): the rank carries everything, max / mean =
    ep, whatever the sampling."""
    path = tmp_path / "hot.json"
    write_routing_trace(path, [np.array([10, 10, 0, 0, 0, 0, 0, 0])], top_k=2)
    assert _skew(str(path)).imbalance(32) == pytest.approx(4.0)


# ---------------------------------------------------------------------- functional runs
def test_a_functional_ep_run_reports_the_measured_per_step_imbalance() -> None:
    engine = Engine(EngineArgs(mode="functional", model="mistralai/Mixtral-8x7B-v0.1",
                               tensor_parallel_size=2, enable_expert_parallel=True))
    result = engine.run(list(make_workload(3, 8.0, 12, 4, seed=1, vocab_size=256)))
    load = result.expert_load
    assert load is not None and load.source == "measured"
    assert load.num_steps >= 4  # one prefill and at least three decode steps
    assert 1.0 <= load.mean_imbalance <= load.p99_imbalance <= load.max_imbalance <= 2.0
    dense = Engine(EngineArgs(mode="functional", model="meta-llama/Llama-2-7b-hf"))
    assert dense.run(list(make_workload(1, 8.0, 8, 2, seed=1, vocab_size=256))).expert_load is None


# ---------------------------------------------------------------------- proxies
def test_proxies_keep_the_real_expert_count() -> None:
    proxy = tiny_proxy_config(QWEN_MOE)
    assert (proxy.n_expert, proxy.n_expert_per_tok) == (60, 4)
    assert tiny_proxy_config(MIXTRAL).n_expert == 8


# ---------------------------------------------------------------------- refused values
@pytest.mark.parametrize("value", ["", "zipf", "zipf:", "zipf:0", "zipf:-1", "zipf:nan",
                                   "zipf:inf", "zipf:abc", "lognormal:1", "/no/such/trace.json"])
def test_bad_expert_load_values_are_refused_naming_the_field(value: str) -> None:
    with pytest.raises(ConfigError, match="expert_load"):
        EngineArgs(mode="timing", expert_load=value)


def test_a_non_string_expert_load_is_refused() -> None:
    with pytest.raises(ConfigError, match="expert_load"):
        EngineArgs(mode="timing", expert_load=1.2)  # type: ignore[arg-type]


@pytest.mark.parametrize("doc", [
    {"format": "other", "version": 1, "n_expert": 2, "top_k": 1, "steps": [[1, 1]]},
    {"format": "infersim-routing-trace", "version": 2, "n_expert": 2, "top_k": 1,
     "steps": [[1, 1]]},
    {"format": "infersim-routing-trace", "version": 1, "n_expert": 2, "top_k": 3,
     "steps": [[1, 1]]},
    {"format": "infersim-routing-trace", "version": 1, "n_expert": 2, "top_k": 1,
     "steps": [[1, 1, 1]]},
    {"format": "infersim-routing-trace", "version": 1, "n_expert": 2, "top_k": 1,
     "steps": [[0, 0]]},
    {"format": "infersim-routing-trace", "version": 1, "n_expert": 2, "top_k": 1,
     "steps": [[1, -1]]},
    {"format": "infersim-routing-trace", "version": 1, "n_expert": 2, "top_k": 1, "steps": []},
])
def test_malformed_traces_are_refused_naming_the_field(tmp_path: Path,
                                                      doc: dict[str, object]) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="expert_load"):
        EngineArgs(mode="timing", expert_load=str(path))


def test_a_trace_of_another_model_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "qwen.json"
    write_routing_trace(path, [np.ones(60, dtype=np.int64)], top_k=4)
    with pytest.raises(ConfigError, match="60 experts"):
        _timing_engine(expert_load=str(path))


def test_a_skew_without_expert_parallelism_is_refused() -> None:
    with pytest.raises(ConfigError, match="enable_expert_parallel"):
        Engine(EngineArgs(mode="timing", model="mistralai/Mixtral-8x7B-v0.1",
                          tensor_parallel_size=4, expert_load="zipf:1.2"))
    with pytest.raises(ConfigError, match="expert_load"):
        Engine(EngineArgs(mode="timing", model="meta-llama/Llama-2-7b-hf",
                          expert_load="zipf:1.2"))


def test_a_constant_and_a_skew_together_are_refused() -> None:
    with pytest.raises(ConfigError, match="pass one"):
        ParallelCostModel(MIXTRAL, A100, EP4, expert_imbalance=1.3,
                          expert_load=_skew("zipf:1.2"))
