"""Timing and memory of quantization: bytes, peaks, dequantization, KV capacity, fallbacks."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.cli.main import build_parser, engine_args_from
from sim.core.errors import DoesNotFitError
from sim.core.quantization import METHODS, QuantSpec
from sim.core.step_shape import StepShape
from sim.engine.args import EngineArgs
from sim.engine.engine import Engine
from sim.model.zoo import resolve_model
from sim.timing.cost_model import CostModel
from sim.timing.hardware import load_profile
from sim.timing.memory_plan import plan_memory
from sim.timing.quantization import quantized_memory_plan, quantized_weight_bytes

LLAMA7 = resolve_model("meta-llama/Llama-2-7b-hf")
LLAMA70 = resolve_model("meta-llama/Llama-2-70b-hf")
A100, H100 = load_profile("a100-sxm4-80gb"), load_profile("h100-sxm")


def cost(method: str | None, hw=H100, model=LLAMA7, **kw) -> CostModel:  # type: ignore[no-untyped-def]
    spec = None if method is None else QuantSpec(method).resolve(hw)
    return CostModel(model, hw, dtype="float16", quantization=spec, **kw)


def test_weight_bytes_include_scales() -> None:
    assert QuantSpec("int4", 128).weight_bytes_per_param() == pytest.approx(0.5 + 2.5 / 128)
    assert QuantSpec("int8", 64).weight_bytes_per_param() == pytest.approx(1 + 2 / 64)
    assert QuantSpec("w8a8").weight_bytes_per_param(4096) == pytest.approx(1 + 4 / 4096)
    fp16 = plan_memory(LLAMA7, A100, dtype="float16").weight_bytes
    int4 = quantized_weight_bytes(LLAMA7, QuantSpec("int4"))
    assert 0.25 < int4 / fp16 < 0.35  # the 16-bit embedding and head stay


def test_decode_speeds_up_more_than_prefill() -> None:
    decode, prefill = StepShape.decode((512,)), StepShape.prefill((2048,))
    base = cost(None)
    for method in ("int8", "int4", "gptq"):
        q = cost(method)
        speedup_decode = base.step_cost(decode).total_s / q.step_cost(decode).total_s
        speedup_prefill = base.step_cost(prefill).total_s / q.step_cost(prefill).total_s
        assert speedup_decode > 1.3 and speedup_decode > speedup_prefill, method
        assert speedup_prefill < 1.0  # weight-only: dequantization shows when compute-bound
    assert cost("int4").step_cost(decode).total_s < cost("int8").step_cost(decode).total_s


def test_w8a8_and_fp8_use_their_tensor_core_peak() -> None:
    prefill = StepShape.prefill((4096,))
    for method, dtype in (("w8a8", "int8"), ("fp8", "fp8_e4m3")):
        q = cost(method)
        assert q.gemm_peak_flops == H100.peak_flops_for(dtype)
        assert q.step_cost(prefill).total_s < 0.8 * cost(None).step_cost(prefill).total_s
        assert q.step_cost(prefill).parts["quant"] > 0
    assert cost("w8a8", A100).gemm_peak_flops == A100.peak_flops_for("int8")


def test_a100_fp8_falls_back_to_weight_only_at_16_bit_peak() -> None:
    spec = QuantSpec("fp8").resolve(A100)
    assert spec.weight_only and "no fp8 tensor cores" in spec.note
    assert cost("fp8", A100).gemm_peak_flops == A100.peak_flops_for("float16")
    assert not QuantSpec("fp8").resolve(H100).weight_only
    assert "weight-only" in cost("fp8", A100).describe()


@settings(max_examples=30, deadline=None)
@given(method=st.sampled_from(METHODS), hw=st.sampled_from([A100, H100]),
       new=st.lists(st.integers(1, 600), min_size=1, max_size=6),
       ctx=st.integers(0, 4000))
def test_never_below_roofline(method: str, hw, new: list[int], ctx: int) -> None:  # type: ignore[no-untyped-def]
    shape = StepShape(tuple(new), (ctx,) * len(new))
    model = cost(method, hw)
    c = model.step_cost(shape)
    assert c.total_s >= model.roofline_bound_s(shape)
    assert c.total_s == pytest.approx(sum(c.parts.values()))
    assert model.step_time_s(shape.num_new_tokens, shape.num_context_tokens) == pytest.approx(
        c.total_s)


def test_freed_memory_becomes_kv_capacity() -> None:
    base = Engine(EngineArgs(mode="timing", hardware="a100-sxm4-80gb"))
    kv = {m: Engine(EngineArgs(mode="timing", hardware="a100-sxm4-80gb",
                               quantization=m)).num_kv_tokens for m in ("int8", "int4")}
    assert base.num_kv_tokens < kv["int8"] < kv["int4"]


def test_70b_int4_fits_one_a100_where_fp16_does_not() -> None:
    with pytest.raises(DoesNotFitError):
        plan_memory(LLAMA70, A100, dtype="float16")
    eng = Engine(EngineArgs(model="meta-llama/Llama-2-70b-hf", mode="timing",
                            hardware="a100-sxm4-80gb", quantization="int4"))
    assert eng.num_kv_tokens > 10_000
    plan = plan_memory(LLAMA70, A100, dtype="int4", gpu_memory_utilization=0.8)
    with pytest.raises(DoesNotFitError, match="does not fit"):
        quantized_memory_plan(plan, LLAMA70, QuantSpec("int8"))


def test_tensor_parallel_cost_is_quantized_too() -> None:
    eng = Engine(EngineArgs(mode="timing", quantization="int4", tensor_parallel_size=2))
    base = getattr(eng.cost_model, "base", eng.cost_model)
    assert base.quantization is not None and base.tensor_parallel_size == 2


def test_cli_flags_build_engine_args() -> None:
    ns = build_parser().parse_args(["simulate", "--quantization", "gptq",
                                    "--quantization-group-size", "64"])
    args = engine_args_from(ns)
    assert (args.quantization, args.quantization_group_size) == ("gptq", 64)


def test_weight_quantization_composes_with_quantized_kv_cache():
    """int8 weights and an fp8 KV cache together: both capacity gains add up in the memory
    plan, and a functional run with both completes with real tokens."""
    from sim.workload.specs import make_workload

    def kv_tokens(**kwargs):
        return Engine(EngineArgs(mode="timing", **kwargs)).num_kv_tokens

    plain = kv_tokens()
    both = kv_tokens(quantization="int8", kv_cache_dtype="fp8")
    assert both > kv_tokens(quantization="int8") > plain
    assert both > kv_tokens(kv_cache_dtype="fp8")
    engine = Engine(EngineArgs(quantization="int8", kv_cache_dtype="fp8", max_num_seqs=4))
    result = engine.run(make_workload(6, 50.0, 20, 8, seed=1, vocab_size=256))
    assert result.summary.num_completed == 6
    assert all(len(r.output_token_ids) == 8 for r in result.requests)
    assert "quantization=" in engine.description and "kv_cache_dtype=fp8" in engine.description
