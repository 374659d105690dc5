"""Token-tree speculation (SpecInfer-style): topology, tree attention, verification, engine.

Oracles: a tree chunk's logits equal a plain causal pass over each node's root-to-node path
(float64); greedy output with tree speculation equals plain decoding through the engine (paged,
contiguous, prefix caching, preemption, tight budget); SpecInfer's multi-step speculative
sampling reproduces p exactly in closed form on a tiny vocabulary, and a seeded chi-square test
holds for a two-level tree and through the whole engine.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from sim import LLM, SamplingParams
from sim.core.errors import ConfigError
from sim.model.kv_store import ContiguousKVStore
from sim.model.numpy_model import NumpyModel, SeqChunk
from sim.model.proxy import tiny_proxy_config
from sim.model.zoo import resolve_model
from speculative.config import SpeculativeConfig
from speculative.tree import (
    TreeShape,
    tree_chunk_layout,
    tree_verify_greedy,
    tree_verify_sampled,
)
from tests.test_speculative_engine import CASES, MODEL, _exact_law, _greedy, _prompts

TREE = {"method": "draft_model", "draft_noise_scale": 0.3, "tree": [2, 2, 1]}


def test_tree_shape_counts_and_parents():
    t = TreeShape((2, 2, 1))
    assert t.level_sizes == (2, 4, 4) and t.num_nodes == 10 and t.depth == 3
    assert t.parents().tolist() == [-1, -1, 0, 0, 1, 1, 2, 3, 4, 5]
    with pytest.raises(ConfigError):
        TreeShape((2, 0))
    assert SpeculativeConfig.from_any(TREE).tree == (2, 2, 1)
    with pytest.raises(ConfigError):
        SpeculativeConfig.from_any({"method": "ngram", "tree": [2]})


def test_tree_chunk_logits_equal_each_path_run_causally():
    cfg = tiny_proxy_config(resolve_model(MODEL))
    model = NumpyModel.random(cfg, seed=3, dtype="float64")
    parents = TreeShape((2, 2)).parents()  # [6]
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, cfg.n_vocab, 7).tolist()
    nodes = rng.integers(0, cfg.n_vocab, parents.size).tolist()
    store = ContiguousKVStore(cfg.n_layer, cfg.n_kv_head, cfg.d_head, model.dtype)
    store.allocate("s", 32)
    model.forward_step([SeqChunk("s", np.asarray(prompt[:5]), 0, 0)], store)
    pos, mask = tree_chunk_layout(5, 2, parents)
    ids = np.asarray(prompt[5:] + nodes)  # [n_new]
    logits = model.forward_step([SeqChunk("s", ids, 5, 1 + parents.size, pos, mask)], store)
    for i in range(-1, parents.size):
        path, j = [], i
        while j >= 0:
            path.insert(0, nodes[j])
            j = int(parents[j])
        ref = model.forward(prompt + path)[-1]  # [n_vocab]
        np.testing.assert_allclose(logits[i + 1], ref, rtol=1e-9, atol=1e-9)


def test_greedy_tree_verify_follows_the_target_argmax():
    parents = TreeShape((2, 1)).parents()  # [-1, -1, 0, 1]
    logits = np.zeros((5, 4))  # [1 + n, n_vocab]
    logits[0, 2] = logits[2, 3] = logits[4, 1] = 1.0  # root -> 2 (node 1), node 1 -> 3 (node 3)
    res = tree_verify_greedy([1, 2, 0, 3], parents, logits)
    assert res.path == (1, 3) and res.token_ids == (2, 3, 1)


def _exact_one_level(p: np.ndarray, q: np.ndarray, b: int) -> np.ndarray:
    """The law of the first emitted token of a one-level tree with b i.i.d. children from q,
    by exact enumeration of SpecInfer's recursive rejection."""

    def law(p_cur: np.ndarray, left: int) -> np.ndarray:
        if left == 0:
            return p_cur
        out = np.zeros_like(p)  # [n_vocab]
        for x in np.flatnonzero(q):
            a = min(1.0, p_cur[x] / q[x])
            out[x] += q[x] * a
            if a < 1.0:
                r = np.maximum(p_cur - q, 0.0)  # [n_vocab]
                out += q[x] * (1 - a) * law(r / r.sum(), left - 1)
        return out

    return law(p, b)


@pytest.mark.parametrize("b", [1, 2, 3])
def test_multi_draft_rejection_is_exact_in_closed_form(b):
    p = np.array([0.5, 0.1, 0.3, 0.1])
    q = np.array([0.1, 0.6, 0.1, 0.2])
    np.testing.assert_allclose(_exact_one_level(p, q, b), p, atol=1e-12)


def test_two_level_tree_sampling_matches_the_target_chi_square():
    rng = np.random.default_rng(7)
    v = 4
    p1, q1 = rng.dirichlet(np.ones(v)), rng.dirichlet(np.ones(v))  # [v] x2
    p2, q2 = rng.dirichlet(np.ones(v), v), rng.dirichlet(np.ones(v), v)  # [v, v] x2
    shape = TreeShape((3, 2))
    parents = shape.parents()
    n = 20000
    counts = np.zeros((v, v))
    for _ in range(n):
        tokens = list(rng.choice(v, 3, p=q1))
        for parent in range(3):
            tokens += list(rng.choice(v, 2, p=q2[tokens[parent]]))
        target = np.vstack([p1] + [p2[t] if i < 3 else np.full(v, 1 / v)
                                   for i, t in enumerate(tokens)])  # [1 + n, v]
        draft = np.vstack([q1] + [q2[t] if i < 3 else np.full(v, 1 / v)
                                  for i, t in enumerate(tokens)])  # [1 + n, v]
        res = tree_verify_sampled(tokens, parents, target, draft, rng)
        y = list(res.token_ids)
        if len(y) == 1:  # the root's children were all rejected: the next step samples p2
            y.append(int(rng.choice(v, p=p2[y[0]])))
        counts[y[0], y[1]] += 1
    expected = (p1[:, None] * p2).ravel() * n  # [v * v]
    assert stats.chisquare(counts.ravel(), expected).pvalue > 1e-3


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_tree_output_is_unchanged(case):
    prompts = _prompts(4)
    assert _greedy(TREE, prompts, **CASES[case]) == _greedy(None, prompts, **CASES[case])


def test_greedy_tree_equality_other_shapes_and_summary():
    prompts = _prompts(3, seed=1)
    plain = _greedy(None, prompts, max_tokens=15)
    for tree in ([3], [3, 1, 1], [1, 2, 2]):
        spec = {"method": "draft_model", "draft_noise_scale": 0.2, "tree": tree}
        assert _greedy(spec, prompts, max_tokens=15) == plain, tree
    llm = LLM(MODEL, dtype="float64", speculative_config=TREE)
    llm.generate([{"prompt_token_ids": [3, 4, 5, 6]}],
                 SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    summary = llm.last_result.speculation
    assert summary["num_draft_tokens"] == 10 * summary["num_verification_steps"]
    assert len(summary["per_position_acceptance"]) == 3
    assert summary["mean_tokens_per_step"] > 1.0


def test_sampled_tree_output_follows_the_target_distribution():
    prompt = [5, 6, 5, 6, 5]
    # max_tokens leaves room for the tree's KV slots; the law is of the first two tokens, the
    # second one verified against the tree's root level (two levels: the test above)
    params = SamplingParams(temperature=1.5, top_k=3, max_tokens=12, ignore_eos=True)
    law = _exact_law(prompt, params)
    n = 1200
    spec = {"method": "draft_model", "draft_noise_scale": 0.3, "tree": [2, 2]}
    llm = LLM(MODEL, dtype="float64", seed=5, speculative_config=spec, max_num_seqs=256,
              enable_prefix_caching=True)
    outs = llm.generate([{"prompt_token_ids": prompt}] * n, params)
    counts = dict.fromkeys(law, 0)
    for o in outs:
        counts[tuple(o.outputs[0].token_ids[:2])] += 1
    assert llm.last_result.speculation["num_accepted_tokens"] > 0.0
    cells = sorted(law)
    observed = np.array([counts[c] for c in cells])
    expected = np.array([law[c] for c in cells]) * n
    assert stats.chisquare(observed, expected).pvalue > 1e-3
