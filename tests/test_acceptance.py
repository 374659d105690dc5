"""Acceptance traces: n-gram lookup and self-speculation measured greedily, saved and replayed.

Oracles: a draft that is the whole target (self-speculation with every layer) is always
accepted; a proposer that knows the target's continuation is always accepted, one that never
matches never is; the KV-cached self-speculation draft equals a cacheless truncated forward.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.core.errors import ConfigError
from sim.model.numpy_model import NumpyModel
from sim.model.proxy import tiny_proxy_config
from sim.model.reference import generate
from sim.model.zoo import resolve_model
from speculative.acceptance import (
    AcceptanceReplay,
    AcceptanceTrace,
    RequestAcceptance,
    SelfSpecDraft,
    greedy_continuation,
    measure_acceptance,
    measure_ngram,
    measure_self_speculation,
    ngram_propose,
    truncated_model,
)


@pytest.fixture(scope="module")
def tiny():
    config = tiny_proxy_config(resolve_model("meta-llama/Llama-2-7b-hf"), n_layer=3)
    return NumpyModel.random(config, seed=5, dtype="float64")


def prompts(n: int = 2, length: int = 10) -> list[list[int]]:
    rng = np.random.default_rng(4)
    return [rng.integers(0, 256, length).tolist() for _ in range(n)]


def test_ngram_propose_finds_the_latest_longest_match():
    ctx = [1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3]
    assert ngram_propose(ctx, 2, 1, 3) == [7, 8]  # latest earlier "1 2 3" is followed by 7 8
    assert ngram_propose([5, 6, 7], 3) == []  # nothing repeats
    assert ngram_propose([4, 4], 5, 1, 1) == [4]  # only what exists is proposed


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=2, max_size=30), st.integers(1, 5))
def test_ngram_proposals_continue_an_earlier_occurrence(ctx, k):
    draft = ngram_propose(ctx, k, 1, 3)
    assert len(draft) <= k
    if draft:
        found = any(ctx[i: i + len(draft)] == draft and ctx[i - 1] == ctx[-1]
                    for i in range(1, len(ctx) - len(draft) + 1))
        assert found


def test_greedy_continuation_matches_the_cacheless_reference(tiny):
    p = prompts(1)[0]
    assert greedy_continuation(tiny, p, 8) == generate(tiny, p, 8)


def test_oracle_and_hopeless_proposers(tiny):
    ps = prompts()
    targets = {tuple(p): greedy_continuation(tiny, p, 9) for p in ps}

    def oracle(context, k):
        for p, t in targets.items():
            if tuple(context[: len(p)]) == p:
                done = len(context) - len(p)
                return t[done: done + k]
        raise AssertionError("unknown prompt")

    trace = measure_acceptance(tiny, ps, oracle, k=3, max_new_tokens=9, method="oracle")
    assert trace.acceptance_rate == 1.0
    assert all(r.num_output_tokens == 9 for r in trace.requests)
    np.testing.assert_array_equal(trace.per_position_acceptance(), [1.0, 1.0, 1.0])
    never = measure_acceptance(tiny, ps, lambda c, k: [-1] * k, k=3, max_new_tokens=9)
    assert never.acceptance_rate == 0.0 and never.mean_tokens_per_step == 1.0


def test_self_speculation_with_every_layer_is_always_accepted(tiny):
    trace = measure_self_speculation(tiny, prompts(), tiny.config.n_layer, k=3, max_new_tokens=8)
    assert trace.acceptance_rate == 1.0 and trace.method == "self_speculation"
    partial = measure_self_speculation(tiny, prompts(), 1, k=3, max_new_tokens=8)
    assert 0.0 <= partial.acceptance_rate <= 1.0
    assert sum(r.num_output_tokens for r in partial.requests) == 16


def test_self_spec_draft_with_kv_reuse_equals_a_cacheless_draft(tiny):
    draft = SelfSpecDraft(tiny, 2)
    reference = truncated_model(tiny, 2)
    ctx = prompts(1)[0]
    for extra in ([], [3], [3, 200, 17], [9]):  # contexts that share and then leave a prefix
        context = ctx + extra
        assert draft.propose(context, 3) == generate(reference, context, 3)


def test_trace_round_trips_and_replays(tmp_path):
    trace = AcceptanceTrace("ngram", 3, "m", (RequestAcceptance(10, (0, 3, 1), (2, 3, 3)),
                                               RequestAcceptance(5, (2,), (3,))), {"min_n": 1})
    path = trace.save(tmp_path / "t.json")
    assert AcceptanceTrace.load(path) == trace
    np.testing.assert_allclose(trace.per_position_acceptance(), [3 / 4, 2 / 4, 1 / 3])
    assert trace.summary()["per_request_acceptance"] == [4 / 8, 2 / 3]
    replay = AcceptanceReplay(trace)
    assert [replay.next_accepted(0) for _ in range(4)] == [0, 3, 1, 0]
    assert replay.next_accepted(1, num_proposed=1) == 1
    assert replay.next_accepted(2) == 0  # request 2 replays recorded request 0


def test_ngram_measurement_and_errors(tiny, tmp_path):
    trace = measure_ngram(tiny, prompts(), k=2, max_new_tokens=6)
    assert trace.params == {"max_new_tokens": 6, "min_n": 1, "max_n": 3}
    assert sum(r.num_output_tokens for r in trace.requests) == 12
    with pytest.raises(ConfigError, match="not an acceptance trace"):
        AcceptanceTrace.from_dict({"format": "x"})
    with pytest.raises(ConfigError, match="accepted <="):
        RequestAcceptance(1, (3,), (2,))
    with pytest.raises(ConfigError, match="num_layers"):
        truncated_model(tiny, 0)
