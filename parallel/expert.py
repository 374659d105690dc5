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
multiplies the expert compute by (`ParallelCostModel(expert_imbalance=...)`). Each forward pass
(one engine step) is also kept on its own (`step_imbalances`, `step_expert_counts`), so a run
reports its mean / p99 per-step imbalance (`ExpertLoadSummary`) and can be written as a routing
trace (`write_routing_trace`) that a timing run replays.

Timing runs price the skew with `ExpertImbalanceModel`, built from `EngineArgs.expert_load`
(`ExpertLoadSpec`): "uniform" (perfect balance, imbalance 1), "zipf:S" (expert e, numbered by
popularity, draws a share proportional to (e + 1)^-S), or a recorded routing trace.

Routing-trace JSON format (version 1)::

    {"format": "infersim-routing-trace", "version": 1, "n_expert": 8, "top_k": 2,
     "steps": [[c_0, c_1, ..., c_7], ...]}

one row per step: `c_e` is the number of routed token copies expert e received in that step
(summed over the MoE layers), non-negative integers; a row's sum is what top-k routing of that
step's tokens sent (T x k x layers); every row needs a positive sum.

References: Lepikhin et al. 2021 (GShard: expert capacity, dispatch/combine); Fedus et al. 2022
(Switch Transformers: capacity factor, dropped tokens); Jiang et al. 2024 (Mixtral top-2);
vLLM `FusedMoE` expert placement (`expert_map`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

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

    #: per forward pass (one engine step): busiest rank / mean, averaged over its MoE layers
    step_imbalances: list[float] = field(init=False)
    #: per forward pass: routed copies per expert `[n_expert]`, summed over its MoE layers
    step_expert_counts: list[np.ndarray] = field(init=False)

    def __post_init__(self) -> None:
        self.counts = np.zeros((self.n_layer, self.n_expert), dtype=np.int64)  # [n_layer, n_e]
        self.dropped = np.zeros((self.n_layer, self.n_expert), dtype=np.int64)  # [n_layer, n_e]
        self.step_imbalances, self.step_expert_counts = [], []
        self._step = np.zeros((self.n_layer, self.n_expert), dtype=np.int64)  # [n_layer, n_e]
        self._last_layer = -1

    def record_layer(self, layer: int, expert_counts: np.ndarray) -> None:
        """One MoE layer's routed copies per expert `[n_expert]` in the current forward pass; a
        layer at or below the last one seen starts a new pass (layers run in ascending order)."""
        if layer <= self._last_layer:
            self.end_step()
        self._step[layer] += expert_counts
        self._last_layer = layer

    def end_step(self) -> None:
        """Close the current forward pass (if it routed anything) into the per-step lists."""
        if self._step.sum() > 0:
            self.step_imbalances.append(_rank_imbalance(self._step, self.n_expert, self.ep))
            self.step_expert_counts.append(self._step.sum(axis=0))  # [n_expert]
        self._step = np.zeros_like(self._step)
        self._last_layer = -1

    def take_summary(self) -> ExpertLoadSummary:
        """The per-step imbalance of the passes since the last call (one run's), then forget
        them, so the next run of the same model reports only its own steps."""
        self.end_step()
        summary = ExpertLoadSummary.of(self.step_imbalances, "measured")
        self.step_imbalances, self.step_expert_counts = [], []
        return summary

    def write_trace(self, path: str | Path, top_k: int) -> None:
        """The per-step expert counts seen so far as a routing trace (module doc's format)."""
        self.end_step()
        write_routing_trace(path, self.step_expert_counts, top_k)

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
        return _rank_imbalance(self.counts, self.n_expert, self.ep)

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
    call_counts = np.zeros(n_expert, dtype=np.int64)  # [n_expert] this call's routed copies
    for group in groups:
        out = np.zeros_like(h)  # [n_tok, n_embd]
        for expert in group:
            tok, slot = np.nonzero(expert_ids == expert)  # [n_routed] x2, token order
            n_routed = tok.shape[0]
            if load is not None:
                load.counts[layer, expert] += n_routed
                call_counts[expert] = n_routed
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
    if load is not None:
        load.record_layer(layer, call_counts)
    return outs


def _rank_imbalance(counts: np.ndarray, n_expert: int, ep: int) -> float:
    """`counts` `[n_layer, n_expert]`: busiest rank / mean per layer, averaged over the layers
    that routed anything (1.0 when none did)."""
    groups = expert_groups(n_expert, ep)
    ratios = []
    for row in counts:
        loads = np.array([row[g].sum() for g in groups], dtype=float)  # [ep]
        if loads.sum() > 0:
            ratios.append(loads.max() / loads.mean())
    return float(np.mean(ratios)) if ratios else 1.0


@dataclass(frozen=True)
class ExpertLoadSummary:
    """A run's per-step expert-rank imbalance (busiest rank / mean): `source` says whether the
    real router measured it ("measured") or the timing side priced it (the `expert_load` spec)."""

    num_steps: int
    mean_imbalance: float
    p99_imbalance: float
    max_imbalance: float
    source: str

    @classmethod
    def of(cls, imbalances: list[float], source: str) -> ExpertLoadSummary:
        if not imbalances:
            return cls(0, 1.0, 1.0, 1.0, source)
        a = np.asarray(imbalances, dtype=float)  # [num_steps]
        return cls(len(imbalances), float(a.mean()), float(np.percentile(a, 99)),
                   float(a.max()), source)


# ---------------------------------------------------------------------- timing-side skew
TRACE_FORMAT = "infersim-routing-trace"
TRACE_VERSION = 1
#: Monte Carlo draws per step size behind `ExpertImbalanceModel.imbalance` (small steps)
NUM_IMBALANCE_SAMPLES = 64
#: fewer draws for large steps (their noise is small): at most this many Gumbel keys per T
MAX_GUMBEL_DRAWS = 2**21
MIN_IMBALANCE_SAMPLES = 4


def write_routing_trace(path: str | Path, step_expert_counts: list[np.ndarray],
                        top_k: int) -> None:
    """Write per-step routed copies per expert (each `[n_expert]`) in the module doc's format."""
    if not step_expert_counts:
        raise ConfigError("a routing trace needs at least one step; the model routed nothing")
    n_expert = len(step_expert_counts[0])
    doc = {"format": TRACE_FORMAT, "version": TRACE_VERSION, "n_expert": n_expert,
           "top_k": int(top_k), "steps": [[int(c) for c in row] for row in step_expert_counts]}
    Path(path).write_text(json.dumps(doc))


def read_routing_trace(path: str | Path) -> tuple[int, int, np.ndarray]:
    """(n_expert, top_k, counts `[num_steps, n_expert]`) of a routing trace, validated."""
    where = f"expert_load={str(path)!r}"
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{where}: cannot read a routing trace ({e}); pass 'uniform', "
                          "'zipf:S' or a JSON file in parallel.expert's trace format") from e
    if not isinstance(doc, dict) or doc.get("format") != TRACE_FORMAT:
        raise ConfigError(f"{where}: not a routing trace (needs \"format\": \"{TRACE_FORMAT}\")")
    if doc.get("version") != TRACE_VERSION:
        raise ConfigError(f"{where}: trace version {doc.get('version')!r}, this reads "
                          f"{TRACE_VERSION}")
    n_expert, top_k, steps = doc.get("n_expert"), doc.get("top_k"), doc.get("steps")
    if not (isinstance(n_expert, int) and n_expert >= 1 and isinstance(top_k, int)
            and 1 <= top_k <= n_expert):
        raise ConfigError(f"{where}: n_expert={n_expert!r}, top_k={top_k!r} must be integers "
                          "with 1 <= top_k <= n_expert")
    if not (isinstance(steps, list) and steps and all(
            isinstance(r, list) and len(r) == n_expert
            and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in r)
            and sum(r) > 0 for r in steps)):
        raise ConfigError(f"{where}: steps must be a non-empty list of rows of {n_expert} "
                          "non-negative integer counts, each row with a positive sum")
    return n_expert, top_k, np.asarray(steps, dtype=np.int64)  # [num_steps, n_expert]


@dataclass(frozen=True)
class ExpertLoadSpec:
    """`EngineArgs.expert_load` parsed: `kind` "uniform", "zipf" (with `zipf_s`) or "trace"
    (with the trace's `trace_counts` `[num_steps, n_expert]`, `trace_n_expert`)."""

    text: str
    kind: str
    zipf_s: float = 0.0
    trace_counts: np.ndarray | None = None
    trace_n_expert: int = 0

    @classmethod
    def parse(cls, value: object) -> ExpertLoadSpec:
        fix = "pass 'uniform', 'zipf:S' with S > 0 (e.g. 'zipf:1.2') or a routing-trace JSON path"
        if not isinstance(value, str) or not value:
            raise ConfigError(f"expert_load={value!r} must be a non-empty string; {fix}")
        if value == "uniform":
            return cls(value, "uniform")
        if value.startswith("zipf:"):
            try:
                s = float(value[len("zipf:"):])
            except ValueError:
                s = math.nan
            if not (math.isfinite(s) and s > 0):
                raise ConfigError(f"expert_load={value!r}: the Zipf skew must be a finite "
                                  f"number > 0; {fix}")
            return cls(value, "zipf", zipf_s=s)
        if not Path(value).is_file():
            raise ConfigError(f"expert_load={value!r} is not 'uniform', 'zipf:S' or an existing "
                              f"file; {fix}")
        n_expert, _, counts = read_routing_trace(value)
        return cls(value, "trace", trace_counts=counts, trace_n_expert=n_expert)

    @property
    def is_uniform(self) -> bool:
        return self.kind == "uniform"


class ExpertImbalanceModel:
    """Busiest expert-parallel rank's routed copies / the mean, for a step of T routed tokens.

    The routing weights come from the spec: Zipf over the experts, expert e (numbered by
    popularity) weighted (e + 1)^-S, or each trace step's counts normalised. Each token picks
    k distinct experts, drawn without replacement in proportion to the weights (Plackett-Luce,
    sampled as Gumbel top-k: Kool et al. 2019), so no expert gets a token twice. Experts sit on
    ranks as `expert_groups` places them (contiguous ids, vLLM's linear `expert_map`), so under
    Zipf the most popular experts share rank 0: the pessimistic placement, with no load-aware
    re-placement (EPLB), and the one under which the price rises monotonically with S (a random
    placement can put the k hot experts on k different ranks and balance them again). A trace
    keeps its recorded ids (its counts as weights: for k > 1 the drawn shares are a little
    flatter than the recorded ones, as sampling without replacement is).

    `imbalance(T)` is the *expectation* of max/mean over the routing of T tokens, estimated by
    Monte Carlo: up to NUM_IMBALANCE_SAMPLES routings of T tokens (fewer for large T, whose
    spread is small; for a trace, each from a trace step picked at random), from a numpy
    Generator seeded with (seed, T) (never the global RNG) and cached per T. The step price is
    linear in the imbalance, so the expectation gives the expected step time; and being a
    function of T alone, it prices a step the same whoever asks (an admission look-ahead, a
    decode stretch or the step itself). "uniform" is perfect balance (1.0), today's price.
    Pricing EP by the busiest rank follows FasterMoE (He et al. 2022) and DeepSeek-V3's
    expert-load balancing discussion.
    """

    def __init__(self, spec: ExpertLoadSpec, n_expert: int, top_k: int, ep: int,
                 seed: int) -> None:
        if spec.kind == "trace" and spec.trace_n_expert != n_expert:
            raise ConfigError(f"expert_load={spec.text!r} records {spec.trace_n_expert} experts, "
                              f"the model has {n_expert}; record the trace on this model")
        self.spec, self.n_expert, self.top_k, self.ep = spec, n_expert, top_k, ep
        self.seed = int(seed)
        self._bounds = np.array([n_expert * r // ep for r in range(ep)])  # [ep] group starts
        if spec.kind == "zipf":
            zipf = np.arange(1, n_expert + 1, dtype=float) ** -spec.zipf_s  # [n_expert]
            rows = zipf[None, :]
        elif spec.kind == "trace":
            assert spec.trace_counts is not None
            rows = spec.trace_counts.astype(float)  # [num_steps, n_expert]
        else:
            rows = np.ones((1, n_expert))
        with np.errstate(divide="ignore"):  # an expert a trace never saw: weight 0, key -inf
            self._log_w = np.log(rows / rows.sum(axis=1, keepdims=True))  # [n_rows, n_expert]
        self._cache: dict[int, float] = {}

    @property
    def is_uniform(self) -> bool:
        return self.spec.is_uniform or self.ep == 1

    def imbalance(self, num_tokens: int) -> float:
        """Expected busiest-rank / mean load for a step routing `num_tokens` tokens (>= 1)."""
        if self.is_uniform or num_tokens <= 0:
            return 1.0
        hit = self._cache.get(num_tokens)
        if hit is not None:
            return hit
        rng = np.random.default_rng([self.seed, num_tokens])
        n_samples = int(np.clip(MAX_GUMBEL_DRAWS // (num_tokens * self.n_expert),
                                MIN_IMBALANCE_SAMPLES, NUM_IMBALANCE_SAMPLES))
        picks = rng.integers(len(self._log_w), size=n_samples)  # [n_samples]
        counts = np.empty((n_samples, self.n_expert), dtype=np.int64)  # [n_samples, n_expert]
        for i, row in enumerate(picks):
            # Gumbel top-k: each token's k distinct experts, drawn without replacement with
            # probabilities proportional to the weights (Plackett-Luce); the Gumbel noise
            # depends only on (seed, T), so two skews see the same draws (common random
            # numbers) and the estimate moves with S, not with the noise
            keys = self._log_w[row] + rng.gumbel(size=(num_tokens, self.n_expert))  # [T, E]
            chosen = np.argpartition(-keys, self.top_k - 1, axis=1)[:, :self.top_k]  # [T, k]
            counts[i] = np.bincount(chosen.ravel(), minlength=self.n_expert)
        loads = np.add.reduceat(counts, self._bounds, axis=1).astype(float)  # [n_samples, ep]
        value = float(np.mean(loads.max(axis=1) / loads.mean(axis=1)))
        self._cache[num_tokens] = value
        return value
