"""Expert parallelism, functionally: experts placed whole over ranks, routed by the real router.

Each MoE layer's experts are split into `ep` contiguous groups, one per rank (expert e lives on
rank `e * ep // n_expert` when ep divides n_expert). The router runs on every rank (it is
replicated, so one computation stands for all); each rank receives the routed copies of the
tokens that chose its experts (dispatch), runs them, and the weighted outputs return to their
tokens (combine), summed in a fixed order: rank by rank, experts in ascending id.

`ExpertLoad` records, per layer and expert, how many routed copies arrived, and how many were
dropped by an optional capacity factor: expert capacity = ceil(cf x T x k / n_expert) copies per
step, the copies beyond it (in token order, as GShard and Switch do) are dropped and contribute
nothing, which changes the result; without a capacity factor nothing is dropped and the output
equals the unsharded MoE layer. `imbalance()` (busiest rank / mean) is what the timing side
multiplies the expert compute by (`ParallelCostModel(expert_imbalance=...)`).

References: Lepikhin et al. 2021 (GShard: expert capacity, dispatch/combine); Fedus et al. 2022
(Switch Transformers: capacity factor, dropped tokens); Jiang et al. 2024 (Mixtral top-2);
vLLM `FusedMoE` expert placement (`expert_map`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from sim.core.errors import ConfigError
from sim.model import layers as L
from sim.model.weights import MoEWeights


def expert_groups(n_expert: int, ep: int) -> list[range]:
    """The experts each rank holds: contiguous, as even as possible (np.array_split)."""
    if ep < 1:
        raise ConfigError(f"expert parallel size must be >= 1, got {ep}")
    bounds = [n_expert * r // ep for r in range(ep + 1)]
    return [range(bounds[r], bounds[r + 1]) for r in range(ep)]


@dataclass
class ExpertLoad:
    """Routed copies per (layer, expert), dropped copies, summed over every step seen."""

    n_layer: int
    n_expert: int
    ep: int
    counts: np.ndarray = field(init=False)  # [n_layer, n_expert]
    dropped: np.ndarray = field(init=False)  # [n_layer, n_expert]

    def __post_init__(self) -> None:
        self.counts = np.zeros((self.n_layer, self.n_expert), dtype=np.int64)  # [n_layer, n_e]
        self.dropped = np.zeros((self.n_layer, self.n_expert), dtype=np.int64)  # [n_layer, n_e]

    @property
    def num_dropped(self) -> int:
        return int(self.dropped.sum())

    @property
    def num_routed(self) -> int:
        return int(self.counts.sum())

    def rank_loads(self) -> np.ndarray:
        """Routed copies per rank, summed over layers `[ep]`."""
        per_expert = self.counts.sum(axis=0)  # [n_expert]
        return np.array([per_expert[g].sum() for g in expert_groups(self.n_expert, self.ep)])

    def imbalance(self) -> float:
        """Busiest rank's routed copies / the mean (1 = perfectly balanced), per layer and
        averaged over the MoE layers that saw tokens."""
        ratios = []
        groups = expert_groups(self.n_expert, self.ep)
        for row in self.counts:
            loads = np.array([row[g].sum() for g in groups], dtype=float)  # [ep]
            if loads.sum() > 0:
                ratios.append(loads.max() / loads.mean())
        return float(np.mean(ratios)) if ratios else 1.0

    def summary(self) -> dict[str, object]:
        total = self.counts.sum(axis=0)  # [n_expert]
        return {"num_routed": self.num_routed, "num_dropped": self.num_dropped,
                "expert_share": (total / max(1, total.sum())).round(4).tolist(),
                "rank_loads": self.rank_loads().tolist(), "imbalance": self.imbalance()}


def moe_rank_outputs(h: np.ndarray, mlp: MoEWeights, top_k: int, renormalize: bool,
                     groups: list[range], layer: int, load: ExpertLoad | None,
                     capacity_factor: float | None) -> list[np.ndarray]:
    """Each rank's contribution `[n_tok, n_embd]` of the routed experts of one MoE layer.

    `h` `[n_tok, n_embd]` is the (replicated) normed input; experts are whole on their rank.
    """
    n_tok = h.shape[0]
    router_logits = L.linear(h, mlp.w_router)  # [n_tok, n_expert]
    weights, expert_ids = L.route_top_k(router_logits, top_k, renormalize)  # [n_tok, k] x2
    n_expert = mlp.w_router.shape[0]
    capacity = (None if capacity_factor is None
                else math.ceil(capacity_factor * n_tok * top_k / n_expert))
    outs = []
    for group in groups:
        out = np.zeros_like(h)  # [n_tok, n_embd]
        for expert in group:
            tok, slot = np.nonzero(expert_ids == expert)  # [n_routed] x2, token order
            n_routed = tok.shape[0]
            if load is not None:
                load.counts[layer, expert] += n_routed
            if capacity is not None and n_routed > capacity:
                if load is not None:
                    load.dropped[layer, expert] += n_routed - capacity
                tok, slot = tok[:capacity], slot[:capacity]  # [capacity] x2
            if tok.shape[0] == 0:
                continue
            dispatched = h[tok]  # [n_routed, n_embd]: the all-to-all dispatch
            y = L.swiglu_mlp(dispatched, mlp.w_gate_up[expert], mlp.w_down[expert])  # [n_r, E]
            out[tok] += y * weights[tok, slot][:, None]  # the combine
        outs.append(out)
    return outs
