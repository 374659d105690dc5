"""`infersim kv-memory` as the Q1 walkthrough: tensor parallelism, the breakdown printed also
when the model does not fit (then the error, exit 2), `--kv-cache-dtype auto`, and a speculative
draft's weights and KV in the plan."""

from __future__ import annotations

import json

import pytest

from sim.cli.main import main
from sim.core.errors import ConfigError, DoesNotFitError
from sim.model.zoo import resolve_model
from sim.timing.hardware import load_profile
from sim.timing.kv_memory import KVMemoryDoesNotFitError, kv_memory_report
from sim.timing.memory_plan import plan_memory, with_draft

SEVENTY_B = "meta-llama/Llama-2-70b-hf"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_readme_70b_example_with_tp8_fits_and_reports_per_gpu(capsys):
    code, out, err = run(capsys, "kv-memory", "--model", SEVENTY_B, "--seq-len", "4096",
                         "--batch-size", "8", "--dtype", "fp16", "--hardware", "a100-sxm4-80gb",
                         "--tensor-parallel-size", "8")
    assert code == 0 and err == ""
    # 2 x 80 layers x 8 KV heads x 128 x 2 B = 320 KiB per token; one KV head per GPU at TP8
    assert "327,680 B" in out and "per GPU of TP=8: 1 KV head each" in out
    assert "40,960 B" in out  # 320 KiB / 8
    assert "a batch of 8 fits" in out


def test_tp_splits_kv_per_gpu_but_not_the_token_capacity_arithmetic():
    one = kv_memory_report(SEVENTY_B, 4096, 8, "fp16")
    eight = kv_memory_report(SEVENTY_B, 4096, 8, "fp16", tensor_parallel_size=8)
    assert eight["kv_bytes_per_token"] == one["kv_bytes_per_token"]  # the model's total
    assert eight["kv_bytes_per_token_per_gpu"] * 8 == one["kv_bytes_per_token"]
    sixteen = kv_memory_report(SEVENTY_B, 4096, 8, "fp16", tensor_parallel_size=16)
    # past n_kv_head = 8, KV heads are replicated: still one head (40 KiB) per GPU
    assert sixteen["kv_bytes_per_token_per_gpu"] == eight["kv_bytes_per_token_per_gpu"]
    r = kv_memory_report(SEVENTY_B, 4096, 8, "fp16", hardware="a100-sxm4-80gb",
                         tensor_parallel_size=8)
    plan = plan_memory(resolve_model(SEVENTY_B), load_profile("a100-sxm4-80gb"),
                       dtype="float16", tensor_parallel_size=8)
    assert r["num_kv_tokens"] == plan.num_kv_tokens
    assert r["max_concurrent_requests"] == plan.num_kv_blocks // 256


def test_breakdown_printed_before_the_error_when_it_does_not_fit(capsys):
    code, out, err = run(capsys, "kv-memory", "--model", SEVENTY_B, "--seq-len", "4096",
                         "--batch-size", "8", "--dtype", "fp16", "--hardware", "a100-sxm4-80gb")
    assert code == 2
    assert "327,680 B" in out  # the formula
    assert "memory plan" in out and "weights (float16)" in out and "128.48 GiB" in out
    assert "no block fits" in out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("infersim: error:")
    assert "does not fit" in lines[0] and "tensor_parallel_size=2" in lines[0]
    assert "Traceback" not in err


def test_does_not_fit_error_carries_the_report():
    with pytest.raises(KVMemoryDoesNotFitError) as info:
        kv_memory_report(SEVENTY_B, 4096, 1, "fp16", hardware="a100-sxm4-80gb")
    assert isinstance(info.value, DoesNotFitError)
    report = info.value.report
    assert report["fits"] is False and report["max_concurrent_requests"] == 0
    assert report["kv_pool_bytes_per_gpu"] < 0  # the weights alone exceed the budget
    assert report["weight_bytes_per_gpu"] > report["budget_bytes"]


def test_kv_cache_dtype_auto_is_accepted_as_in_simulate(capsys):
    code, out, _ = run(capsys, "kv-memory", "--model", "meta-llama/Llama-2-7b-hf",
                       "--seq-len", "1024", "--dtype", "bf16", "--kv-cache-dtype", "auto",
                       "--json")
    data = json.loads(out)
    assert code == 0 and data["kv_cache_dtype"] == "bfloat16"  # auto: as the weights
    code, out, _ = run(capsys, "kv-memory", "--model", "meta-llama/Llama-2-7b-hf",
                       "--seq-len", "1024", "--dtype", "auto", "--kv-cache-dtype", "fp8", "--json")
    data = json.loads(out)
    assert data["dtype"] == "float16" and data["kv_cache_dtype"] == "fp8_e4m3"
    assert data["kv_bytes_per_token"] == 2 * 32 * 32 * 128 * 1


def test_speculative_draft_weights_and_kv_join_the_plan(capsys):
    spec = '{"method": "draft_model", "model": "JackFram/llama-68m", "num_speculative_tokens": 4}'
    code, out, _ = run(capsys, "kv-memory", "--model", "meta-llama/Llama-2-7b-hf", "--seq-len",
                       "4096", "--dtype", "fp16", "--hardware", "a100-sxm4-80gb",
                       "--speculative-config", spec, "--json")
    data = json.loads(out)
    assert code == 0
    assert data["draft_model"] == "JackFram/llama-68m"
    assert data["draft_weight_bytes_per_gpu"] > 0 and data["draft_kv_bytes_per_token"] > 0
    target = resolve_model("meta-llama/Llama-2-7b-hf")
    base = plan_memory(target, load_profile("a100-sxm4-80gb"), dtype="float16")
    expected = with_draft(base, resolve_model("JackFram/llama-68m"), dtype="float16")
    assert data["num_kv_blocks"] == expected.num_kv_blocks < base.num_kv_blocks
    code, out, _ = run(capsys, "kv-memory", "--model", "meta-llama/Llama-2-7b-hf", "--seq-len",
                       "4096", "--hardware", "a100-sxm4-80gb", "--speculative-config", spec)
    assert "draft weights" in out and "draft JackFram/llama-68m" in out
    # n-gram speculation has no draft model: nothing joins the plan
    code, out, _ = run(capsys, "kv-memory", "--model", "meta-llama/Llama-2-7b-hf", "--seq-len",
                       "4096", "--hardware", "a100-sxm4-80gb", "--speculative-config",
                       '{"method": "ngram", "num_speculative_tokens": 4}', "--json")
    assert "draft_model" not in json.loads(out)


@pytest.mark.parametrize("argv,match", [
    (["--tensor-parallel-size", "3"], "tensor_parallel_size 3"),
    (["--tensor-parallel-size", "0"], "tensor_parallel_size"),
    (["--kv-cache-dtype", "fp9"], "fp9"),
    (["--speculative-config", "{oops"], "not valid JSON"),
])
def test_bad_flags_are_one_line_errors(capsys, argv, match):
    code, _, err = run(capsys, "kv-memory", "--model", SEVENTY_B, "--seq-len", "128", *argv)
    assert code == 2 and match in err and "Traceback" not in err


def test_tp_error_names_the_degrees_that_work():
    with pytest.raises(ConfigError, match="use one of 1, 2, 4, 8, 16"):
        kv_memory_report(SEVENTY_B, 128, 1, "fp16", tensor_parallel_size=3)
