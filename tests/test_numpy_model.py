"""NumpyModel: forward_step (KV store, chunks, many sequences) equals the cacheless forward."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.core.errors import ConfigError, InfersimError
from sim.core.model_config import ModelConfig
from sim.model.kv_store import ContiguousKVStore
from sim.model.numpy_model import NumpyModel, SeqChunk
from sim.model.reference import generate

BASE: dict[str, Any] = dict(name="t", n_layer=2, n_embd=32, n_head=4, n_kv_head=2, d_head=8, n_inner=48,
            n_vocab=50, max_position_embeddings=512)
CONFIGS = {
    "llama": ModelConfig(model_type="llama", **BASE),
    "mistral": ModelConfig(model_type="mistral", sliding_window=4, **BASE),
    "qwen2_tied": ModelConfig(model_type="qwen2", qkv_bias=True, tie_word_embeddings=True,
                              **{**BASE, "n_kv_head": 1}),
    "mixtral": ModelConfig(model_type="mixtral", n_expert=4, n_expert_per_tok=2, moe_n_inner=16,
                           **BASE),
    "qwen2_moe": ModelConfig(model_type="qwen2_moe", n_expert=4, n_expert_per_tok=2,
                             moe_n_inner=16, shared_expert_n_inner=24, norm_topk_prob=False,
                             qkv_bias=True, mlp_only_layers=(1,), **BASE),
}
MODELS = {name: NumpyModel.random(c, seed=3, dtype="float64") for name, c in CONFIGS.items()}


def _store(model: NumpyModel) -> ContiguousKVStore:
    c = model.config
    return ContiguousKVStore(c.n_layer, c.n_kv_head, c.d_head, model.dtype)


@st.composite
def _schedules(draw: st.DrawFn) -> tuple[list[np.ndarray], list[list[tuple[int, int, int]]]]:
    """Sequences, and steps of (sequence, n_new, num_logits) covering every token once."""
    n_seq = draw(st.integers(1, 3))
    seqs = [np.array(draw(st.lists(st.integers(0, 49), min_size=1, max_size=14)))
            for _ in range(n_seq)]
    done = [0] * n_seq
    steps = []
    while any(d < len(s) for d, s in zip(done, seqs, strict=True)):
        pending = [i for i in range(n_seq) if done[i] < len(seqs[i])]
        chosen = draw(st.permutations(pending))[: draw(st.integers(1, len(pending)))]
        step = []
        for i in chosen:
            n_new = draw(st.integers(1, len(seqs[i]) - done[i]))
            step.append((i, n_new, draw(st.integers(0, n_new))))
            done[i] += n_new
        steps.append(step)
    return seqs, steps


@pytest.mark.parametrize("family", sorted(CONFIGS))
@given(schedule=_schedules())
@settings(max_examples=12, deadline=None)
def test_forward_step_equals_forward(family: str, schedule: tuple) -> None:
    model, (seqs, steps) = MODELS[family], schedule
    kv, done = _store(model), [0] * len(seqs)
    for i, s in enumerate(seqs):
        kv.allocate(i, len(s))
    for step in steps:
        chunks = [SeqChunk(i, seqs[i][done[i]: done[i] + n], done[i], k) for i, n, k in step]
        got = model.forward_step(chunks, kv)
        assert got.shape == (sum(k for _, _, k in step), model.config.n_vocab)
        row = 0
        for i, n, k in step:
            want = model.forward(seqs[i][: done[i] + n])[done[i] + n - k: done[i] + n]
            np.testing.assert_allclose(got[row: row + k], want, rtol=0, atol=1e-12)
            row += k
            done[i] += n


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_batched_greedy_decode_equals_reference(family: str) -> None:
    """Several sequences prefilled then decoded together give the reference's tokens."""
    model = MODELS[family]
    rng = np.random.default_rng(7)
    prompts = [rng.integers(0, 50, n) for n in (3, 9, 6, 1)]
    kv, n_new = _store(model), 10
    for i, p in enumerate(prompts):
        kv.allocate(i, len(p) + n_new)
    logits = model.forward_step([SeqChunk(i, p, 0) for i, p in enumerate(prompts)], kv)
    outs: list[list[int]] = [[int(t)] for t in logits.argmax(-1)]
    for _ in range(n_new - 1):
        order = list(rng.permutation(len(prompts)))  # any order within a step
        chunks = [SeqChunk(i, np.array(outs[i][-1:]), len(prompts[i]) + len(outs[i]) - 1)
                  for i in order]
        for i, t in zip(order, model.forward_step(chunks, kv).argmax(-1), strict=True):
            outs[i].append(int(t))
    for i, p in enumerate(prompts):
        assert outs[i] == generate(model, p, n_new)


def test_decode_batch_with_long_window_history() -> None:
    """Batched decode with a sliding window over sequences of different lengths."""
    model = MODELS["mistral"]
    rng = np.random.default_rng(2)
    seqs = [rng.integers(0, 50, n) for n in (2, 11, 25)]
    kv = _store(model)
    for i, s in enumerate(seqs):
        kv.allocate(i, len(s))
        model.forward_step([SeqChunk(i, s[:-1], 0, 0)], kv)
    got = model.forward_step([SeqChunk(i, s[-1:], len(s) - 1) for i, s in enumerate(seqs)], kv)
    for i, s in enumerate(seqs):
        np.testing.assert_allclose(got[i], model.forward(s)[-1], atol=1e-12)


def test_float32_model_computes_in_float32_and_tracks_float64() -> None:
    config = CONFIGS["qwen2_moe"]
    m32 = NumpyModel.random(config, seed=3, dtype="float32")
    ids = np.arange(20) % 50
    out32 = m32.forward(ids)
    assert out32.dtype == np.float32 and m32.weights.lm_head.dtype == np.float32
    np.testing.assert_allclose(out32, MODELS["qwen2_moe"].forward(ids), atol=1e-4)


def test_random_is_seeded() -> None:
    config, ids = CONFIGS["llama"], np.arange(10)
    a = NumpyModel.random(config, seed=1).forward(ids)
    np.testing.assert_array_equal(a, NumpyModel.random(config, seed=1).forward(ids))
    assert not np.allclose(a, NumpyModel.random(config, seed=2).forward(ids))
    probs = np.exp(a - a.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    assert probs.max() > 5 / config.n_vocab  # not flat


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_state_dict_round_trip(family: str) -> None:
    model = MODELS[family]
    state = model.state_dict()
    assert ("lm_head.weight" in state) != model.config.tie_word_embeddings
    again = NumpyModel.from_state_dict(model.config, state, "float64")
    np.testing.assert_array_equal(again.forward(np.arange(7)), model.forward(np.arange(7)))


def test_tied_embeddings_share_one_array() -> None:
    weights = MODELS["qwen2_tied"].weights
    assert weights.lm_head is weights.embed


def test_forward_step_empty_and_bad_input() -> None:
    model = MODELS["llama"]
    kv = _store(model)
    assert model.forward_step([], kv).shape == (0, 50)
    kv.allocate("a", 4)
    with pytest.raises(ConfigError, match="num_logits"):
        model.forward_step([SeqChunk("a", np.array([1, 2]), 0, 3)], kv)
    with pytest.raises(ConfigError, match="token ids"):
        model.forward_step([SeqChunk("a", np.array([1, 50]), 0)], kv)
    with pytest.raises(ConfigError, match="non-empty"):
        model.forward_step([SeqChunk("a", np.array([], dtype=int), 0)], kv)
    with pytest.raises(InfersimError, match="gap"):  # nothing cached at positions 0..1
        model.forward_step([SeqChunk("a", np.array([1]), 2)], kv)
    with pytest.raises(InfersimError, match="not allocated"):
        model.forward_step([SeqChunk("b", np.array([1]), 0)], kv)
    with pytest.raises(ConfigError, match="two chunks"):
        model.forward_step([SeqChunk("a", np.array([1]), 0), SeqChunk("a", np.array([2]), 1)], kv)
    with pytest.raises(ConfigError, match="token_ids"):
        model.forward([])


def test_bad_dtype_and_non_llama_model() -> None:
    with pytest.raises(ConfigError, match="float32 or float64"):
        NumpyModel.random(CONFIGS["llama"], dtype="float16")
    opt = ModelConfig(model_type="opt", **BASE)
    with pytest.raises(ConfigError, match="Llama"):
        NumpyModel.random(opt)


def test_reference_generate_stops_at_eos() -> None:
    model = MODELS["llama"]
    free = generate(model, [1, 2, 3], 8)
    assert len(free) == 8
    stop = free[3]
    out = generate(model, [1, 2, 3], 8, eos_token_ids=[stop])
    assert out == free[: free.index(stop) + 1]
    assert generate(model, [1, 2, 3], 0) == []
    with pytest.raises(ConfigError):
        generate(model, [], 3)
