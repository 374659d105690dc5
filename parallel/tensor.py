"""Tensor parallelism, functionally: a NumPy model whose weights live in per-rank shards.

`ShardedModel(model, plan)` cuts a `NumpyModel` the Megatron-LM way for `plan.tp` ranks per
pipeline stage, and runs the same `forward` / `forward_step` as the unsharded model:

- QKV and MLP gate/up are column-parallel (rank r holds its query heads' rows, the rows of the
  KV heads those query heads read, and its slice of the MLP width); attention runs on the rank's
  own heads over its own KV store (`parallel.sharded_kv.RankedKVStore`: one store per GPU, holding its stage's
  layers and its KV heads, replicated when tp > n_kv_head, as vLLM does);
- O and MLP down are row-parallel: each rank's partial product `[n_tok, n_embd]` is summed by a
  real all-reduce (`all_reduce`: rank 0 + rank 1 + ... in that fixed order), then the bias;
- the embedding and LM head are vocab-parallel: each rank holds a slice of the vocabulary rows;
  embeddings are summed by an all-reduce (other ranks contribute zeros), logits all-gathered;
- norms and the MoE router are replicated (identical on every rank, computed once here);
- MoE layers shard every expert's width (ep = 1) or place experts whole (`parallel.expert`);
- layers run on their pipeline stage's ranks; hidden states cross stages via `StageLink`.

The scale model may have fewer heads than ranks (a tiny proxy of a 64-head model at tp = 8);
its heads, width and vocabulary are then split as evenly as possible and a rank may hold none,
which keeps the arithmetic exact. In float64 the sharded forward equals the unsharded one to
rounding (~1e-13), and greedy tokens are identical.

References: Shoeybi et al. 2019 (Megatron-LM); vLLM `vllm/model_executor/layers/linear.py`
(ColumnParallelLinear, QKVParallelLinear KV-head replication, RowParallelLinear) and
`vocab_parallel_embedding.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from parallel.expert import ExpertLoad, expert_groups, moe_rank_outputs
from parallel.pipeline import StageLink, stage_of_layer
from parallel.plan import ParallelPlan, stage_layers
from sim.core.errors import ConfigError
from sim.model import layers as L
from sim.model.numpy_model import NumpyModel, SeqChunk
from sim.model.weights import DenseMLPWeights, LayerWeights, MoEWeights


def all_reduce(parts: Sequence[np.ndarray]) -> np.ndarray:
    """Sum of the ranks' arrays in rank order (fixed, so every run is bit-identical)."""
    out = parts[0].copy()  # same shape as each part
    for part in parts[1:]:
        out += part
    return out


def split_range(n: int, num: int) -> list[range]:
    """`range(n)` cut into `num` contiguous pieces as evenly as possible (some may be empty)."""
    bounds = [n * r // num for r in range(num + 1)]
    return [range(bounds[r], bounds[r + 1]) for r in range(num)]


@dataclass
class RankLayer:
    """One rank's shard of one layer (PyTorch `[out, in]` layout)."""

    q_heads: range
    kv_heads: list[int]  # global KV-head ids held (replicated when tp > n_kv_head)
    w_qkv: np.ndarray  # [(n_q + 2 n_kv) d_head, n_embd]
    b_qkv: np.ndarray | None  # [(n_q + 2 n_kv) d_head]
    w_o: np.ndarray  # [n_embd, n_q d_head]
    mlp: DenseMLPWeights | None  # dense MLP or shared-expert shard (None: no dense part)
    experts: MoEWeights | None  # ep = 1: every expert's width slice


def _take(w: np.ndarray, rows: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w[rows])  # [len(rows), ...]


def _dense_shard(mlp: DenseMLPWeights, cols: range) -> DenseMLPWeights:
    n_inner = mlp.w_down.shape[1]
    rows = np.r_[np.arange(cols.start, cols.stop), n_inner + np.arange(cols.start, cols.stop)]
    return DenseMLPWeights(
        w_gate_up=_take(mlp.w_gate_up, rows),  # [2 i_r, n_embd]
        w_down=np.ascontiguousarray(mlp.w_down[:, cols.start:cols.stop]),  # [n_embd, i_r]
        b_gate_up=None if mlp.b_gate_up is None else mlp.b_gate_up[rows],  # [2 i_r]
    )


class ShardedModel(NumpyModel):
    """`model` split by `plan` (tp ranks per stage, pp stages, ep = 1 or tp); see module doc."""

    def __init__(self, model: NumpyModel, plan: ParallelPlan,
                 capacity_factor: float | None = None) -> None:
        super().__init__(model.config, model.weights, model.dtype.name, model.layer_windows)
        c = model.config
        if capacity_factor is not None and not capacity_factor > 0:
            raise ConfigError(f"capacity_factor must be > 0 (or None), got {capacity_factor}")
        if plan.ep > 1 and not c.is_moe:
            raise ConfigError(f"expert parallelism needs an MoE functional model; {c.name} is "
                              "dense")
        self.plan, self.capacity_factor = plan, capacity_factor
        self.tp = plan.tp
        self.stage_of = stage_of_layer(c.n_layer, plan.pp)
        self.stage_ranges = stage_layers(c.n_layer, plan.pp)
        self.link = StageLink()
        self.expert_load = ExpertLoad(c.n_layer, c.n_expert, plan.ep) if c.is_moe else None
        self.expert_groups = expert_groups(c.n_expert, plan.ep) if plan.ep > 1 else []
        q_split = split_range(c.n_head, self.tp)
        self.q_split = q_split
        self.kv_split = [self._kv_heads(q) for q in q_split]
        self.vocab_split = split_range(c.n_vocab, self.tp)
        w = model.weights
        self.embed_shards = [np.ascontiguousarray(w.embed[r.start:r.stop])  # [v_r, n_embd]
                             for r in self.vocab_split]
        self.head_shards = [np.ascontiguousarray(w.lm_head[r.start:r.stop])  # [v_r, n_embd]
                            for r in self.vocab_split]
        self.shards = [[self._shard(layer, r) for r in range(self.tp)] for layer in w.layers]
        self._active_kv: Any = None

    # ------------------------------------------------------------------ sharding
    def _kv_heads(self, q_heads: range) -> list[int]:
        c = self.config
        group = c.n_head // c.n_kv_head
        kv = sorted({h // group for h in q_heads})
        if q_heads and len(q_heads) % len(kv):
            raise ConfigError(f"cannot shard {c.name}: tp={self.tp} splits the query heads of a "
                              "KV group unevenly; choose tp dividing n_head")
        local_group = len(q_heads) // len(kv) if q_heads else 1
        if any(kv[i // local_group] != h // group for i, h in enumerate(q_heads)):
            raise ConfigError(f"cannot shard {c.name}: tp={self.tp} mixes KV groups on a rank")
        return kv

    def _shard(self, layer: LayerWeights, r: int) -> RankLayer:
        c, d = self.config, self.config.d_head
        q_heads, kv = self.q_split[r], self.kv_split[r]
        q_dim, kv_dim = c.n_head * d, c.n_kv_head * d
        heads = lambda ids, off: [off + h * d + np.arange(d) for h in ids]  # noqa: E731
        rows = np.concatenate([*heads(q_heads, 0), *heads(kv, q_dim), *heads(kv, q_dim + kv_dim),
                               np.zeros(0, dtype=int)]).astype(int)  # [(n_q + 2 n_kv) d]
        q_cols = np.concatenate([np.arange(h * d, (h + 1) * d) for h in q_heads] +
                                [np.zeros(0, dtype=int)]).astype(int)  # [n_q d]
        mlp: DenseMLPWeights | None = None
        experts: MoEWeights | None = None
        if isinstance(layer.mlp, MoEWeights):
            moe = layer.mlp
            if moe.shared is not None:
                cols = split_range(moe.shared.w_down.shape[1], self.tp)[r]
                mlp = _dense_shard(moe.shared, cols)
            if self.plan.ep == 1:
                inner = moe.w_down.shape[2]
                cols = split_range(inner, self.tp)[r]
                up_rows = np.r_[np.arange(cols.start, cols.stop),
                                inner + np.arange(cols.start, cols.stop)]  # [2 i_r]
                experts = MoEWeights(
                    w_router=moe.w_router,
                    w_gate_up=np.ascontiguousarray(moe.w_gate_up[:, up_rows]),  # [n_e, 2 i_r, E]
                    w_down=np.ascontiguousarray(moe.w_down[:, :, cols.start:cols.stop]),
                )  # w_down: [n_expert, n_embd, i_r]
        else:
            mlp = _dense_shard(layer.mlp, split_range(layer.mlp.w_down.shape[1], self.tp)[r])
        return RankLayer(
            q_heads=q_heads, kv_heads=kv, w_qkv=_take(layer.w_qkv, rows),
            b_qkv=None if layer.b_qkv is None else layer.b_qkv[rows],
            w_o=np.ascontiguousarray(layer.w_o[:, q_cols]), mlp=mlp, experts=experts)

    # ------------------------------------------------------------------ forward passes
    def forward_step(self, chunks: Sequence[SeqChunk], kv: Any) -> np.ndarray:
        self._active_kv = kv
        try:
            return super().forward_step(chunks, kv)
        finally:
            self._active_kv = None

    def _run_layers(self, ids: np.ndarray, positions: np.ndarray, attend: Any) -> np.ndarray:
        c, d = self.config, self.config.d_head
        cos, sin = self._rope(positions)  # [n_tok, d_head] x2
        parts = []
        for rows, table in zip(self.vocab_split, self.embed_shards, strict=True):
            part = np.zeros((ids.shape[0], c.n_embd), dtype=self.dtype)  # [n_tok, n_embd]
            mine = (ids >= rows.start) & (ids < rows.stop)  # [n_tok]
            part[mine] = table[ids[mine] - rows.start]
            parts.append(part)
        x = all_reduce(parts)  # [n_tok, n_embd]
        for i, layer in enumerate(self.weights.layers):
            if i > 0 and self.stage_of[i] != self.stage_of[i - 1]:
                x = self.link.send(x)  # [n_tok, n_embd] to the next stage
            h = L.rms_norm(x, layer.attn_norm, c.rms_norm_eps)  # [n_tok, n_embd]
            parts = []
            for r, sh in enumerate(self.shards[i]):
                n_q, n_kv = len(sh.q_heads), len(sh.kv_heads)
                if n_q == 0:
                    continue
                qkv = L.linear(h, sh.w_qkv, sh.b_qkv)  # [n_tok, (n_q + 2 n_kv) d]
                n_tok = qkv.shape[0]
                q = qkv[:, :n_q * d].reshape(n_tok, n_q, d)  # [n_tok, n_q, d_head]
                k = qkv[:, n_q * d:(n_q + n_kv) * d].reshape(n_tok, n_kv, d)  # [n_tok, n_kv, d]
                v = qkv[:, (n_q + n_kv) * d:].reshape(n_tok, n_kv, d)  # [n_tok, n_kv, d_head]
                q = L.apply_rope(q, cos, sin)  # [n_tok, n_q, d_head]
                k = L.apply_rope(k, cos, sin)  # [n_tok, n_kv, d_head]
                if self._active_kv is not None:
                    self._active_kv.select(self.stage_of[i], r)
                attn = attend(i, q, k, v)  # [n_tok, n_q d_head]
                parts.append(L.linear(attn, sh.w_o))  # [n_tok, n_embd] partial sum
            out = all_reduce(parts)  # [n_tok, n_embd]
            if layer.b_o is not None:
                out += layer.b_o
            x = x + out  # [n_tok, n_embd]
            h = L.rms_norm(x, layer.mlp_norm, c.rms_norm_eps)  # [n_tok, n_embd]
            x = x + self._mlp_parallel(i, layer, h)  # [n_tok, n_embd]
        return x

    def _mlp_parallel(self, i: int, layer: LayerWeights, h: np.ndarray) -> np.ndarray:
        c = self.config
        parts: list[np.ndarray] = []
        moe = layer.mlp if isinstance(layer.mlp, MoEWeights) else None
        if moe is not None:
            if self.plan.ep > 1:
                parts += moe_rank_outputs(h, moe, c.n_expert_per_tok, c.norm_topk_prob,
                                          self.expert_groups, i, self.expert_load,
                                          self.capacity_factor)
            else:
                router_logits = L.linear(h, moe.w_router)  # [n_tok, n_expert] (replicated)
                weights, ids = L.route_top_k(router_logits, c.n_expert_per_tok, c.norm_topk_prob)
                if self.expert_load is not None:
                    np.add.at(self.expert_load.counts[i], ids.ravel(), 1)
                for sh in self.shards[i]:
                    assert sh.experts is not None
                    parts.append(L.moe_experts(h, sh.experts.w_gate_up, sh.experts.w_down,
                                               weights, ids))  # [n_tok, n_embd]
            gate = (L.sigmoid(L.linear(h, moe.w_shared_gate))  # [n_tok, 1]
                    if moe.w_shared_gate is not None else None)
        for sh in self.shards[i]:
            if sh.mlp is None or sh.mlp.w_down.shape[1] == 0:
                continue
            y = L.swiglu_mlp(h, sh.mlp.w_gate_up, sh.mlp.w_down, sh.mlp.b_gate_up)  # [n, E]
            if moe is not None and gate is not None:
                y = gate * y  # the shared expert's gate scales each partial sum alike
            parts.append(y)
        out = all_reduce(parts)  # [n_tok, n_embd]
        if moe is None and isinstance(layer.mlp, DenseMLPWeights) and layer.mlp.b_down is not None:
            out += layer.mlp.b_down
        return out

    def _logits(self, x: np.ndarray) -> np.ndarray:
        h = L.rms_norm(x, self.weights.final_norm, self.config.rms_norm_eps)  # [n, n_embd]
        parts = [L.linear(h, w) for w in self.head_shards]  # [n, v_r] each
        return np.concatenate(parts, axis=-1)  # [n, n_vocab]: the all-gather

    def _decode_attention(self, layer: int, chunks: list[SeqChunk], q: np.ndarray,
                          q_pos: np.ndarray, kv: Any, window: int | None) -> np.ndarray:
        """As `NumpyModel._decode_attention`, for this rank's KV heads."""
        c = self.config
        lengths = (q_pos + 1).tolist()
        firsts = [0] * len(lengths) if window is None else [max(n - window, 0) for n in lengths]
        sizes = [n - f for n, f in zip(lengths, firsts, strict=True)]
        n_kv = kv.n_kv_heads()
        pad = np.zeros((2, len(chunks), max(sizes), n_kv, c.d_head),
                       dtype=self.dtype)  # [2, n_seq, max_len, n_kv, d_head]
        for s, chunk in enumerate(chunks):
            k_seq, v_seq = kv.read(chunk.seq_id, layer, lengths[s])  # [len, n_kv, d] x2
            pad[0, s, :sizes[s]] = k_seq[firsts[s]:]
            pad[1, s, :sizes[s]] = v_seq[firsts[s]:]
        q_pos_shifted = np.asarray(sizes) - 1  # [n_seq]
        return L.decode_attention(q, pad[0], pad[1], q_pos_shifted, None)  # [n_seq, n_q d]
