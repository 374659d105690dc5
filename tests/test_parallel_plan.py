"""ParallelPlan: divisibility, per-GPU memory, clear does-not-fit errors; the parallel cost model."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from parallel.cost import ParallelCostModel
from parallel.plan import ParallelPlan, candidate_plans, plan_gpu_memory, stage_layers
from sim.core.errors import ConfigError, DoesNotFitError
from sim.core.step_shape import StepShape
from sim.model.zoo import resolve_model
from sim.timing.cost_model import CostModel
from sim.timing.hardware import load_profile
from sim.timing.memory_plan import plan_memory

A100 = load_profile("a100-sxm4-80gb")
L40S = load_profile("l40s")
LLAMA7 = resolve_model("meta-llama/Llama-2-7b-hf")
LLAMA70 = resolve_model("meta-llama/Llama-2-70b-hf")
MIXTRAL = resolve_model("mistralai/Mixtral-8x7B-v0.1")
QWEN_MOE = resolve_model("Qwen/Qwen1.5-MoE-A2.7B")


def test_stage_layers_follow_vllm_partition():
    assert [len(r) for r in stage_layers(80, 3)] == [27, 27, 26]  # remainder before the last stage
    assert [len(r) for r in stage_layers(32, 4)] == [8] * 4
    parts = stage_layers(10, 4)
    assert [len(r) for r in parts] == [2, 3, 3, 2] and parts[-1].stop == 10
    with pytest.raises(ConfigError, match="between 1 and n_layer"):
        stage_layers(4, 5)


@pytest.mark.parametrize("plan, match", [
    (ParallelPlan(tp=3), "divide n_head"),
    (ParallelPlan(tp=2, ep=2), "mixture-of-experts"),
])
def test_divisibility_errors_name_the_dimension(plan, match):
    with pytest.raises(ConfigError, match=match):
        plan.check_shapes(LLAMA7)


def test_kv_heads_are_replicated_past_n_kv_head_and_experts_must_divide():
    ParallelPlan(tp=16).check_shapes(LLAMA70)  # 8 KV heads, each on 2 GPUs
    with pytest.raises(ConfigError, match="n_expert"):
        ParallelPlan(tp=8, ep=8).check_shapes(QWEN_MOE)  # 60 experts
    with pytest.raises(ConfigError, match="ep must be 1 or tp"):
        ParallelPlan(tp=2, ep=4)


def test_70b_fp16_on_one_a100_says_by_how_much_and_which_plans_fit():
    with pytest.raises(DoesNotFitError) as err:
        plan_gpu_memory(ParallelPlan(), LLAMA70, A100)
    msg = str(err.value)
    assert re.search(r"exceed the 72\.0 GiB budget by 5\d\.\d GiB", msg)
    assert "tensor_parallel_size=2, pipeline_parallel_size=1" in msg
    assert "tensor_parallel_size=1, pipeline_parallel_size=2" in msg
    with pytest.raises(DoesNotFitError, match=r"85\.\d GiB more.*plans that fit: tp=1 pp=4 .*tp=4 pp=1"):
        ParallelPlan(pp=1).check(LLAMA70, L40S)


def test_memory_per_gpu_matches_plan_memory_for_tp_and_splits_layers_for_pp():
    for tp in (1, 2, 4, 8):
        ours = ParallelPlan(tp=tp).check(LLAMA70 if tp > 1 else LLAMA7, A100).binding
        ref = plan_memory(LLAMA70 if tp > 1 else LLAMA7, A100, tensor_parallel_size=tp)
        assert ours.weight_bytes == pytest.approx(ref.weight_bytes, rel=0.01)
        assert ours.num_kv_tokens == pytest.approx(ref.num_kv_tokens, rel=0.01)
    pp2 = ParallelPlan(tp=2, pp=2).check(LLAMA70, A100)
    tp4 = ParallelPlan(tp=4).check(LLAMA70, A100)
    assert pp2.binding.weight_bytes == pytest.approx(tp4.binding.weight_bytes, rel=0.01)
    # half the layers x twice the KV heads per GPU: the same KV bytes per token
    assert pp2.binding.kv_bytes_per_token == pytest.approx(tp4.binding.kv_bytes_per_token)
    assert ParallelPlan(pp=2).check(LLAMA7, A100).binding.kv_bytes_per_token == \
        pytest.approx(plan_memory(LLAMA7, A100).kv_bytes_per_token / 2)


def test_candidate_plans_use_all_gpus_and_offer_ep_for_moe():
    plans = list(candidate_plans(MIXTRAL, 8))
    assert all(p.num_gpus == 8 for p in plans)
    assert ParallelPlan(tp=8, ep=8) in plans and ParallelPlan(tp=8) in plans
    assert not any(p.ep > 1 for p in candidate_plans(LLAMA7, 8))


def test_tp1_parallel_cost_model_equals_the_plain_one():
    shape = StepShape((1, 1, 300), (500, 20, 0))
    plain = CostModel(LLAMA7, A100).step_cost(shape).total_s
    assert ParallelCostModel(LLAMA7, A100, ParallelPlan()).step_cost(shape).total_s == \
        pytest.approx(plain, rel=1e-12)


def test_tp_adds_two_all_reduces_per_layer_and_pcie_costs_more():
    shape = StepShape.decode([1000] * 32)
    cm = ParallelCostModel(LLAMA7, A100, ParallelPlan(tp=4))
    comm = cm.comm_breakdown(shape)
    one = cm.comm.all_reduce(32 * 4096 * 2, 4)
    assert comm.tp_all_reduce_s == pytest.approx((2 * 32 + 1) * one.transfer_s)
    assert comm.all_reduce_algorithm == "one_shot"  # 256 KiB over 4 NVSwitch GPUs
    parts = cm.step_cost(shape).parts
    assert parts["comm"] == pytest.approx(comm.transfer_s)
    assert parts["comm_launch"] == pytest.approx(comm.launch_s) and comm.launch_s > 0
    big = StepShape.prefill([4096])
    pcie = ParallelCostModel(LLAMA7, L40S, ParallelPlan(tp=4)).comm_breakdown(big)
    assert pcie.total_s > 3 * cm.comm_breakdown(big).total_s


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 64), min_size=1, max_size=6),
       st.lists(st.integers(0, 3000), min_size=6, max_size=6),
       st.sampled_from([ParallelPlan(tp=2), ParallelPlan(tp=4, pp=2), ParallelPlan(pp=4),
                        ParallelPlan(tp=8)]))
def test_parallel_step_is_never_below_the_roofline_and_fast_path_agrees(new, ctx, plan):
    ctx = ctx[:len(new)]
    shape = StepShape(tuple(new), tuple(ctx))
    cm = ParallelCostModel(LLAMA70, A100, plan)
    total = cm.step_cost(shape).total_s
    assert total >= cm.roofline_bound_s(shape)
    assert cm.step_time_s(shape.num_new_tokens, shape.num_context_tokens) == \
        pytest.approx(total, rel=1e-9)
    # a micro-batch's latency is its stages plus the sends plus the CPU overhead
    stages = cm.stage_times_s(shape)
    assert sum(stages) + (plan.pp - 1) * cm.send_recv_s(shape) + cm.step_overhead_s == \
        pytest.approx(total, rel=1e-9)


def test_expert_parallel_prices_all_to_all_and_imbalance():
    shape = StepShape.prefill([512] * 4)
    tp = ParallelCostModel(MIXTRAL, A100, ParallelPlan(tp=4)).step_cost(shape)
    ep = ParallelCostModel(MIXTRAL, A100, ParallelPlan(tp=4, ep=4)).step_cost(shape)
    skew = ParallelCostModel(MIXTRAL, A100, ParallelPlan(tp=4, ep=4),
                             expert_imbalance=1.5).step_cost(shape)
    assert ep.parts["comm"] < tp.parts["comm"]  # top-2 of 8: less traffic than 2 all-reduces
    assert skew.parts["moe"] == pytest.approx(1.5 * ep.parts["moe"])
    with pytest.raises(ConfigError, match="imbalance"):
        ParallelCostModel(MIXTRAL, A100, ParallelPlan(tp=4, ep=4), expert_imbalance=0.5)
