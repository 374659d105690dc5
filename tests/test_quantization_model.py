"""The quantized functional model: error against the unquantized model, the exactness of
SmoothQuant folding, GPTQ beating round-to-nearest, and the engine oracles with quantization on
(KV-cached == cacheless reference, batch invariance, paged KV, tensor parallelism)."""

from __future__ import annotations

import numpy as np
import pytest

from sim.core.errors import ConfigError
from sim.core.quantization import METHODS, QuantSpec
from sim.core.request import SamplingParams, Status
from sim.engine.args import EngineArgs
from sim.engine.engine import Engine
from sim.model.numpy_model import NumpyModel
from sim.model.proxy import load_functional_model
from sim.model.quantization.apply import (
    ActQuantWeight,
    _copy_layer,
    quantize_model,
    quantize_weight,
    tag_activation_quant,
)
from sim.model.quantization.calibration import calibration_sequences, capture_linear_inputs
from sim.model.quantization.error import quantization_error
from sim.model.quantization.smooth import smooth_layer
from sim.model.reference import generate

MODEL = "meta-llama/Llama-2-7b-hf"


@pytest.fixture(scope="module")
def proxy() -> tuple[NumpyModel, object]:
    return load_functional_model(MODEL, dtype="float64")


@pytest.fixture(scope="module")
def text_ids(proxy) -> np.ndarray:  # type: ignore[no-untyped-def]
    _, tok = proxy
    return np.asarray(tok.encode("The lighthouse keeper climbed the stairs at dusk, 1871."))


@pytest.fixture(scope="module")
def errors(proxy, text_ids) -> dict[str, object]:  # type: ignore[no-untyped-def]
    model, tok = proxy
    return {m: quantization_error(model, QuantSpec(m), text_ids, tokenizer=tok) for m in METHODS}


def test_every_method_is_close_and_int8_beats_int4(errors) -> None:  # type: ignore[no-untyped-def]
    for method, err in errors.items():
        assert err.quality.top1_agreement >= 0.6, method
        assert err.quality.mean_kl < 0.1, method
        assert err.per_layer, method
    assert errors["int8"].rel_logit_error < errors["int4"].rel_logit_error
    assert errors["w8a8"].rel_logit_error < errors["int4"].rel_logit_error
    assert errors["int8"].quality.mean_kl < 1e-3


def test_quantized_weights_hold_only_format_values(proxy) -> None:  # type: ignore[no-untyped-def]
    model, _ = proxy
    w = model.weights.layers[0].w_o
    deq = quantize_weight(w, QuantSpec("int4", 16))
    groups = deq.reshape(w.shape[0], -1, 16)  # [out, n_groups, 16]
    assert max(len(np.unique(g)) for g in groups.reshape(-1, 16)) <= 16  # 4 bits per group
    assert np.abs(deq - w).max() <= 2 * np.abs(w).max() / 15 * 0.5 + 1e-12  # range <= 2 amax


def test_smoothing_alone_changes_nothing(proxy) -> None:  # type: ignore[no-untyped-def]
    model, tok = proxy
    acts = capture_linear_inputs(model, calibration_sequences(model, tok))
    layers = [_copy_layer(layer) for layer in model.weights.layers]
    for i, layer in enumerate(layers):
        smooth_layer(layer, acts, i, model.config, 0.5)
    assert not np.allclose(layers[0].w_qkv, model.weights.layers[0].w_qkv)
    w = model.weights
    smoothed = NumpyModel(model.config, type(w)(w.embed, layers, w.final_norm, w.lm_head),
                          "float64")
    ids = np.arange(1, 40)
    np.testing.assert_allclose(smoothed.forward(ids), model.forward(ids), rtol=1e-9, atol=1e-9)


def test_gptq_has_lower_layer_error_than_rtn(proxy) -> None:  # type: ignore[no-untyped-def]
    model, tok = proxy
    acts = capture_linear_inputs(model, calibration_sequences(model, tok))
    w = model.weights.layers[1].mlp.w_down
    x = acts[(1, "down")]
    y = x @ w.T
    rtn = quantize_weight(w, QuantSpec("int4", 32))
    gptq = quantize_weight(w, QuantSpec("gptq", 32), x)
    assert np.linalg.norm(x @ gptq.T - y) < 0.8 * np.linalg.norm(x @ rtn.T - y)


def test_activation_quantization_is_applied(proxy) -> None:  # type: ignore[no-untyped-def]
    model, _ = proxy
    q = quantize_model(model, QuantSpec("fp8"))
    w = q.weights.layers[0].w_qkv
    assert isinstance(w, ActQuantWeight) and w.act_format == "fp8_e4m3"
    x = np.random.default_rng(0).standard_normal((3, w.shape[1]))
    plain = x @ np.asarray(w).view(np.ndarray).T
    assert type(x @ w.T) is np.ndarray
    assert not np.array_equal(x @ w.T, plain)
    assert isinstance(quantize_model(model, QuantSpec("int4")).weights.layers[0].w_qkv.view(
        np.ndarray), np.ndarray)
    assert not isinstance(quantize_model(model, QuantSpec("int4")).weights.layers[0].w_qkv,
                          ActQuantWeight)


def test_quantized_model_is_deterministic(proxy) -> None:  # type: ignore[no-untyped-def]
    model, tok = proxy
    a = quantize_model(model, QuantSpec("gptq"), tokenizer=tok)
    b = quantize_model(model, QuantSpec("gptq"), tokenizer=tok)
    assert np.array_equal(a.weights.layers[1].w_qkv, b.weights.layers[1].w_qkv)


def _run(eng: Engine, token_lists: list[list[int]], max_tokens: int = 10) -> dict[str, list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    reqs = [eng.make_request(f"r{i}", i, len(ids), params, 0.01 * i, list(ids))
            for i, ids in enumerate(token_lists)]
    result = eng.run(reqs)
    assert all(r.status is Status.FINISHED for r in result.requests)
    return {r.request_id: r.output_token_ids for r in result.requests}


def _prompts(num: int) -> list[list[int]]:
    rng = np.random.default_rng(3)
    return [rng.integers(0, 256, size=int(rng.integers(3, 30))).tolist() for _ in range(num)]


@pytest.mark.parametrize("method,kv_cache", [("w8a8", "contiguous"), ("int4", "paged"),
                                             ("fp8", "paged"), ("gptq", "contiguous")])
def test_engine_equals_cacheless_reference_of_quantized_model(method: str, kv_cache: str) -> None:
    eng = Engine(EngineArgs(model=MODEL, dtype="float64", quantization=method, kv_cache=kv_cache,
                            max_num_seqs=3, hardware="h100-sxm"))
    prompts = _prompts(5)
    got = _run(eng, prompts)
    for i, ids in enumerate(prompts):
        assert got[f"r{i}"] == generate(eng.functional_model, ids, 10), f"r{i}"
    assert "quantization=" in eng.description


def test_batch_invariance_with_activation_quantization() -> None:
    prompts = _prompts(6)
    args = {"model": MODEL, "dtype": "float64", "quantization": "w8a8"}
    batched = _run(Engine(EngineArgs(**args, max_num_seqs=6)), prompts)
    alone = _run(Engine(EngineArgs(**args, max_num_seqs=1)), prompts)
    assert batched == alone


def test_a100_fp8_falls_back_to_weight_only() -> None:
    eng = Engine(EngineArgs(model=MODEL, quantization="fp8", hardware="a100-sxm4-80gb"))
    assert eng.quantization is not None and eng.quantization.weight_only
    assert "no fp8 tensor cores" in eng.description
    assert not isinstance(eng.functional_model.weights.layers[0].w_qkv, ActQuantWeight)


def test_engine_args_validate_quantization() -> None:
    with pytest.raises(ConfigError, match="not one of"):
        EngineArgs(quantization="int3")
    with pytest.raises(ConfigError, match="group_size"):
        EngineArgs(quantization="int4", quantization_group_size=0)


def test_tensor_parallel_combination() -> None:
    pytest.importorskip("parallel.tensor")
    prompts = _prompts(3)
    for method in ("int8", "w8a8"):
        args = {"model": MODEL, "dtype": "float64", "quantization": method}
        tp1 = Engine(EngineArgs(**args))
        tp2 = Engine(EngineArgs(**args, tensor_parallel_size=2))
        if method == "int8":  # weight-only: the sharded model computes the same numbers
            assert _run(tp1, prompts) == _run(tp2, prompts)
        else:  # a row-parallel rank quantizes its own slice of each token: close, not equal
            shard = tp2.functional_model.shards[0][0]
            assert isinstance(shard.w_o, ActQuantWeight)
            out = _run(tp2, prompts)
            assert all(len(v) == 10 for v in out.values())
        assert tp2.memory.weight_bytes < tp1.memory.weight_bytes


def test_tag_activation_quant_marks_every_projection(proxy) -> None:  # type: ignore[no-untyped-def]
    model, _ = proxy
    q = quantize_model(model, QuantSpec("int8"))
    tag_activation_quant(q, "int8")
    layer = q.weights.layers[0]
    assert all(isinstance(w, ActQuantWeight) for w in (layer.w_qkv, layer.w_o,
                                                       layer.mlp.w_gate_up, layer.mlp.w_down))
