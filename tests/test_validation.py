"""Every input gets a clear answer: SamplingParams, LLM.generate prompts, --result-json paths.

Each bad input is an `InfersimError` (usually `ConfigError`) whose message names the field, the
prompt index or the path, never a raw traceback from deep in the engine or a silently wrong run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import sim.cli.simulate as simulate_cli
from sim import LLM, SamplingParams
from sim.cli.main import main
from sim.core.errors import ConfigError, InfersimError
from sim.core.sampling_params import MAX_N, SAMPLING_EPS
from sim.model.sampling import sample_token, sampling_probs
from sim.workload.specs import RequestSpec

MODEL = "meta-llama/Llama-2-7b-chat-hf"


@pytest.fixture(scope="module")
def functional_llm() -> LLM:
    # a short max_model_len bounds every run (max_tokens=None or huge stops there)
    return LLM(model=MODEL, max_num_seqs=8, max_model_len=48)


@pytest.fixture(scope="module")
def timing_llm() -> LLM:
    return LLM(model=MODEL, mode="timing", max_num_seqs=8, max_model_len=48)


# ----------------------------------------------------------------------------- SamplingParams
@pytest.mark.parametrize(("kwargs", "field"), [
    ({"max_tokens": 2.5}, "max_tokens"),
    ({"max_tokens": 3.0}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"max_tokens": "16"}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"min_tokens": 1.5}, "min_tokens"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"min_tokens": 17, "max_tokens": 16}, "min_tokens"),
    ({"n": True}, "n"),
    ({"n": 2.0}, "n"),
    ({"n": 0}, "n"),
    ({"n": MAX_N + 1}, "n"),
    ({"top_k": 5.0}, "top_k"),
    ({"top_k": -2}, "top_k"),
    ({"seed": 1.5}, "seed"),
    ({"seed": -1}, "seed"),
    ({"seed": False}, "seed"),
    ({"logprobs": 2.0}, "logprobs"),
    ({"logprobs": True}, "logprobs"),
    ({"logprobs": -1}, "logprobs"),
    ({"temperature": "0.7"}, "temperature"),
    ({"temperature": True}, "temperature"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": math.nan}, "temperature"),
    ({"temperature": math.inf}, "temperature"),
    ({"top_p": "1"}, "top_p"),
    ({"top_p": False}, "top_p"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_p": math.nan}, "top_p"),
    ({"top_p": -math.inf}, "top_p"),
    ({"length_penalty": math.nan}, "length_penalty"),
    ({"length_penalty": "1"}, "length_penalty"),
    ({"stop_token_ids": "abc"}, "stop_token_ids"),
    ({"stop_token_ids": 5}, "stop_token_ids"),
    ({"stop_token_ids": [1, -2]}, "stop_token_ids[1]"),
    ({"stop_token_ids": [1.0]}, "stop_token_ids[0]"),
    ({"stop_token_ids": [True]}, "stop_token_ids[0]"),
    ({"ignore_eos": "false"}, "ignore_eos"),
    ({"use_beam_search": 1}, "use_beam_search"),
])
def test_sampling_params_refusals_name_the_field(kwargs, field):
    with pytest.raises(ConfigError) as info:
        SamplingParams(**kwargs)
    message = str(info.value)
    assert f"SamplingParams.{field}" in message
    bad = next(iter(kwargs.values())) if len(kwargs) == 1 else kwargs["min_tokens"]
    if not isinstance(bad, list):
        assert repr(bad) in message or str(bad) in message  # the value it got


def test_sampling_params_normalises_numpy_and_int_values():
    params = SamplingParams(n=np.int64(2), temperature=1, top_k=np.int32(3), seed=np.uint8(7),
                            max_tokens=np.int64(5), stop_token_ids=np.array([4, 5]))
    assert (type(params.n), type(params.top_k), type(params.seed)) == (int, int, int)
    assert type(params.temperature) is float and params.temperature == 1.0
    assert params.stop_token_ids == (4, 5) and all(type(t) is int for t in params.stop_token_ids)
    assert SamplingParams(max_tokens=None, min_tokens=10_000).max_tokens is None


@pytest.mark.parametrize("temperature", [1e-308, 5e-324, 1e-6, SAMPLING_EPS / 2])
def test_tiny_temperature_is_greedy(temperature):
    """vLLM's rule: below 1e-5 is greedy. Dividing the logits by 1e-308 overflowed them to inf,
    and the softmax of inf - inf drew NaN."""
    params = SamplingParams(temperature=temperature)
    assert params.greedy
    logits = np.array([0.5, 3.0, -1.0, 2.9])  # [n_vocab]
    probs = sampling_probs(logits, params)  # [n_vocab]
    assert probs.tolist() == [0.0, 1.0, 0.0, 0.0]
    assert sample_token(logits, params, None) == 1


def test_temperature_at_the_threshold_samples():
    params = SamplingParams(temperature=SAMPLING_EPS)
    assert not params.greedy
    probs = sampling_probs(np.array([0.5, 3.0, -1.0, 3.0 - 1e-6]), params)  # [n_vocab]
    assert np.all(np.isfinite(probs)) and math.isclose(probs.sum(), 1.0)
    assert probs[1] > probs[3] > 0  # the two close logits still share the mass


def test_tiny_temperature_runs_greedy(functional_llm):
    ids_zero = functional_llm.generate("abc", SamplingParams(temperature=0.0, max_tokens=6))
    ids_tiny = functional_llm.generate("abc", SamplingParams(temperature=1e-308, max_tokens=6))
    assert ids_tiny[0].outputs[0].token_ids == ids_zero[0].outputs[0].token_ids


def test_beam_search_accepts_a_greedy_tiny_temperature():
    assert SamplingParams(n=2, use_beam_search=True, temperature=1e-9).greedy
    with pytest.raises(ConfigError, match="temperature=0"):
        SamplingParams(n=2, use_beam_search=True, temperature=0.5)


# ----------------------------------------------------------------------------- prompts
def _refusal(llm: LLM, prompts, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        llm.generate(prompts, **kwargs)
    return str(info.value)


def test_bad_prompt_is_named_by_index_before_anything_runs(functional_llm):
    prompts: list[object] = ["fine"] * 1000
    prompts[17] = 42
    counter = functional_llm._counter
    last = functional_llm.last_result
    message = _refusal(functional_llm, prompts)
    assert message.startswith("prompt 17 of 1000: ") and "int" in message
    assert "prompt_token_ids" in message  # the fix: how to pass token ids
    # nothing ran and no request id was used up
    assert functional_llm.last_result is last and functional_llm._counter == counter


@pytest.mark.parametrize(("prompt", "words"), [
    ("ab\ud800cd", ["character 2", "surrogate"]),
    ({"prompt_token_ids": []}, ["no tokens"]),
    ({"prompt_token_ids": [1, 258]}, ["prompt_token_ids[1]", "258", "vocabulary [0, 258)"]),
    ({"prompt_token_ids": [-1]}, ["prompt_token_ids[0]", "-1"]),
    ({"prompt_token_ids": [1, 2.0]}, ["prompt_token_ids[1]", "float"]),
    ({"prompt_token_ids": [True]}, ["prompt_token_ids[0]", "bool"]),
    ({"prompt_token_ids": "abc"}, ["prompt_token_ids", "list of ints"]),
    ({"prompt_token_ids": 7}, ["prompt_token_ids", "list of ints"]),
    ({"prompt": 7}, ["'prompt' must be a string"]),
    ({"prompt": None}, ["needs 'prompt'"]),
    ({"text": "hi"}, ["unknown key", "'text'"]),
    ({}, ["needs 'prompt'"]),
    (None, ["NoneType"]),
    ([1, 2], ["list"]),
    (b"bytes", ["bytes"]),
])
def test_each_bad_prompt_names_its_index_and_fault(functional_llm, prompt, words):
    message = _refusal(functional_llm, ["ok", "fine", prompt])
    assert message.startswith("prompt 2 of 3: ")
    for word in words:
        assert word in message


def test_vocabulary_is_the_named_models_in_timing_mode(timing_llm):
    vocab = timing_llm.engine.model_config.n_vocab
    assert timing_llm.vocab_size == vocab
    out = timing_llm.generate({"prompt_token_ids": [vocab - 1]}, SamplingParams(max_tokens=2))
    assert out[0].finished and out[0].reject_reason is None  # (timing mode keeps no ids)
    message = _refusal(timing_llm, [{"prompt_token_ids": [vocab]}])
    assert message.startswith("prompt 0 of 1: ") and f"[0, {vocab})" in message


def test_numpy_token_ids_are_accepted(functional_llm):
    ids = np.array([1, 72, 101], dtype=np.int64)  # [num_prompt_tokens]
    out = functional_llm.generate({"prompt_token_ids": ids},
                                  SamplingParams(temperature=0, max_tokens=2))
    assert out[0].prompt_token_ids == [1, 72, 101]
    assert all(type(t) is int for t in out[0].prompt_token_ids)


def test_prompts_must_be_a_sequence(functional_llm):
    message = _refusal(functional_llm, 5)
    assert message.startswith("prompts must be") and "int" in message


def test_sampling_params_and_priority_entries_are_checked(functional_llm):
    message = _refusal(functional_llm, ["a", "b"], sampling_params=[SamplingParams(), {"n": 1}])
    assert message.startswith("prompt 1 of 2: ") and "sampling_params[1]" in message
    message = _refusal(functional_llm, ["a", "b"], sampling_params={"temperature": 0})
    assert "sampling_params must be a SamplingParams" in message
    message = _refusal(functional_llm, ["a", "b"], priority=[0, 1.5])
    assert message.startswith("prompt 1 of 2: ") and "priority" in message and "1.5" in message
    message = _refusal(functional_llm, ["a", "b"], priority=[0, True])
    assert message.startswith("prompt 1 of 2: ") and "bool" in message


def test_request_level_refusal_names_the_prompt(timing_llm):
    """A request-level compatibility rule (beam search needs token values, so no timing-only
    mode) says which prompt broke it."""
    llm = timing_llm
    beam = SamplingParams(n=2, use_beam_search=True, temperature=0.0, max_tokens=4)
    with pytest.raises(InfersimError) as info:
        llm.generate(["a", "b"], [SamplingParams(max_tokens=2), beam])
    assert str(info.value).startswith("prompt 1 of 2: ")


def test_duplicate_request_ids_in_a_workload(functional_llm):
    specs = [RequestSpec("a", 0.0, 4, 2), RequestSpec("b", 0.0, 4, 2), RequestSpec("a", 0.1, 4, 2)]
    with pytest.raises(ConfigError) as info:
        functional_llm.simulate(specs)
    message = str(info.value)
    assert "request 2" in message and "'a'" in message and "own id" in message
    ok = functional_llm.simulate([RequestSpec("a", 0.0, 4, 2), RequestSpec("b", 0.0, 4, 2)])
    assert ok.metrics.summary().num_completed == 2


def test_request_ids_stay_unique_across_calls(functional_llm):
    first = functional_llm.generate(["a", "b"], SamplingParams(temperature=0, max_tokens=1))
    with pytest.raises(ConfigError):
        functional_llm.generate(["c", 3])
    second = functional_llm.generate(["c"], SamplingParams(temperature=0, max_tokens=1))
    ids = [o.request_id for o in first + second]
    assert len(set(ids)) == 3 and int(second[0].request_id) == int(first[1].request_id) + 1


# ----------------------------------------------------------------------------- --result-json
def _simulate(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["simulate", "--mode", "timing", "--num-prompts", "3", "--input-len", "16",
                 "--output-len", "4", "--no-progress", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_result_json_dash_writes_stdout(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = _simulate(capsys, "--result-json", "-")
    assert code == 0
    data = json.loads(out)  # stdout is the JSON alone: the report went to stderr
    assert data["completed"] == 3 and data["mode"] == "timing"
    assert "Serving Benchmark Result" in err
    assert not (tmp_path / "-").exists()


def test_result_json_directory_is_refused_before_the_run(tmp_path, capsys, monkeypatch):
    ran = []
    monkeypatch.setattr(simulate_cli, "Engine", lambda *a: ran.append(a))
    code, out, err = _simulate(capsys, "--result-json", str(tmp_path))
    assert code == 2 and not ran and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "--result-json" in lines[0] and "is a directory" in lines[0]
    assert str(tmp_path) in lines[0]


def test_result_json_under_a_file_is_refused(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = _simulate(capsys, "--result-json", str(blocker / "sub" / "r.json"))
    assert code == 2 and "is a file, not a folder" in err and len(err.strip().splitlines()) == 1


def test_result_json_unwritable_parent_is_refused(tmp_path, capsys, monkeypatch):
    # os.access stands in for a read-only folder: as root, chmod would not stop the write
    target = tmp_path / "ro"
    target.mkdir()
    real_access = simulate_cli.os.access
    monkeypatch.setattr(simulate_cli.os, "access",
                        lambda p, mode: False if Path(p) == target else real_access(p, mode))
    code, _, err = _simulate(capsys, "--result-json", str(target / "new" / "r.json"))
    assert code == 2 and "not writable" in err and str(target) in err
    assert not (target / "new").exists()


def test_result_json_creates_missing_folders(tmp_path, capsys):
    path = tmp_path / "a" / "b" / "r.json"
    code, out, _ = _simulate(capsys, "--result-json", str(path))
    assert code == 0 and json.loads(path.read_text())["completed"] == 3 and str(path) in out


# ----------------------------------------------------------------------------- property
_WEIRD = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 12), st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([1e-308, 5e-324, 1e308]),
    st.text(max_size=3), st.lists(st.integers(-2, 300), max_size=3),
)


def _mostly(valid: st.SearchStrategy[object]) -> st.SearchStrategy[object]:
    """`valid` about four times in five, else a weird value, so that a fair share of the
    examples build SamplingParams and run (the rest probe the refusals)."""
    # (one_of does not weight repeated branches, so the choice is drawn explicitly)
    return st.integers(0, 4).flatmap(lambda pick: valid if pick else _WEIRD)


_FIELDS = {
    "n": _mostly(st.integers(1, 3)),
    "temperature": _mostly(st.one_of(st.floats(0, 3), st.sampled_from([0.0, 1e-308, 1e-5]))),
    "top_p": _mostly(st.floats(0.05, 1)),
    "top_k": _mostly(st.integers(-1, 300)),
    "seed": _mostly(st.integers(0, 2**64)),
    "max_tokens": _mostly(st.one_of(st.none(), st.integers(3, 8))),
    "min_tokens": _mostly(st.integers(0, 3)),
    "stop_token_ids": _mostly(st.lists(st.one_of(st.integers(-1, 300), st.booleans()),
                                       max_size=3)),
    "ignore_eos": _mostly(st.booleans()),
    "logprobs": _mostly(st.one_of(st.none(), st.integers(0, 5))),
    # beam search refuses most sampled settings (it is greedy), so it is drawn rarely
    "use_beam_search": _mostly(st.sampled_from([False, False, False, True])),
    "length_penalty": _mostly(st.floats(0, 2)),
}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kwargs=st.fixed_dictionaries({}, optional=_FIELDS), functional=st.booleans())
def test_any_sampling_params_runs_or_is_refused(functional_llm, timing_llm, kwargs, functional):
    """Random kwargs (mixed types, NaN, inf, negative, huge) either build SamplingParams that run
    one prompt to completion, or raise an InfersimError; never another exception type."""
    llm = functional_llm if functional else timing_llm
    try:
        params = SamplingParams(**kwargs)
    except InfersimError:
        event("refused by SamplingParams")
        return
    try:
        outputs = llm.generate("hi", params)
    except InfersimError:
        event("refused by generate")
        return
    event("ran" if outputs[0].reject_reason is None else "rejected by the engine")
    assert len(outputs) == 1 and outputs[0].finished
    if outputs[0].reject_reason is None and functional:  # timing mode keeps no token ids
        assert len(outputs[0].outputs) >= 1
        for completion in outputs[0].outputs:
            assert len(completion.token_ids) >= 1
            if params.max_tokens is not None:
                assert len(completion.token_ids) <= params.max_tokens
