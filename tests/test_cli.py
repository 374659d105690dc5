"""The `infersim` command line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sim.cli.main import main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_simulate_writes_benchmark_serving_keys(tmp_path, capsys):
    out_json = tmp_path / "r.json"
    code, out, _ = run(capsys, "simulate", "--mode", "timing", "--num-prompts", "50",
                       "--request-rate", "5", "--input-len", "256", "--output-len", "32",
                       "--result-json", str(out_json), "--no-progress")
    assert code == 0 and "Serving Benchmark Result" in out
    data = json.loads(out_json.read_text())
    for key in ("completed", "total_input_tokens", "total_output_tokens", "duration",
                "request_throughput", "output_throughput"):
        assert key in data
    for metric in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "median", "p99"):
            assert f"{stat}_{metric}_ms" in data
    assert data["completed"] == 50 and data["total_output_tokens"] == 50 * 32


def test_simulate_functional_with_trace(capsys, conv_trace):
    from pathlib import Path

    code, out, _ = run(capsys, "simulate", "--dataset-path", str(Path(conv_trace.path)),
                       "--num-prompts", "8", "--max-model-len", "4096", "--no-progress",
                       "--mode", "timing", "--kv-cache", "none", "--scheduler", "static")
    assert code == 0 and "Successful requests" in out


def test_kv_memory_json(capsys):
    code, out, _ = run(capsys, "kv-memory", "--model", "meta-llama/Llama-2-7b-hf",
                       "--seq-len", "4096", "--batch-size", "8", "--dtype", "fp16", "--json")
    data = json.loads(out)
    assert code == 0
    assert data["kv_bytes_per_token"] == 524_288
    assert data["total_kv_bytes"] == 524_288 * 4096 * 8


def test_kv_memory_with_hardware_text_and_json(capsys):
    code, out, _ = run(capsys, "kv-memory", "--model", "meta-llama/Llama-2-7b-hf",
                       "--seq-len", "2048", "--batch-size", "4", "--dtype", "fp16",
                       "--hardware", "a100-sxm4-80gb")
    assert code == 0 and "2 x" in out
    code, out, _ = run(capsys, "kv-memory", "--model", "meta-llama/Llama-2-7b-hf",
                       "--seq-len", "2048", "--dtype", "fp16", "--hardware", "a100-sxm4-80gb",
                       "--json")
    assert json.loads(out)["num_kv_tokens"] > 100_000


def test_models_and_profiles_list(capsys):
    code, out, _ = run(capsys, "models")
    assert code == 0 and "meta-llama/Llama-2-70b-hf" in out and "MoE 8x top-2" in out
    code, out, _ = run(capsys, "profiles")
    assert code == 0 and "h100-sxm" in out and "mi300x" in out


@pytest.mark.parametrize("argv,match", [
    (["simulate", "--model", "llama-7b", "--mode", "timing"], "unknown model"),
    (["simulate", "--hardware", "a100", "--mode", "timing"], "a100-sxm4-80gb"),
    (["simulate", "--request-rate", "-2", "--mode", "timing"], "request-rate"),
    (["simulate", "--num-prompts", "0", "--mode", "timing"], "num-prompts"),
    (["simulate", "--model", "meta-llama/Llama-2-70b-hf", "--mode", "timing"], "does not fit"),
])
def test_bad_input_is_a_clear_error_with_exit_code_2(capsys, argv, match):
    code, _, err = run(capsys, *argv)
    assert code == 2 and match in err and "Traceback" not in err


def test_help_explains_every_subcommand():
    result = subprocess.run([sys.executable, "-m", "sim.cli.main", "--help"], capture_output=True,
                            text=True, check=True)
    for command in ("simulate", "demo", "kv-memory", "models", "profiles"):
        assert command in result.stdout
    result = subprocess.run([sys.executable, "-m", "sim.cli.main", "simulate", "--help"],
                            capture_output=True, text=True, check=True)
    assert "--request-rate" in result.stdout and "--kv-cache" in result.stdout
