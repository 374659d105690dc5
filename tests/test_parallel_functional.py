"""Sharding equivalence: TP, PP and EP forwards equal the unsharded forward (float64)."""

from __future__ import annotations

import numpy as np
import pytest

from parallel.plan import ParallelPlan
from parallel.sharded_kv import RankedKVStore
from parallel.tensor import ShardedModel, all_reduce
from sim.model.numpy_model import NumpyModel, SeqChunk
from sim.model.proxy import tiny_proxy_config
from sim.model.zoo import resolve_model

PLANS = [ParallelPlan(tp=2), ParallelPlan(tp=4), ParallelPlan(tp=8), ParallelPlan(pp=3),
         ParallelPlan(tp=2, pp=2)]
MOE_PLANS = [ParallelPlan(tp=2, ep=2), ParallelPlan(tp=4, ep=4), ParallelPlan(tp=2, pp=2, ep=2)]
MODELS = ["meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-70b-hf", "mistralai/Mixtral-8x7B-v0.1",
          "Qwen/Qwen1.5-MoE-A2.7B"]


def _model(name: str) -> NumpyModel:
    return NumpyModel.random(tiny_proxy_config(resolve_model(name), n_layer=3), seed=1,
                             dtype="float64")


def _cases():
    for name in MODELS:
        moe = resolve_model(name).is_moe
        for plan in PLANS + (MOE_PLANS if moe else []):
            yield pytest.param(name, plan, id=f"{name.split('/')[1]}-{plan.describe()[:15]}")


@pytest.mark.parametrize("name, plan", list(_cases()))
def test_sharded_forward_and_steps_equal_unsharded(name, plan):
    model = _model(name)
    sharded = ShardedModel(model, plan)
    ids = np.arange(3, 23) % model.config.n_vocab  # [20]
    ref = model.forward(ids)  # [20, n_vocab]
    np.testing.assert_allclose(sharded.forward(ids), ref, rtol=0, atol=1e-12)
    kv = RankedKVStore(sharded, sharded.dtype)
    kv.allocate("a", 32)
    kv.allocate("b", 32)
    first = sharded.forward_step([SeqChunk("a", ids[:12], 0, 1), SeqChunk("b", ids[:5], 0, 1)],
                                 kv)  # [2, n_vocab]
    step = sharded.forward_step([SeqChunk("a", ids[12:13], 12, 1),
                                 SeqChunk("b", ids[5:9], 5, 2)], kv)  # [3, n_vocab]
    np.testing.assert_allclose(first[0], ref[11], atol=1e-12)
    np.testing.assert_allclose(step[0], ref[12], atol=1e-12)
    np.testing.assert_allclose(step[1:], model.forward(ids[:9])[7:9], atol=1e-12)
    if plan.pp > 1:
        assert sharded.link.num_sends > 0 and sharded.link.num_bytes > 0


def test_each_gpu_holds_only_its_shard():
    model = _model("meta-llama/Llama-2-70b-hf")  # 8 query heads, 1 KV head
    sharded = ShardedModel(model, ParallelPlan(tp=4, pp=3))
    c = model.config
    assert [len(q) for q in sharded.q_split] == [2, 2, 2, 2]
    assert sharded.kv_split == [[0], [0], [0], [0]]  # the KV head replicated on every rank
    shard = sharded.shards[0][1]
    assert shard.w_qkv.shape == (4 * c.d_head, c.n_embd)
    assert shard.w_o.shape == (c.n_embd, 2 * c.d_head)
    kv = RankedKVStore(sharded, sharded.dtype)
    assert len(kv.stores) == 12 and all(s.n_layer == 1 for s in kv.stores.values())


def test_all_reduce_sums_in_a_fixed_order():
    rng = np.random.default_rng(0)
    parts = [rng.standard_normal((3, 4)) for _ in range(4)]  # [3, 4] each
    np.testing.assert_array_equal(all_reduce(parts), ((parts[0] + parts[1]) + parts[2]) + parts[3])


def test_expert_parallel_counts_load_and_capacity_drops_tokens():
    model = _model("mistralai/Mixtral-8x7B-v0.1")
    ids = np.arange(40) % model.config.n_vocab
    ep = ShardedModel(model, ParallelPlan(tp=2, ep=2))
    ep.forward(ids)
    load = ep.expert_load
    assert load is not None
    k = model.config.n_expert_per_tok
    assert load.num_routed == 3 * 40 * k and load.num_dropped == 0
    assert load.rank_loads().sum() == load.num_routed and load.imbalance() >= 1.0
    capped = ShardedModel(model, ParallelPlan(tp=2, ep=2), capacity_factor=0.5)
    out = capped.forward(ids)
    assert capped.expert_load is not None and capped.expert_load.num_dropped > 0
    assert not np.allclose(out, model.forward(ids))  # dropped tokens change the answer
