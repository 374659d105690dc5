"""Memory plan: weights + activations + KV pool within the budget; helpful no-fit errors."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.core.errors import ConfigError, DoesNotFitError
from sim.model.zoo import resolve_model
from sim.timing.hardware import list_profiles, load_profile
from sim.timing.memory_plan import GIB, activation_peak_bytes, plan_memory

A100 = load_profile("a100-sxm4-80gb")
LLAMA7 = resolve_model("meta-llama/Llama-2-7b-hf")
LLAMA70 = resolve_model("meta-llama/Llama-2-70b-hf")


def test_llama7b_on_a100():
    plan = plan_memory(LLAMA7, A100)
    assert plan.capacity_bytes == A100.mem_bytes
    assert plan.budget_bytes == pytest.approx(0.9 * A100.mem_bytes)
    assert plan.weight_bytes == pytest.approx(LLAMA7.weight_bytes("float16"))
    assert plan.kv_bytes_per_token == 2 * 32 * 32 * 128 * 2
    used = plan.weight_bytes + plan.activation_peak_bytes + plan.kv_pool_bytes
    assert used == pytest.approx(plan.budget_bytes)
    assert plan.num_kv_tokens == plan.num_kv_blocks * plan.block_size
    assert plan.num_kv_blocks == int(plan.kv_pool_bytes // (plan.kv_bytes_per_token * 16))
    assert plan.max_concurrent_requests(4096) == plan.num_kv_blocks // 256
    text = plan.format()
    assert "KV pool" in text and f"{plan.num_kv_blocks:,}" in text
    assert plan.to_dict()["num_kv_blocks"] == plan.num_kv_blocks


def test_activation_formula():
    # hidden 2*M*E*2 + max(attn M*(2q+2kv)*2, mlp M*3*I*2, logits 8*R*V)
    m, r = 2048, 256
    expected = 2 * m * 4096 * 2 + max(m * (2 * 4096 + 2 * 4096) * 2, m * 3 * 11008 * 2,
                                      8 * r * 32000)
    assert activation_peak_bytes(LLAMA7, "float16", m, r) == expected


def test_llama70b_fp16_does_not_fit_one_a100_and_says_what_would():
    with pytest.raises(DoesNotFitError) as info:
        plan_memory(LLAMA70, A100)
    msg = str(info.value)
    assert "138 GB" in msg  # weights
    assert "72.0 GiB budget" in msg
    assert "tensor_parallel_size=2" in msg
    assert "int4" in msg
    bigger = [n for n in list_profiles() if load_profile(n).mem_bytes > 150 * GIB]
    assert bigger and any(name in msg for name in bigger)
    # and the suggestions are true
    assert plan_memory(LLAMA70, A100, tensor_parallel_size=2).num_kv_blocks > 0
    assert plan_memory(LLAMA70, A100, dtype="int4").num_kv_blocks > 0


def test_tensor_parallel_and_kv_dtype_scale_the_pool():
    tp1 = plan_memory(LLAMA7, A100)
    tp2 = plan_memory(LLAMA7, A100, tensor_parallel_size=2)
    assert tp2.weight_bytes == pytest.approx(tp1.weight_bytes / 2)
    assert tp2.kv_bytes_per_token == tp1.kv_bytes_per_token / 2
    fp8 = plan_memory(LLAMA7, A100, kv_cache_dtype="fp8")
    assert fp8.num_kv_tokens == pytest.approx(2 * tp1.num_kv_tokens, rel=0.001)
    # GQA with tp beyond n_kv_head replicates KV heads: 8 KV heads on 16 GPUs stay 1 head each
    tp16 = plan_memory(LLAMA70, A100, tensor_parallel_size=16)
    assert tp16.kv_bytes_per_token == 2 * 80 * 1 * 128 * 2
    with pytest.raises(ConfigError):
        plan_memory(LLAMA70, A100, tensor_parallel_size=3)


@pytest.mark.parametrize("kwargs", [
    {"gpu_memory_utilization": 0.0}, {"gpu_memory_utilization": 1.5}, {"block_size": 0},
    {"max_num_seqs": 0}, {"max_num_batched_tokens": -4}, {"tensor_parallel_size": 0},
])
def test_bad_arguments(kwargs):
    with pytest.raises(ConfigError):
        plan_memory(LLAMA7, A100, **kwargs)


@settings(max_examples=40, deadline=None)
@given(util=st.floats(0.3, 1.0), tokens=st.integers(1, 16384), seqs=st.integers(1, 1024),
       block=st.sampled_from([1, 8, 16, 32]))
def test_plan_never_exceeds_budget(util, tokens, seqs, block):
    plan = plan_memory(LLAMA7, A100, gpu_memory_utilization=util, max_num_batched_tokens=tokens,
                       max_num_seqs=seqs, block_size=block)
    kv_used = plan.num_kv_blocks * block * plan.kv_bytes_per_token
    assert plan.weight_bytes + plan.activation_peak_bytes + kv_used <= plan.budget_bytes
    assert plan.kv_pool_bytes - kv_used < block * plan.kv_bytes_per_token
