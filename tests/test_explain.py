"""`infersim explain TOPIC`: every topic runs a live (timing-only) measurement, prints its
numbers, and ends in an answer that quotes them; an unknown topic is refused naming the
choices."""

from __future__ import annotations

import re

import pytest

from sim.cli.explain import EXPLAINERS, TOPICS, Explanation
from sim.cli.main import main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def explanations() -> dict[str, Explanation]:
    return {topic: build(None, "a100-sxm4-80gb") for topic, build in EXPLAINERS.items()}


def test_every_topic_prints_its_measured_numbers_and_an_answer(explanations):
    for topic, ex in explanations.items():
        out = ex.format()
        assert out.startswith("Q: ") and "Your answer:" in out
        _, answer = out.split("Your answer:", 1)
        assert re.search(r"\d", answer), f"{topic}: the answer quotes no number"
        assert ex.numbers, topic
        assert len(ex.steps) >= 2 and all(re.search(r"\d", step) for step in ex.steps), topic


def test_the_command_prints_the_walkthrough(capsys):
    code, out, err = run(capsys, "explain", "speculative")
    assert code == 0 and err == ""
    assert out.startswith("Q: When does speculative decoding pay off")
    assert "batch 1: TPOT" in out and "batch 64: TPOT" in out and "Your answer:" in out


def test_the_answer_quotes_the_numbers_of_the_run(explanations):
    """Not canned text: the answer carries the numbers the measurement produced."""
    kv = explanations["kv-memory"]
    assert f"{kv.numbers['users']:.0f} users" in kv.answer
    assert kv.numbers["tensor_parallel_size"] == 8 and kv.numbers["min_tensor_parallel_size"] == 2
    assert kv.numbers["users_fp8_kv"] == pytest.approx(2 * kv.numbers["users"], abs=2)
    assert f"{kv.numbers['live_preemptions']:.0f} preemptions" in kv.answer
    batching = explanations["batching"]
    assert f"{batching.numbers['continuous_gain_varied']:.2f}x" in batching.answer
    assert 0.9 < batching.numbers["continuous_gain_equal"] < 1.1
    assert batching.numbers["continuous_gain_varied"] > 1.5
    assert batching.numbers["paged_mean_batch"] > batching.numbers["contiguous_mean_batch"]
    spec = explanations["speculative"]
    assert spec.numbers["speedup_batch1_acc0.8"] > 1.5  # pays off at batch 1, high acceptance
    assert spec.numbers["speedup_batch64_acc0.4"] < 1.0  # slows down: busy GPU, low acceptance
    assert f"{spec.numbers['speedup_batch64_acc0.4']:.2f}x" in spec.answer
    q4 = explanations["latency-throughput"]
    assert f"{q4.numbers['knee_goodput']:.1f} req/s" in q4.answer
    assert q4.numbers["knee_goodput"] > q4.numbers["goodput_at_32"]  # past the knee, less
    assert q4.numbers["tok_s_seqs256"] > q4.numbers["tok_s_seqs8"]
    assert q4.numbers["tpot_ms_seqs256"] > q4.numbers["tpot_ms_seqs8"]


def test_answers_follow_the_hardware(explanations):
    other = EXPLAINERS["kv-memory"](None, "mi300x")  # 192 GB: 70B fits one GPU
    assert other.numbers["kv_kib_per_token"] == explanations["kv-memory"].numbers[
        "kv_kib_per_token"]  # the model's arithmetic
    assert other.numbers["min_tensor_parallel_size"] == 1
    assert "do not fit one" not in other.answer  # the A100 answer's claim is not canned
    assert other.numbers["users"] > explanations["kv-memory"].numbers["users"]


def test_unknown_topic_is_refused_naming_the_choices(capsys):
    code, out, err = run(capsys, "explain", "paging")
    assert code == 2 and out == ""
    assert "unknown explain topic 'paging'" in err
    for topic in TOPICS:
        assert topic in err


def test_list_and_help_explain_each_topic(capsys):
    code, out, _ = run(capsys, "explain", "list")
    assert code == 0
    for topic in EXPLAINERS:
        assert topic in out
    with pytest.raises(SystemExit) as info:
        main(["explain", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for topic in TOPICS:
        assert topic in text
    assert "Q1" in text and "Q4" in text
