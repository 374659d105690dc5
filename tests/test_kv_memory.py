"""kv-memory report: the per-token / request / batch arithmetic and the fit on a device."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.core.errors import ConfigError, DoesNotFitError, UnknownNameError
from sim.model.zoo import resolve_model
from sim.timing.hardware import load_profile
from sim.timing.kv_memory import format_kv_memory, kv_memory_report


def test_llama2_7b_fp16_classic_numbers():
    r = kv_memory_report("meta-llama/Llama-2-7b-hf", seq_len=4096, batch_size=8, dtype="fp16")
    assert r["kv_bytes_per_token"] == 2 * 32 * 32 * 128 * 2 == 524_288
    assert r["kv_mib_per_token"] == 0.5
    assert r["kv_bytes_per_request"] == 2 * 2**30  # 2 GiB per 4096-token request
    assert r["total_kv_bytes"] == 16 * 2**30
    assert "hardware" not in r
    text = format_kv_memory(r)
    assert "2 (K and V) x 32 layers x 32 KV heads x 128 head dim x 2 B" in text
    assert "524,288 B" in text and "0.50 MiB" in text and "2.00 GiB" in text
    json.dumps(r)  # the --json output


def test_gqa_and_kv_dtype():
    r = kv_memory_report("meta-llama/Llama-2-70b-hf", 1000, 1, "bf16", kv_cache_dtype="fp8")
    assert r["kv_bytes_per_token"] == 2 * 80 * 8 * 128 * 1
    assert r["dtype"] == "bfloat16" and r["kv_cache_dtype"] == "fp8_e4m3"
    assert "grouped-query attention" in format_kv_memory(r)


def test_with_hardware_reports_capacity():
    model = resolve_model("meta-llama/Llama-2-7b-hf")
    r = kv_memory_report(model, 4096, 64, "float16", hardware="a100-sxm4-80gb")
    plan = r["memory_plan"]
    assert r["num_kv_tokens"] == plan["num_kv_tokens"] == r["num_kv_blocks"] * 16
    assert r["max_concurrent_requests"] == r["num_kv_blocks"] // (4096 // 16)
    assert r["batch_fits"] is (r["max_concurrent_requests"] >= 64)
    assert r["batch_fits"] is False  # 64 x 2 GiB cannot fit next to the weights in 72 GiB
    text = format_kv_memory(r)
    assert "does NOT fit" in text and "memory plan" in text
    small = kv_memory_report(model, 4096, 2, "float16", hardware=load_profile("a100-sxm4-80gb"))
    assert small["batch_fits"] is True


def test_errors():
    with pytest.raises(ConfigError):
        kv_memory_report("meta-llama/Llama-2-7b-hf", 0, 1, "fp16")
    with pytest.raises(UnknownNameError):
        kv_memory_report("meta-llama/Llama-2-7b-hf", 10, 1, "fp17")
    with pytest.raises(DoesNotFitError):
        kv_memory_report("meta-llama/Llama-2-70b-hf", 10, 1, "fp16", hardware="a100-sxm4-80gb")


@settings(max_examples=30, deadline=None)
@given(seq_len=st.integers(1, 100_000), batch=st.integers(1, 512),
       name=st.sampled_from(["meta-llama/Llama-2-7b-hf", "mistralai/Mistral-7B-v0.1",
                             "Qwen/Qwen2-0.5B", "facebook/opt-13b"]),
       dtype=st.sampled_from(["fp16", "bf16", "fp8", "int8", "fp32"]))
def test_scaling_is_linear(seq_len, batch, name, dtype):
    r = kv_memory_report(name, seq_len, batch, dtype)
    cfg = resolve_model(name)
    assert r["kv_bytes_per_token"] == cfg.kv_bytes_per_token(dtype)
    assert r["kv_bytes_per_request"] == r["kv_bytes_per_token"] * seq_len
    assert r["total_kv_bytes"] == r["kv_bytes_per_request"] * batch
