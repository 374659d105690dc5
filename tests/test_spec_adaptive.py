"""Adaptive speculation: k may be 0 (off when it does not pay), c taken at the current batch."""

from __future__ import annotations

import numpy as np

from sim.engine.args import EngineArgs
from sim.engine.engine import Engine
from sim.workload.specs import RequestSpec
from speculative.analysis import AdaptiveK, cost_ratio, optimal_k

DRAFT = "JackFram/llama-68m"


def test_low_acceptance_turns_speculation_off_but_keeps_probing():
    policy = AdaptiveK(c=0.5, k_max=8, probe_every=8)
    rng = np.random.default_rng(0)
    ks = []
    for _ in range(400):
        k = policy.k()
        ks.append(k)
        if k:
            hits = rng.random(k) < 0.05
            policy.observe(int(k if hits.all() else np.argmin(hits)), k)
    tail = ks[-200:]
    assert optimal_k(0.05, 0.5, 8, 0) == 0
    assert tail.count(0) >= 150 and 0 < tail.count(1) <= 50  # off, one-token probes only
    assert max(tail) == 1


def test_cost_at_the_batch_changes_the_choice():
    # c grows with the batch: a k that pays at batch 1 can stop paying at batch 256
    a = 0.6
    policy = AdaptiveK(c=0.0, k_max=8, prior=a, prior_weight=1e6,
                       cost_at=lambda b: 0.02 if b == 1 else 0.6)
    assert policy.k(1) >= 3 and policy.k(256) == 0


def test_engine_takes_c_at_the_running_batch_and_turns_off():
    engine = Engine(EngineArgs("meta-llama/Llama-2-7b-hf", mode="timing",
                               speculative_config={"method": "draft_model", "model": DRAFT,
                                                   "adaptive": True,
                                                   "num_speculative_tokens": 8,
                                                   "acceptance_rate": 0.02}))
    spec = engine.speculation
    assert spec is not None and spec.draft_cost is not None
    c1 = cost_ratio(spec.draft_cost, engine.cost_model, batch_size=1)
    c256 = cost_ratio(spec.draft_cost, engine.cost_model, batch_size=256)
    assert spec._c_at(1) == c1 and spec._c_at(200) == c256 and c256 != c1
    res = engine.run([RequestSpec(f"r{i}", 0.0, 100, 300) for i in range(4)])
    proposed = res.requests[0].spec_proposed  # steps that drafted (k = 0 steps verify nothing)
    assert res.requests[0].num_output_tokens == 300
    assert len(proposed) < 0.3 * 300 and max(proposed[-10:]) == 1  # off, but probing
