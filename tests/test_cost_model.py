"""Cost model: shapes, physics (roofline), invariances and the fast path."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.core.errors import ConfigError
from sim.model.zoo import resolve_model
from sim.timing.cost_model import CostModel, StepCost, StepShape
from sim.timing.hardware import load_profile
from sim.timing.roofline import expected_experts_hit

A100 = load_profile("a100-sxm4-80gb")
H100 = load_profile("h100-sxm")
LLAMA7 = resolve_model("meta-llama/Llama-2-7b-hf")
MODELS = {
    "llama7": CostModel(LLAMA7, A100),
    "llama70_tp4": CostModel(resolve_model("meta-llama/Llama-2-70b-hf"), A100,
                             tensor_parallel_size=4),
    "mixtral": CostModel(resolve_model("mistralai/Mixtral-8x7B-v0.1"), H100,
                         tensor_parallel_size=2),
    "qwen_moe": CostModel(resolve_model("Qwen/Qwen1.5-MoE-A2.7B"), A100),
    "mistral_window": CostModel(resolve_model("mistralai/Mistral-7B-v0.1"), A100),
    "opt": CostModel(resolve_model("facebook/opt-13b"), A100, dtype="int8"),
}

seq = st.tuples(st.integers(1, 700), st.integers(0, 6000))
steps = st.lists(seq, min_size=1, max_size=24)


def shape_of(pairs: list[tuple[int, int]]) -> StepShape:
    return StepShape(tuple(n for n, _ in pairs), tuple(c for _, c in pairs))


# ------------------------------------------------------------------ StepShape
@pytest.mark.parametrize("new, ctx, logits", [
    ((), (), None), ((1, 2), (0,), None), ((0,), (5,), None), ((1,), (-1,), None),
    ((4,), (0,), (5,)), ((4, 1), (0, 3), (1,)),
])
def test_step_shape_rejects_bad_input(new, ctx, logits):
    with pytest.raises(ConfigError):
        StepShape(new, ctx, logits)


def test_step_shape_constructors_and_lists():
    assert StepShape.decode([5, 7]) == StepShape((1, 1), (5, 7))
    assert StepShape.prefill([5, 7]) == StepShape((5, 7), (0, 0))
    s = StepShape([3, 1], [0, 9], [2, 1])  # lists are turned into tuples
    assert s.num_new_tokens == (3, 1) and s.total_logits == 3 and s.total_new_tokens == 4
    assert StepShape((3, 1), (0, 9)).total_logits == 2


# ------------------------------------------------------------------ physics and structure
def test_decode_batch_one_is_bound_by_weight_bytes():
    cm = MODELS["llama7"]
    cost = cm.step_cost(StepShape.decode([100]))
    weight_read_s = LLAMA7.weight_bytes("float16") / A100.hbm_bytes_per_s
    assert cost.total_s > weight_read_s
    assert cm.roofline_bound_s(StepShape.decode([100])) == pytest.approx(weight_read_s, rel=0.02)
    for part in ("qkv_proj", "o_proj", "mlp", "attn_decode", "lm_head"):
        assert cost.bound[part] == "memory"
    assert cost.parts["attn_prefill"] == 0.0


def test_long_prefill_is_compute_bound():
    cm = MODELS["llama7"]
    shape = StepShape.prefill([4096])
    cost = cm.step_cost(shape)
    for part in ("qkv_proj", "o_proj", "mlp", "attn_prefill"):
        assert cost.bound[part] == "compute"
    assert cost.parts["attn_decode"] == 0.0
    # 2 x layer params FLOPs per token (not embedding / LM head), plus causal attention
    # 4*h*d*n(n+1)/2 per layer
    gemm_flops = 2 * 4096 * (LLAMA7.num_params() - 2 * LLAMA7.n_vocab * LLAMA7.n_embd)
    attn_flops = 4 * 32 * 128 * (4096 * 4097 // 2) * 32
    lm_flops = 2 * LLAMA7.n_vocab * LLAMA7.n_embd  # one logit row
    assert cost.flops == pytest.approx(gemm_flops + attn_flops + lm_flops, rel=0.01)


def test_parts_sum_to_total_and_breakdown():
    cost = MODELS["mixtral"].step_cost(StepShape((1, 1, 300), (500, 20, 0)))
    assert isinstance(cost, StepCost)
    assert sum(cost.parts.values()) == pytest.approx(cost.total_s, rel=1e-12)
    assert cost.parts["comm"] == 0.0 and "moe" in cost.parts and "mlp" not in cost.parts
    assert set(cost.bound) == set(cost.parts)
    text = cost.breakdown()
    assert "moe" in text and "total" in text
    with pytest.raises(ConfigError):
        cost.breakdown("hours")


def test_moe_reads_only_the_experts_hit():
    assert expected_experts_hit(1, 8, 2) == pytest.approx(2.0)
    assert expected_experts_hit(10_000, 8, 2) == pytest.approx(8.0)
    assert expected_experts_hit(3, 60, 4) == pytest.approx(60 * (1 - (56 / 60) ** 3))
    cm = MODELS["mixtral"]
    one = cm.step_cost(StepShape.decode([100])).parts["moe"]
    many = cm.step_cost(StepShape.decode([100] * 64)).parts["moe"]
    assert 2.5 < many / one < 4.5  # 2 experts of 8 read at batch 1, all 8 at batch 64


def test_tensor_parallel_divides_work_and_dtypes_change_bytes():
    base = CostModel(LLAMA7, A100)
    tp2 = CostModel(LLAMA7, A100, tensor_parallel_size=2)
    shape = StepShape.prefill([2048])
    assert tp2.step_cost(shape).flops == pytest.approx(base.step_cost(shape).flops / 2, rel=0.02)
    decode = StepShape.decode([3000] * 32)
    fp8 = CostModel(LLAMA7, H100, dtype="fp8", kv_cache_dtype="fp8")
    fp16 = CostModel(LLAMA7, H100)
    assert fp8.step_cost(decode).bytes < 0.6 * fp16.step_cost(decode).bytes
    assert fp8.step_cost(decode).total_s < fp16.step_cost(decode).total_s
    with pytest.raises(ConfigError):
        CostModel(LLAMA7, A100, tensor_parallel_size=3)
    with pytest.raises(ConfigError):
        CostModel(LLAMA7, A100, step_overhead_s=-1.0)


def test_overhead_is_added_once_per_step():
    shape = StepShape.decode([10, 20])
    with_overhead = CostModel(LLAMA7, A100, step_overhead_s=2e-3).step_cost(shape)
    without = CostModel(LLAMA7, A100, step_overhead_s=0.0).step_cost(shape)
    assert with_overhead.total_s - without.total_s == pytest.approx(2e-3)


def test_sliding_window_caps_attention():
    cm = MODELS["mistral_window"]  # window 4096
    at_window = cm.step_cost(StepShape.decode([4095])).parts["attn_decode"]
    past = cm.step_cost(StepShape.decode([20_000])).parts["attn_decode"]
    assert past == pytest.approx(at_window, rel=1e-9)
    short = cm.step_cost(StepShape.decode([1000])).parts["attn_decode"]
    assert short < at_window


def test_layer_op_times_cover_the_calibrated_ops():
    ops = MODELS["llama7"].layer_op_times_s(512)
    for name in ("attn_pre_proj", "attn_post_proj", "mlp_up_proj", "mlp_down_proj", "mlp_act",
                 "attn_rope", "input_layernorm", "post_attention_layernorm", "add"):
        assert ops[name] > 0
    assert ops["mlp_up_proj"] > ops["attn_post_proj"]


# ------------------------------------------------------------------ properties
@settings(max_examples=60, deadline=None)
@given(pairs=steps, which=st.sampled_from(sorted(MODELS)))
def test_never_below_roofline_and_fast_path_agrees(pairs, which):
    cm = MODELS[which]
    shape = shape_of(pairs)
    cost = cm.step_cost(shape)
    assert cost.total_s >= cm.roofline_bound_s(shape) > 0
    assert cm.step_time_s(shape.num_new_tokens, shape.num_context_tokens) == pytest.approx(
        cost.total_s, rel=1e-12)


@settings(max_examples=60, deadline=None)
@given(pairs=steps, which=st.sampled_from(sorted(MODELS)), seed=st.integers(0, 2**16))
def test_permuting_sequences_never_changes_cost(pairs, which, seed):
    cm = MODELS[which]
    shuffled = list(pairs)
    random.Random(seed).shuffle(shuffled)
    assert cm.step_cost(shape_of(shuffled)) == cm.step_cost(shape_of(pairs))


@settings(max_examples=60, deadline=None)
@given(pairs=steps, extra=seq, which=st.sampled_from(sorted(MODELS)),
       pick=st.integers(0, 10**6), more=st.integers(1, 500))
def test_cost_is_monotone_in_tokens(pairs, extra, which, pick, more):
    cm = MODELS[which]
    base = cm.step_cost(shape_of(pairs)).total_s
    # one more sequence
    assert cm.step_cost(shape_of([*pairs, extra])).total_s >= base
    # more context for one sequence
    i = pick % len(pairs)
    longer = list(pairs)
    longer[i] = (pairs[i][0], pairs[i][1] + more)
    assert cm.step_cost(shape_of(longer)).total_s >= base
    # more new tokens for a sequence that is already a prefill (decode -> prefill switches
    # kernels: see the cost_model docstring)
    if pairs[i][0] >= 2:
        wider = list(pairs)
        wider[i] = (pairs[i][0] + more, pairs[i][1])
        assert cm.step_cost(shape_of(wider)).total_s >= base
