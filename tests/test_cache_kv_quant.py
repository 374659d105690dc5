"""Quantized KV (`kv_cache_dtype` fp8 / fp8_e5m2 / int8): exact codecs, identical layouts, the
capacity gain in the memory plan, and a measured quality cost ordered as the formats' precision.
"""

from __future__ import annotations

import numpy as np
import pytest

from cache.kv_quality import kv_logits, kv_quality_table
from sim import LLM, SamplingParams
from sim.cli.main import build_parser, engine_args_from
from sim.core.errors import ConfigError
from sim.engine.args import EngineArgs
from sim.engine.engine import Engine
from sim.model.kv_quant import KVCodec, kv_codec
from sim.model.kv_store import ContiguousKVStore
from sim.model.paged_store import PagedKVStore
from sim.model.proxy import load_functional_model
from sim.model.quality import eval_token_ids
from sim.model.quantization.formats import E4M3, E5M2, fake_quant_fp8_rows, fake_quant_int8_rows

RNG = np.random.default_rng(0)
X = RNG.standard_normal((7, 3, 16)) * np.exp(RNG.standard_normal((7, 3, 1)))  # [n, n_kv, d]


@pytest.mark.parametrize("name, oracle", [("fp8_e4m3", lambda x: fake_quant_fp8_rows(x, E4M3)),
                                          ("fp8_e5m2", lambda x: fake_quant_fp8_rows(x, E5M2)),
                                          ("int8", fake_quant_int8_rows)])
def test_codec_is_the_formats_round_trip_per_token_and_head(name, oracle):
    codec = KVCodec(name)
    codes, scales = codec.encode(X)
    assert codes.dtype == codec.code_dtype and codes.shape == X.shape
    assert scales.shape == X.shape[:2] and scales.dtype == np.float32
    back = codec.decode(codes, scales)
    # the oracle computes its scale in float64; ours is rounded to float32 first
    assert np.allclose(back, oracle(X), rtol=1e-6, atol=0)
    assert np.abs(back).max(axis=-1) == pytest.approx(np.abs(X).max(axis=-1), rel=1e-6)
    if name == "int8":
        assert np.all(np.abs(back - X) <= scales[..., None] / 2 * (1 + 1e-6))
    assert np.array_equal(codec.decode(np.zeros_like(codes), np.ones(X.shape[:2])), 0 * X)
    assert kv_codec("auto") is None and kv_codec("fp8") == KVCodec("fp8_e4m3")


def test_paged_store_keeps_codes_and_reads_what_the_contiguous_store_keeps():
    codec = KVCodec("fp8_e4m3")
    paged = PagedKVStore(2, 3, 16, block_size=4, dtype="float64", codec=codec)
    flat = ContiguousKVStore(2, 3, 16, "float64", codec=codec)
    flat.allocate("s", 7)
    paged.prepare("s", [5, 1], 0)
    for layer in range(2):
        paged.write("s", layer, 0, X, 2 * X)
        flat.write("s", layer, 0, X, 2 * X)
    assert paged.pool.dtype == np.uint8 and paged.scales.shape[-1] == 3
    for a, b in zip(paged.read("s", 1, 7), flat.read("s", 1, 7), strict=True):
        assert np.array_equal(a, b)
    out = np.empty((2, 1, 5, 3, 16))
    paged.gather_padded(["s"], 1, [2], [5], out)
    assert np.array_equal(out[0, 0], flat.read("s", 1, 7)[0][2:])
    # swap out / in and copy-on-write keep the scales with the codes
    k_before = paged.read("s", 0, 7)[0].copy()
    paged.apply_ops([("out", 5, 0), ("out", 1, 1), ("in", 0, 2), ("copy", 1, 3),
                     ("in", 1, 1)])
    paged.prepare("s", [2, 1], 7)
    assert np.array_equal(paged.read("s", 0, 7)[0], k_before)


def test_engine_capacity_doubles_and_paged_equals_contiguous():
    auto = Engine(EngineArgs(mode="timing"))
    for dtype in ("fp8", "fp8_e5m2", "int8"):
        engine = Engine(EngineArgs(mode="timing", kv_cache_dtype=dtype))
        assert engine.num_kv_tokens >= 2 * auto.num_kv_tokens - engine.args.block_size
        assert engine.memory.kv_bytes_per_token == auto.memory.kv_bytes_per_token / 2
        assert f"kv_cache_dtype={dtype}" in engine.description
    with pytest.raises(ConfigError, match="kv_cache_dtype"):
        EngineArgs(kv_cache_dtype="int4")
    ns = build_parser().parse_args(["simulate", "--kv-cache-dtype", "fp8_e5m2"])
    assert engine_args_from(ns).kv_cache_dtype == "fp8_e5m2"

    prompts = [{"prompt_token_ids": RNG.integers(1, 200, n).tolist()} for n in (9, 21, 40)]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)

    def tokens(**kwargs):
        llm = LLM(dtype="float64", max_model_len=96, **kwargs)
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]

    for dtype in ("fp8", "int8"):
        assert (tokens(kv_cache_dtype=dtype, block_size=4)
                == tokens(kv_cache_dtype=dtype, kv_cache="contiguous"))
    assert tokens(kv_cache_dtype="int8") == tokens()  # int8 is close enough on this prompt set


def test_quality_cost_follows_the_formats_precision():
    model, tokenizer = load_functional_model("meta-llama/Llama-2-7b-hf", dtype="float64")
    ids = eval_token_ids(tokenizer, 160)
    rows = {r["kv_cache_dtype"]: r for r in kv_quality_table(model, ids)}
    assert rows["auto"]["mean_kl"] == 0 and rows["auto"]["top1_agreement"] == 1
    kl = [rows[d]["mean_kl"] for d in ("int8", "fp8_e4m3", "fp8_e5m2")]
    assert 0 < kl[0] < kl[1] < kl[2] < 0.01
    assert rows["int8"]["top1_agreement"] >= 0.98
    # one prefill == token-by-token decode: the scales do not depend on the chunking
    np.testing.assert_allclose(kv_logits(model, ids[:40], "fp8"),
                               kv_logits(model, ids[:40], "fp8", chunk_size=1), atol=1e-12)
