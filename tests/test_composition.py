"""The composition matrix: a combination of features is a feature.

Every pair of non-default settings of the features below (and a seeded sample of triples)
either is refused before anything runs, by a rule of `sim.engine.compat` whose reason names the
settings involved, or gives the plain path's answer. The oracle (float64 tiny proxy, greedy,
`ignore_eos`):

- the tokens and cumulative log-probabilities equal those of the *reference* run, which keeps
  only the combination's lossy settings (KV dtype, KV eviction, weight quantization) and its
  request kind (n > 1, beam search), with the defaults (paged, continuous, fcfs, one GPU) for
  everything else; log-probabilities are compared too because greedy tokens of the tiny proxy
  rarely move under 8-bit KV, so tokens alone could not tell a dropped lossy setting;
- every request ends (no rejection: in particular none "stalled");
- every KV manager of the run holds nothing at the end;
- the features that leave a trace show it: prefix hits, proposed drafts, swapped blocks when a
  swap-mode run preempts.

Features (non-default values): KV layout (contiguous, none), prefix caching, KV dtype (int8,
fp8), eviction (sliding_window, streaming_llm, h2o), preemption (swap, with a pool that
forces preemption), scheduler (static, dynamic), chunked prefill, queue policy (priority,
shortest_prompt_first), speculation (ngram, draft_model), n = 2 (seeded), beam search (width
2), weight quantization (int8), TP 2, PP 2, DP 2. Two bugs this matrix
found are fixed and pinned here: 8-bit KV was dropped under speculative decoding, and `n > 1`
under a tight pool stalled (forked samples waited holding their prompt blocks).
"""

from __future__ import annotations

import itertools
import math
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cache.paged import PagedKVCache
from sim import LLM, SamplingParams
from sim.core.errors import ConfigError
from sim.core.protocols import KVCacheManager
from sim.core.request import RequestOutput
from sim.engine.args import EngineArgs
from sim.engine.compat import (
    README_BEGIN,
    README_END,
    RULES,
    check_compatible,
    refusal,
    render_markdown,
    with_table,
)
from sim.engine.records import SimulationResult

BASE: dict[str, Any] = dict(model="meta-llama/Llama-2-7b-hf", dtype="float64", seed=0,
                            max_model_len=64, block_size=4)
MAX_TOKENS = 6
_RNG = np.random.default_rng(1)
_SHARED = _RNG.integers(1, 250, 8).tolist()  # two full blocks: prefix-cache hits
PROMPTS = [{"prompt_token_ids": ids} for ids in (
    [*_SHARED, 5, 9, 13, 5, 9, 13],  # repeats: n-gram drafts
    _RNG.integers(1, 250, 5).tolist(),
    _SHARED + _RNG.integers(1, 250, 9).tolist(),  # index 2: the same DP replica as index 0
    # the proxy's own greedy run from [1, 2, 3], which then loops on 23, 116, 100, 52: n-gram
    # drafts that are accepted
    [1, 2, 3, 146, 73, 232, 152, 121, 116, 100, 52, 23, 116, 100, 52],
)]
PRIORITY = [3, 2, 1, 0]  # read only under scheduling_policy="priority" (lower runs first)
LOSSY = ("kv_cache_dtype", "kv_eviction", "quantization")
REL_TOL = 1e-9  # float64 reassociation (batching, chunks, all-reduce) is ~1e-15; 8-bit KV ~1e-3


@dataclass(frozen=True, eq=False)  # one object per setting: compared by identity
class Setting:
    """One non-default value of one feature: the engine and request arguments it sets and the
    setting names a refusal that concerns it must name."""

    feature: str
    value: str
    names: tuple[str, ...]
    engine: dict[str, Any] = field(default_factory=dict)
    request: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.feature}={self.value}"


def _settings(feature: str, names: tuple[str, ...],
              values: dict[str, tuple[dict[str, Any], dict[str, Any]]]) -> list[Setting]:
    return [Setting(feature, v, names, engine, request) for v, (engine, request) in values.items()]


_SPEC = {"num_speculative_tokens": 3}
FEATURES: dict[str, list[Setting]] = {s[0].feature: s for s in (
    _settings("kv_cache", ("kv_cache",), {
        "contiguous": ({"kv_cache": "contiguous"}, {}), "none": ({"kv_cache": "none"}, {})}),
    _settings("prefix_caching", ("enable_prefix_caching",), {
        "on": ({"enable_prefix_caching": True}, {})}),
    _settings("kv_cache_dtype", ("kv_cache_dtype",), {
        "int8": ({"kv_cache_dtype": "int8"}, {}), "fp8": ({"kv_cache_dtype": "fp8"}, {})}),
    _settings("kv_eviction", ("kv_eviction",), {  # budgets below the longest prompt: evicts
        "sliding_window": ({"kv_eviction": "sliding_window", "kv_eviction_window": 8}, {}),
        "streaming_llm": ({"kv_eviction": "streaming_llm", "kv_eviction_window": 6,
                           "kv_eviction_sinks": 2}, {}),
        "h2o": ({"kv_eviction": "h2o", "kv_eviction_window": 6, "kv_eviction_heavy": 2}, {})}),
    _settings("preemption_mode", ("preemption_mode",), {  # 64 KV slots for ~80 tokens: preempts
        "swap": ({"preemption_mode": "swap", "num_gpu_blocks_override": 16, "swap_space": 1.0},
                 {})}),
    _settings("scheduler", ("scheduler",), {
        "static": ({"scheduler": "static"}, {}), "dynamic": ({"scheduler": "dynamic"}, {})}),
    _settings("chunked_prefill", ("enable_chunked_prefill",), {
        "on": ({"enable_chunked_prefill": True, "max_num_batched_tokens": 8}, {})}),
    _settings("scheduling_policy", ("scheduling_policy",), {
        "priority": ({"scheduling_policy": "priority"}, {}),
        "shortest_prompt_first": ({"scheduling_policy": "shortest_prompt_first"}, {})}),
    _settings("speculation", ("speculative_config",), {
        "ngram": ({"speculative_config": {"method": "ngram", **_SPEC}}, {}),
        "draft_model": ({"speculative_config": {"method": "draft_model", **_SPEC,
                                                "draft_noise_scale": 0.2}}, {})}),
    _settings("n", ("n",), {"2": ({}, {"n": 2, "seed": 11})}),
    _settings("beam_search", ("use_beam_search",), {"2": ({}, {"n": 2, "use_beam_search": True})}),
    _settings("quantization", ("quantization",), {"int8": ({"quantization": "int8"}, {})}),
    _settings("tp", ("tensor_parallel_size",), {"2": ({"tensor_parallel_size": 2}, {})}),
    _settings("pp", ("pipeline_parallel_size",), {"2": ({"pipeline_parallel_size": 2}, {})}),
    _settings("dp", ("data_parallel_size",), {"2": ({"data_parallel_size": 2}, {})}),
)}
ALL = [s for settings in FEATURES.values() for s in settings]


def _combos() -> tuple[list[tuple[Setting, ...]], list[tuple[Setting, ...]]]:
    """Every pair of settings of two different features, and 40 seeded triples."""
    pairs = [(a, b) for a, b in itertools.combinations(ALL, 2) if a.feature != b.feature]
    rng = random.Random(20240611)
    names = list(FEATURES)
    triples: set[tuple[Setting, ...]] = set()
    while len(triples) < 40:
        chosen = sorted(rng.sample(names, 3), key=names.index)
        triples.add(tuple(rng.choice(FEATURES[f]) for f in chosen))
    return pairs, sorted(triples, key=lambda c: [s.label for s in c])


PAIRS, TRIPLES = _combos()


def _arguments(combo: tuple[Setting, ...]) -> tuple[dict[str, Any], SamplingParams]:
    engine: dict[str, Any] = dict(BASE)
    request: dict[str, Any] = dict(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True,
                                   logprobs=0)
    for s in combo:
        engine.update(s.engine)
        request.update(s.request)
    return engine, SamplingParams(**request)


def _refused(combo: tuple[Setting, ...]) -> bool:
    """Whether `sim.engine.compat` refuses the combination (decided without building it)."""
    engine, params = _arguments(combo)
    try:
        check_compatible(EngineArgs(**engine), params)
    except ConfigError:
        return True
    return False


def _params(combos: list[tuple[Setting, ...]]) -> Iterator[Any]:
    for combo in combos:
        yield pytest.param(combo, id="+".join(s.label for s in combo))


# ---------------------------------------------------------------------------- running
Outputs = list[list[tuple[list[int], float | None]]]  # [prompt][sample] (tokens, cum logprob)


@dataclass
class Run:
    llm: LLM
    outs: list[RequestOutput]
    kv_managers: list[KVCacheManager]  # every lane's, as the run made them

    @property
    def outputs(self) -> Outputs:
        return [[(c.token_ids, c.cumulative_logprob) for c in o.outputs] for o in self.outs]

    @property
    def reject_reasons(self) -> list[str]:
        return [o.reject_reason for o in self.outs if o.reject_reason is not None]

    @property
    def result(self) -> SimulationResult:
        assert self.llm.last_result is not None
        return self.llm.last_result


def _build(engine: dict[str, Any], params: SamplingParams) -> LLM:
    """The engine, and a request made on it (where the request-level rules run): everything a
    refusal may stop, before anything runs."""
    llm = LLM(**engine)
    llm.engine.make_request("probe", 0, 1, params, 0.0, [1])
    return llm


def _run(llm: LLM, params: SamplingParams, prompts: list[dict[str, Any]] = PROMPTS) -> Run:
    outs = llm.generate(prompts, params, priority=PRIORITY[: len(prompts)])
    return Run(llm, outs, list(llm.last_result.kv_managers))


def _run_setting(*combo: Setting) -> Run:
    engine, params = _arguments(combo)
    return _run(_build(engine, params), params)


@cache
def _reference(lossy: tuple[tuple[str, Any], ...], params: SamplingParams) -> Outputs:
    """The plain path's outputs under the same lossy settings and request kind."""
    run = _run(_build({**BASE, **dict(lossy)}, params), params)
    assert not run.reject_reasons
    return run.outputs


def _lossy(engine: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    """The combination's lossy settings (with the options that size them, e.g. the window)."""
    return tuple(sorted((k, v) for k, v in engine.items() if k.startswith(LOSSY)))


def _close(got: float | None, want: float | None) -> bool:
    if got is None or want is None:
        return got is want
    return math.isclose(got, want, rel_tol=REL_TOL, abs_tol=REL_TOL)


def _same(got: Outputs, want: Outputs) -> bool:
    if [[t for t, _ in p] for p in got] != [[t for t, _ in p] for p in want]:
        return False
    return all(_close(g, w) for pg, pw in zip(got, want, strict=True)
               for (_, g), (_, w) in zip(pg, pw, strict=True))


def _assert_kv_freed(run: Run) -> None:
    plan = run.llm.engine.plan
    assert len(run.kv_managers) == plan.dp * plan.pp  # one per lane
    for kv in run.kv_managers:
        assert kv.num_used_tokens() == 0 and kv.num_reserved_tokens() == 0
        if isinstance(kv, PagedKVCache):
            kv.check()
            assert kv.usage().num_requests == 0
            assert kv.swap.num_free_blocks == kv.swap.num_blocks


def _names(message: str, setting: Setting) -> bool:
    return any(re.search(rf"(?<![\w.]){re.escape(n)}(?!\w)", message) for n in setting.names)


def _check(combo: tuple[Setting, ...]) -> None:
    engine, params = _arguments(combo)
    try:
        llm = _build(engine, params)
    except ConfigError as err:  # refused when built, or when the request is made
        message = str(err)
        assert any(message.startswith(rule.reason) for rule in RULES), message  # compat's rule
        named = [s.label for s in combo if _names(message, s)]
        assert len(named) >= 2, f"{message!r} names {named} only"
        return
    run = _run(llm, params)
    assert not run.reject_reasons, run.reject_reasons
    assert all(len(tokens) == MAX_TOKENS for prompt in run.outputs for tokens, _ in prompt)
    assert _same(run.outputs, _reference(_lossy(engine), params)), run.outputs
    _assert_kv_freed(run)
    features = {s.feature for s in combo}
    stats = run.result.stats
    if "prefix_caching" in features:
        assert sum(o.num_cached_tokens for o in run.outs) > 0
    if "speculation" in features:
        spec = run.result.speculation
        assert spec is not None and spec["num_draft_tokens"] > 0
    # a preempted beam search restarts instead of swapping (README: deliberately left out)
    if "preemption_mode" in features and "beam_search" not in features:
        assert (stats.swap_s > 0) == (stats.num_preemptions > 0)


@pytest.mark.parametrize("combo", list(_params(PAIRS)))
def test_every_pair_is_refused_or_gives_the_plain_answer(combo):
    _check(combo)


@pytest.mark.parametrize("combo", list(_params(TRIPLES)))
def test_sampled_triples_are_refused_or_give_the_plain_answer(combo):
    _check(combo)


# ---------------------------------------------------------------------------- the oracle bites
@pytest.mark.parametrize("setting", [s for s in ALL if s.feature in
                                     ("kv_cache_dtype", "kv_eviction", "quantization")],
                         ids=lambda s: s.label)
def test_every_lossy_setting_moves_the_plain_answer(setting):
    """So the oracle catches a combination that drops a lossy setting."""
    engine, params = _arguments((setting,))
    plain = _reference((), params)
    assert not _same(_reference(_lossy(engine), params), plain)


def test_each_feature_alone_leaves_its_trace():
    """The matrix exercises what it names: a feature that silently did nothing would pass it."""
    plain = _run_setting().result.stats
    (contiguous, none), (static, _) = FEATURES["kv_cache"], FEATURES["scheduler"]
    run = _run_setting(contiguous)  # a slab of max_model_len per request
    assert all(kv.reservation_tokens(run.result.requests[0]) == BASE["max_model_len"]
               for kv in run.kv_managers)
    # no KV cache: every step recomputes the whole sequence
    assert _run_setting(none).result.stats.num_tokens_computed > plain.num_tokens_computed
    run = _run_setting(*FEATURES["prefix_caching"])
    assert [o.num_cached_tokens for o in run.outs] == [0, 0, 8, 0]  # prompt 0's two blocks
    stats = _run_setting(*FEATURES["preemption_mode"]).result.stats
    assert stats.num_preemptions > 0 and stats.swap_s > 0
    stats = _run_setting(static).result.stats  # the batch is priced padded to its longest
    assert stats.num_tokens_priced > stats.num_tokens_computed
    assert _run_setting(*FEATURES["chunked_prefill"]).result.stats.num_steps > plain.num_steps
    for feature in ("n", "beam_search"):  # forks share the prompt's blocks (copy-on-write)
        assert _run_setting(*FEATURES[feature]).result.stats.num_copied_blocks > 0
    for setting in FEATURES["speculation"]:  # drafts proposed, verified and accepted
        spec = _run_setting(setting).result.speculation
        assert spec is not None and spec["num_accepted_tokens"] > 0
    for feature in ("tp", "pp"):
        assert _run_setting(*FEATURES[feature]).llm.engine.sharded
    replicas = _run_setting(*FEATURES["dp"]).llm.engine.parallel_stats
    assert replicas is not None and replicas.requests_per_replica == [2, 2]


@pytest.mark.parametrize("scheduler", ["continuous", "static", "dynamic"])
@pytest.mark.parametrize("policy", ["priority", "shortest_prompt_first"])
def test_queue_policies_order_admission_or_are_refused(policy, scheduler):
    """One sequence at a time: requests get their first token in the policy's order (priority:
    lowest value first; shortest prompt first), or the scheduler refuses the policy."""
    _, params = _arguments(())
    try:
        llm = _build(dict(BASE, scheduler=scheduler, scheduling_policy=policy, max_num_seqs=1),
                     params)
    except ConfigError as err:
        assert scheduler != "continuous"
        (rule,) = [r for r in RULES if r.settings == ("scheduling_policy", "scheduler")]
        assert str(err).startswith(rule.reason)
        return
    outs = _run(llm, params).outs
    order = sorted(range(len(PROMPTS)), key=lambda i: outs[i].metrics.first_token_time)
    lengths = [len(p["prompt_token_ids"]) for p in PROMPTS]
    assert order == sorted(range(len(PROMPTS)), key=(PRIORITY if policy == "priority"
                                                      else lengths).__getitem__)


# ---------------------------------------------------------------------------- tight pools
_TIGHT_PROMPTS = [{"prompt_token_ids": ids} for ids in
                  ([5, 9, 13, 200], [17, 3, 88, 41, 6], [7, 8, 9], [120, 33, 250, 4, 61])]
_TIGHT = dict(BASE, max_model_len=16, block_size=4)
_REQUESTS = {
    "n": pytest.param({"n": 2, "seed": 11}, id="n=2"),
    "beam": pytest.param({"n": 2, "use_beam_search": True}, id="beam_search"),
}


@pytest.mark.parametrize("preemption_mode", ["recompute", "swap"])
@pytest.mark.parametrize("request_kw", list(_REQUESTS.values()))
def test_n_and_beam_search_under_a_tight_pool(request_kw, preemption_mode):
    """Six blocks of four hold one prompt's two sequences (12 tokens each) at a time: requests
    preempt each other, and every one still ends with the roomy pool's answer."""
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=0,
                            **request_kw)
    roomy = _run(_build(dict(_TIGHT), params), params, _TIGHT_PROMPTS)
    tight = _run(_build(dict(_TIGHT, num_gpu_blocks_override=6, preemption_mode=preemption_mode,
                             swap_space=1.0), params), params, _TIGHT_PROMPTS)
    assert tight.result.stats.num_preemptions > 0
    assert not tight.reject_reasons, tight.reject_reasons
    assert _same(tight.outputs, roomy.outputs)
    _assert_kv_freed(tight)


# ---------------------------------------------------------------------------- the rules
@pytest.mark.parametrize("rule", RULES, ids=lambda r: "+".join(r.settings))
def test_every_rule_refuses_its_example_naming_its_settings(rule):
    kwargs = {"model": BASE["model"], **rule.example}
    if not rule.request_level:
        with pytest.raises(ConfigError) as err:
            EngineArgs(**kwargs)  # the first gate: before any engine is built
    else:
        llm = LLM(**kwargs)  # an engine-level-valid combination builds ...
        params = SamplingParams(**rule.request)
        with pytest.raises(ConfigError) as err:  # ... and the request is refused when made
            llm.engine.make_request("0", 0, 3, params, 0.0, [1, 2, 3])
        assert refusal(llm.engine_args, params) is rule
    message = str(err.value)
    assert message.startswith(rule.reason)  # compat's reason, not an older check's
    for name in rule.settings:  # every setting, in the reason and with its value
        assert re.search(rf"(?<![\w.]){name}(?!\w)", rule.reason), name
        assert f"{name}=" in message.removeprefix(rule.reason), name


def test_the_readme_table_is_the_rendered_rules():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert README_BEGIN in readme and README_END in readme
    table = readme.split(README_BEGIN, 1)[1].split(README_END, 1)[0]
    assert table == render_markdown(), "regenerate it: python -m sim.engine.compat README.md"
    assert with_table(readme) == readme
    assert render_markdown().count("\n") == len(RULES) + 2  # a row per rule, under the header
