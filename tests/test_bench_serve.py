"""`infersim simulate` as `vllm bench serve` (issue 17 item 3): the flags, vLLM's result JSON
keys, `--config` files and re-iterable workloads."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from sim.cli.main import main
from sim.engine.args import EngineArgs
from sim.engine.engine import Engine
from sim.workload.specs import make_workload

# The keys `vllm bench serve --save-result` writes for a generative run: `result` in
# vllm/benchmarks/serve.py (benchmark(): duration ... max_concurrent_requests) and the run
# metadata main() adds (date, backend, model_id, tokenizer_id, num_prompts, request_rate,
# burstiness, max_concurrency), then mean/median/std/p<N>_<metric>_ms per --percentile-metrics.
VLLM_RESULT_KEYS = (
    "date", "backend", "model_id", "tokenizer_id", "num_prompts", "request_rate", "burstiness",
    "max_concurrency", "duration", "completed", "failed", "total_input_tokens",
    "total_output_tokens", "request_throughput", "request_goodput", "output_throughput",
    "total_token_throughput", "input_lens", "output_lens", "ttfts", "itls", "generated_texts",
    "errors", "max_output_tokens_per_s", "max_concurrent_requests",
)
PER_REQUEST_KEYS = ("input_lens", "output_lens", "ttfts", "itls", "generated_texts", "errors")


def simulate_json(tmp_path, capsys, *flags: str) -> dict:
    path = tmp_path / "r.json"
    code = main(["simulate", "--mode", "timing", "--no-progress", "--result-json", str(path),
                 *flags])
    capsys.readouterr()
    assert code == 0
    return json.loads(path.read_text())


def test_result_json_has_every_key_vllm_writes(tmp_path, capsys):
    data = simulate_json(tmp_path, capsys, "--num-prompts", "30", "--request-rate", "10",
                         "--percentile-metrics", "ttft,tpot,itl,e2el",
                         "--metric-percentiles", "25,50,99.9")
    missing = [k for k in VLLM_RESULT_KEYS if k not in data]
    assert not missing
    for metric in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "median", "std", "p25", "p50", "p99.9"):
            assert isinstance(data[f"{stat}_{metric}_ms"], float)
    for key in PER_REQUEST_KEYS:
        assert len(data[key]) == 30
    assert data["backend"] == "infersim" and data["num_prompts"] == 30
    assert data["request_rate"] == 10.0 and data["request_goodput"] is None
    # the arrays agree with the summary: vLLM readers recompute from them
    ttfts_ms = np.array(data["ttfts"]) * 1e3
    assert data["p25_ttft_ms"] == pytest.approx(np.percentile(ttfts_ms, 25))
    assert data["mean_ttft_ms"] == pytest.approx(ttfts_ms.mean())
    assert sum(data["output_lens"]) == data["total_output_tokens"]
    assert sum(data["input_lens"]) == data["total_input_tokens"]
    assert all(len(itl) == n - 1 for itl, n in zip(data["itls"], data["output_lens"], strict=True))
    assert 1 <= data["max_concurrent_requests"] <= 30
    assert 0 < data["max_output_tokens_per_s"] <= data["total_output_tokens"]
    # infersim's own keys stay
    for key in ("p90_ttft_ms", "mean_queueing_ms", "num_steps", "hardware", "num_rejected"):
        assert key in data


def test_all_at_once_rate_is_written_as_vllm_does(tmp_path, capsys):
    data = simulate_json(tmp_path, capsys, "--num-prompts", "4")
    assert data["request_rate"] == "inf"


def test_random_range_ratio_follows_vllms_bounds(tmp_path, capsys):
    data = simulate_json(tmp_path, capsys, "--num-prompts", "200", "--random-input-len", "101",
                         "--random-output-len", "3", "--random-range-ratio", "0.5")
    inputs, outputs = np.array(data["input_lens"]), np.array(data["output_lens"])
    # floor(101 * 0.5) = 50, ceil(101 * 1.5) = 152; output: max(floor(1.5), 1) = 1 .. ceil(4.5) = 5
    assert inputs.min() >= 50 and inputs.max() <= 152 and inputs.min() < 70
    assert outputs.min() >= 1 and outputs.max() <= 5 and len(set(outputs.tolist())) > 2


@pytest.mark.parametrize("flags, field", [
    (("--random-range-ratio", "1.0"), "--random-range-ratio"),
    (("--random-range-ratio", "-0.1"), "--random-range-ratio"),
    (("--random-input-len", "1", "--random-range-ratio", "0.5"), "--random-input-len"),
    (("--goodput", "ttft"), "--goodput"),
    (("--goodput", "latency:3"), "--goodput"),
    (("--goodput", "ttft:abc"), "--goodput"),
    (("--goodput", "ttft:100", "--slo-ttft-ms", "200"), "--slo-ttft-ms"),
    (("--percentile-metrics", "ttft,queue"), "--percentile-metrics"),
    (("--metric-percentiles", "0"), "--metric-percentiles"),
    (("--dataset-name", "azure-code"), "--dataset-path"),
    (("--dataset-name", "sonnet"), "--dataset-name"),
    (("--dataset-name", "shared-prefix"), "--shared-prefix-len"),
    (("--dataset-name", "random", "--shared-prefix-len", "8"), "--shared-prefix-len"),
])
def test_bad_bench_flags_exit_2_naming_the_flag(capsys, flags, field):
    code = main(["simulate", "--mode", "timing", "--no-progress", "--num-prompts", "2", *flags])
    err = capsys.readouterr().err
    assert code == 2 and field in err


def test_goodput_counts_requests_meeting_every_slo(tmp_path, capsys):
    flags = ("--num-prompts", "60", "--request-rate", "30")
    plain = simulate_json(tmp_path, capsys, *flags)
    # SLOs at the medians, so that some requests meet each and fewer meet both
    ttft_ms, e2el_ms = plain["median_ttft_ms"], plain["median_e2el_ms"]
    data = simulate_json(tmp_path, capsys, *flags, "--goodput", f"ttft:{ttft_ms!r}",
                         f"e2el:{e2el_ms!r}")
    ttft_s = np.array(data["ttfts"])
    e2el_s = ttft_s + np.array([sum(itl) for itl in data["itls"]])
    good = (ttft_s <= ttft_ms / 1e3) & (e2el_s <= e2el_ms / 1e3 + 1e-12)
    assert 0 < good.sum() < 60, "the SLOs must split the requests for the test to bite"
    assert data["request_goodput"] == pytest.approx(good.sum() / data["duration"])


def test_dataset_name_random_equals_the_old_flags(tmp_path, capsys):
    new = simulate_json(tmp_path, capsys, "--dataset-name", "random", "--num-prompts", "10",
                        "--random-input-len", "64", "--random-output-len", "8")
    old = simulate_json(tmp_path, capsys, "--num-prompts", "10", "--input-len", "64",
                        "--output-len", "8")
    assert new["ttfts"] == old["ttfts"] and new["input_lens"] == old["input_lens"] == [64] * 10


def test_config_file_sets_flags_and_the_command_line_wins(tmp_path, capsys):
    cfg = tmp_path / "run.toml"
    cfg.write_text('num-prompts = 12\nrandom_input_len = 40\noutput-len = 4\n'
                   'request-rate = inf\nenable-prefix-caching = true\n'
                   'percentile-metrics = "ttft,e2el"\n')
    data = simulate_json(tmp_path, capsys, "--config", str(cfg), "--num-prompts", "5")
    assert data["num_prompts"] == 5 and data["input_lens"] == [40] * 5
    assert data["output_lens"] == [4] * 5 and data["request_rate"] == "inf"
    assert "p99_e2el_ms" in data


@pytest.mark.parametrize("text, needle", [
    ("num-promptz = 3\n", "'num-promptz'"),
    ("enable-prefix-caching = 1\n", "switch"),
    ("mode = \"fast\"\n", "invalid choice"),
    ("num-prompts = [\n", "not valid TOML"),
])
def test_config_file_refusals(tmp_path, capsys, text, needle):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    try:
        code = main(["simulate", "--mode", "timing", "--config", str(cfg)])
    except SystemExit as exc:  # argparse's own refusal of a bad value (exit 2)
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and needle in err


def test_config_file_missing(capsys, tmp_path):
    code = main(["simulate", "--config", str(tmp_path / "none.toml")])
    assert code == 2 and "cannot read" in capsys.readouterr().err


def test_workloads_are_re_iterable():
    workload = make_workload(20, 5.0, 32, 4, seed=3)
    first, second = list(workload), list(workload)
    assert len(workload) == 20 and first == second and len(first) == 20
    engine = Engine(EngineArgs(mode="timing"))
    runs = [engine.run(workload, keep_requests=False).metrics.summary() for _ in range(2)]
    assert runs[0].num_completed == runs[1].num_completed == 20
    assert math.isclose(runs[0].duration_s, runs[1].duration_s)
