"""Which features combine: the refusal rules, as data, checked before anything is built.

A combination of features is itself a feature. Either it gives what its parts give alone
(`tests/test_composition.py` holds every pair of non-default settings, and a sample of triples,
to the plain path's tokens under the same lossy settings) or it is refused here, when the
engine arguments are made, with a reason that names every setting involved, the values given
and the way out. A refusal is a `Rule`: the settings it concerns, a predicate over
`EngineArgs` (and, for request-level features such as beam search, the request's
`SamplingParams`), and its reason. `check_compatible` raises `ConfigError` with the first rule
that applies; `render_markdown` renders the rules as the README's table of unsupported
combinations (a test keeps the two equal).

Engine-level rules run when an `EngineArgs` is made (and again when an `Engine` is built);
request-level rules run when the engine makes a request from `SamplingParams`
(`Engine.make_request`), so a bad combination fails before a run starts, never half-way
through one.

References: vLLM `vllm/config/__init__.py` (`VllmConfig.__post_init__` and the configs'
`verify_with_parallel_config`: cross-setting checks run once, when the configs are built).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sim.core.errors import ConfigError
from sim.core.request import SamplingParams
from speculative.config import SpeculativeConfig

if TYPE_CHECKING:
    from sim.engine.args import EngineArgs

#: the request-level settings (looked up on `SamplingParams`, not on `EngineArgs`)
REQUEST_SETTINGS = frozenset(f.name for f in dataclasses.fields(SamplingParams))

Predicate = Callable[["EngineArgs", SamplingParams | None], bool]


@dataclass(frozen=True)
class Rule:
    """One refused combination.

    `settings` are `EngineArgs` field names (or, for a request-level rule, `SamplingParams`
    ones); `combination` says in markdown when the rule applies; `reason` says why and what to
    do instead, naming every setting in `settings`; `applies` decides it; `example` (engine
    keyword arguments) and `request` (`SamplingParams` keyword arguments, request-level rules
    only) are a combination it refuses, which the tests build."""

    settings: tuple[str, ...]
    combination: str
    reason: str
    applies: Predicate
    example: dict[str, Any]
    request: dict[str, Any] = field(default_factory=dict)

    @property
    def request_level(self) -> bool:
        return bool(self.request)


def _sharded(a: EngineArgs) -> bool:
    """One replica spans several GPUs (each size checked alone: a bad size is not a plan)."""
    return a.tensor_parallel_size > 1 or a.pipeline_parallel_size > 1


def _quantized_kv(a: EngineArgs) -> bool:
    return a.kv_cache_dtype != "auto"


def _timing_acceptance(a: EngineArgs) -> bool:
    """The speculative config gives acceptance for timing-only runs (a rate or a trace)."""
    cfg = a.speculative_config
    return cfg is not None and (cfg.acceptance_rate is not None
                                or cfg.acceptance_trace is not None)


def _beam(p: SamplingParams | None) -> bool:
    return p is not None and p.use_beam_search


_SPEC = {"method": "ngram", "num_speculative_tokens": 2}
_SPEC_TIMING = {**_SPEC, "acceptance_rate": 0.7}
_SPEC_TREE = {"method": "draft_model", "draft_noise_scale": 0.1, "tree": (2, 2)}
_SPEC_DRAFT_TP = {"method": "draft_model", "draft_noise_scale": 0.1,
                  "draft_tensor_parallel_size": 4}
_BEAM = {"n": 2, "use_beam_search": True, "temperature": 0.0}

RULES: tuple[Rule, ...] = (
    # -- the KV cache layout --------------------------------------------------------------
    Rule(("enable_prefix_caching", "kv_cache"),
         "`enable_prefix_caching=True` with `kv_cache` other than `'paged'`",
         "enable_prefix_caching=True needs kv_cache='paged' (cached prefixes are shared block "
         "by block); use kv_cache='paged' or drop enable_prefix_caching",
         lambda a, p: a.enable_prefix_caching and a.kv_cache != "paged",
         {"kv_cache": "contiguous", "enable_prefix_caching": True}),
    Rule(("enable_prefix_caching", "scheduler"),
         "`enable_prefix_caching=True` with `scheduler='static'` or `'dynamic'`",
         "enable_prefix_caching=True needs scheduler='continuous': the request-level schedulers "
         "compute every prompt whole and never look a cached prefix up, so the setting would do "
         "nothing; use scheduler='continuous' or drop enable_prefix_caching",
         lambda a, p: a.enable_prefix_caching and a.scheduler != "continuous",
         {"scheduler": "static", "enable_prefix_caching": True}),
    Rule(("enable_prefix_caching", "mode", "tensor_parallel_size", "pipeline_parallel_size"),
         "`enable_prefix_caching=True` with a sharded functional model (`mode='functional'`, "
         "`tensor_parallel_size` or `pipeline_parallel_size` > 1)",
         "enable_prefix_caching=True with a sharded functional model (mode='functional' and "
         "tensor_parallel_size or pipeline_parallel_size > 1) is not supported: cached KV "
         "contents live per GPU; use mode='timing', or tensor_parallel_size = "
         "pipeline_parallel_size = 1",
         lambda a, p: a.enable_prefix_caching and a.mode == "functional" and _sharded(a),
         {"enable_prefix_caching": True, "tensor_parallel_size": 2}),
    Rule(("kv_cache_dtype", "kv_cache"),
         "an 8-bit `kv_cache_dtype` with `kv_cache='none'`",
         "kv_cache_dtype other than 'auto' needs a KV cache: kv_cache='none' keeps no KV to "
         "quantize, so the setting would do nothing; use kv_cache='paged' or 'contiguous', or "
         "kv_cache_dtype='auto'",
         lambda a, p: _quantized_kv(a) and a.kv_cache == "none",
         {"kv_cache": "none", "kv_cache_dtype": "int8"}),
    Rule(("kv_cache_dtype", "mode", "tensor_parallel_size", "pipeline_parallel_size"),
         "an 8-bit `kv_cache_dtype` with a sharded functional model (`mode='functional'`, "
         "`tensor_parallel_size` or `pipeline_parallel_size` > 1)",
         "kv_cache_dtype other than 'auto' with a sharded functional model (mode='functional' "
         "and tensor_parallel_size or pipeline_parallel_size > 1) is not supported: the per-GPU "
         "KV stores are unquantized; use mode='timing', or tensor_parallel_size = "
         "pipeline_parallel_size = 1",
         lambda a, p: _quantized_kv(a) and a.mode == "functional" and _sharded(a),
         {"kv_cache_dtype": "int8", "tensor_parallel_size": 2}),
    Rule(("preemption_mode", "kv_cache"),
         "`preemption_mode='swap'` with `kv_cache` other than `'paged'`",
         "preemption_mode='swap' needs kv_cache='paged': only paged KV blocks are swapped to "
         "host memory (the contiguous and no-cache managers preempt by recomputing), so the "
         "setting would do nothing; use kv_cache='paged' or preemption_mode='recompute'",
         lambda a, p: a.preemption_mode == "swap" and a.kv_cache != "paged",
         {"kv_cache": "contiguous", "preemption_mode": "swap"}),
    # -- KV eviction ----------------------------------------------------------------------
    Rule(("kv_eviction", "kv_cache"),
         "`kv_eviction` with `kv_cache` other than `'paged'`",
         "kv_eviction needs kv_cache='paged' (evicted blocks go back to the paged block pool); "
         "use kv_cache='paged' or drop kv_eviction",
         lambda a, p: a.kv_eviction is not None and a.kv_cache != "paged",
         {"kv_cache": "contiguous", "kv_eviction": "sliding_window"}),
    Rule(("kv_eviction", "enable_prefix_caching"),
         "`kv_eviction` with `enable_prefix_caching=True`",
         "kv_eviction does not combine with enable_prefix_caching: evicted positions are per "
         "sequence, which a shared prefix block cannot hold; turn one of them off",
         lambda a, p: a.kv_eviction is not None and a.enable_prefix_caching,
         {"kv_eviction": "sliding_window", "enable_prefix_caching": True}),
    Rule(("kv_eviction", "speculative_config"),
         "`kv_eviction` with speculative decoding (`speculative_config`)",
         "kv_eviction does not combine with speculative decoding (speculative_config): a "
         "rejected draft would have to bring back the positions its tokens evicted; turn one "
         "of them off",
         lambda a, p: a.kv_eviction is not None and a.speculative_config is not None,
         {"kv_eviction": "sliding_window", "speculative_config": _SPEC}),
    Rule(("kv_eviction", "tensor_parallel_size", "pipeline_parallel_size"),
         "`kv_eviction` with model parallelism (`tensor_parallel_size` or "
         "`pipeline_parallel_size` > 1)",
         "kv_eviction does not combine with model parallelism (tensor_parallel_size or "
         "pipeline_parallel_size > 1): the sharded KV stores keep every position (no "
         "per-GPU eviction is modelled); use tensor_parallel_size = "
         "pipeline_parallel_size = 1 or drop kv_eviction",
         lambda a, p: a.kv_eviction is not None and _sharded(a),
         {"kv_eviction": "sliding_window", "tensor_parallel_size": 2}),
    # -- batching -------------------------------------------------------------------------
    Rule(("enable_chunked_prefill", "scheduler"),
         "`enable_chunked_prefill=True` with `scheduler='static'` or `'dynamic'`",
         "enable_chunked_prefill=True needs scheduler='continuous' (chunks ride along with "
         "iteration-level decodes); use scheduler='continuous' or drop enable_chunked_prefill",
         lambda a, p: a.enable_chunked_prefill and a.scheduler != "continuous",
         {"scheduler": "static", "enable_chunked_prefill": True}),
    Rule(("scheduling_policy", "scheduler"),
         "`scheduling_policy` other than `'fcfs'` with `scheduler='static'` or `'dynamic'`",
         "scheduling_policy other than 'fcfs' needs scheduler='continuous': the request-level "
         "schedulers launch their batches in arrival order, so the setting would do nothing; "
         "use scheduler='continuous' or scheduling_policy='fcfs'",
         lambda a, p: a.scheduling_policy != "fcfs" and a.scheduler != "continuous",
         {"scheduler": "static", "scheduling_policy": "priority"}),
    Rule(("enable_chunked_prefill", "kv_cache"),
         "`enable_chunked_prefill=True` with `kv_cache='none'`",
         "enable_chunked_prefill=True needs a KV cache: with kv_cache='none' every step "
         "recomputes the whole sequence, so a prompt cannot be split across steps (one longer "
         "than max_num_batched_tokens would be rejected); use kv_cache='paged' or "
         "'contiguous', or drop enable_chunked_prefill",
         lambda a, p: a.enable_chunked_prefill and a.kv_cache == "none",
         {"kv_cache": "none", "enable_chunked_prefill": True}),
    # -- speculative decoding -------------------------------------------------------------
    Rule(("speculative_config", "scheduler"),
         "speculative decoding (`speculative_config`) with `scheduler='static'` or `'dynamic'`",
         "speculative decoding (speculative_config) needs scheduler='continuous' (draft tokens "
         "share the iteration-level token budget); use scheduler='continuous' or drop "
         "speculative_config",
         lambda a, p: a.speculative_config is not None and a.scheduler != "continuous",
         {"scheduler": "static", "speculative_config": _SPEC}),
    Rule(("speculative_config", "kv_cache"),
         "speculative decoding (`speculative_config`) with `kv_cache='none'`",
         "speculative decoding (speculative_config) verifies drafts against cached KV: use "
         "kv_cache='paged' or 'contiguous', not 'none'",
         lambda a, p: a.speculative_config is not None and a.kv_cache == "none",
         {"kv_cache": "none", "speculative_config": _SPEC}),
    Rule(("speculative_config", "pipeline_parallel_size", "data_parallel_size"),
         "speculative decoding (`speculative_config`) with `pipeline_parallel_size` or "
         "`data_parallel_size` > 1",
         "speculative decoding (speculative_config) runs on one lane (tensor parallelism is "
         "supported; pipeline stages and data-parallel replicas are not): use "
         "pipeline_parallel_size = data_parallel_size = 1, or drop speculative_config",
         lambda a, p: a.speculative_config is not None and (a.pipeline_parallel_size > 1
                                                            or a.data_parallel_size > 1),
         {"speculative_config": _SPEC, "data_parallel_size": 2}),
    Rule(("speculative_config", "tensor_parallel_size"),
         "`speculative_config` `draft_tensor_parallel_size` other than 1 or "
         "`tensor_parallel_size`",
         "speculative_config draft_tensor_parallel_size must be 1 (the draft on one rank) or "
         "tensor_parallel_size (the draft sharded over the TP group, the default), as in vLLM; "
         "use one of them or drop the key",
         lambda a, p: (a.speculative_config is not None
                       and a.speculative_config.draft_tensor_parallel_size is not None
                       and a.speculative_config.draft_tensor_parallel_size
                       not in (1, a.tensor_parallel_size)),
         {"speculative_config": _SPEC_DRAFT_TP, "tensor_parallel_size": 2}),
    Rule(("speculative_config", "tensor_parallel_size"),
         "token-tree speculation (`speculative_config` `tree`) with `tensor_parallel_size` > 1",
         "token-tree speculation (speculative_config 'tree') does not combine with "
         "tensor_parallel_size > 1: the sharded model and its per-GPU KV stores do not reproduce "
         "the unsharded tree verification (greedy tokens differ); use a chain draft (drop "
         "'tree') or tensor_parallel_size=1",
         lambda a, p: (a.speculative_config is not None and a.speculative_config.tree is not None
                       and a.tensor_parallel_size > 1),
         {"speculative_config": _SPEC_TREE, "tensor_parallel_size": 2}),
    Rule(("speculative_config", "mode"),
         "`speculative_config` with `acceptance_rate` / `acceptance_trace` in "
         "`mode='functional'`",
         "speculative_config acceptance_rate / acceptance_trace are for mode='timing'; in "
         "mode='functional' acceptance emerges from the real draft: drop them or use "
         "mode='timing'",
         lambda a, p: a.mode == "functional" and _timing_acceptance(a),
         {"speculative_config": _SPEC_TIMING}),
    Rule(("speculative_config", "mode"),
         "`speculative_config` without `acceptance_rate` / `acceptance_trace` in "
         "`mode='timing'`",
         "mode='timing' has no token values to verify drafts against: give speculative_config "
         "'acceptance_rate' (i.i.d. per token) or 'acceptance_trace' (a JSON trace from "
         "speculative.acceptance), or use mode='functional'",
         lambda a, p: (a.mode == "timing" and a.speculative_config is not None
                       and not _timing_acceptance(a)),
         {"mode": "timing", "speculative_config": _SPEC}),
    # -- request level: beam search -------------------------------------------------------
    Rule(("use_beam_search", "mode"),
         "`SamplingParams(use_beam_search=True)` in `mode='timing'`",
         "use_beam_search=True needs token values (beams are ranked by their log-"
         "probabilities), which mode='timing' does not compute: use mode='functional'",
         lambda a, p: _beam(p) and a.mode != "functional",
         {"mode": "timing"}, _BEAM),
    Rule(("use_beam_search", "speculative_config"),
         "`SamplingParams(use_beam_search=True)` with speculative decoding "
         "(`speculative_config`)",
         "use_beam_search=True does not combine with speculative decoding (speculative_config): "
         "a draft is verified along one continuation, a beam search branches at every token; "
         "drop one of them",
         lambda a, p: _beam(p) and a.speculative_config is not None,
         {"speculative_config": _SPEC}, _BEAM),
    Rule(("use_beam_search", "scheduler"),
         "`SamplingParams(use_beam_search=True)` with `scheduler='static'` or `'dynamic'`",
         "use_beam_search=True needs scheduler='continuous': beams fork and finish every round, "
         "which a request-level batch cannot seat; use scheduler='continuous'",
         lambda a, p: _beam(p) and a.scheduler != "continuous",
         {"scheduler": "static"}, _BEAM),
    Rule(("use_beam_search", "kv_eviction"),
         "`SamplingParams(use_beam_search=True)` with `kv_eviction`",
         "use_beam_search=True does not combine with kv_eviction: beams fork each other's KV "
         "blocks, and evicted positions differ per sequence; drop kv_eviction",
         lambda a, p: _beam(p) and a.kv_eviction is not None,
         {"kv_eviction": "sliding_window"}, _BEAM),
)


ENGINE_RULES = tuple(rule for rule in RULES if not rule.request_level)
REQUEST_RULES = tuple(rule for rule in RULES if rule.request_level)


def refusal(args: EngineArgs, params: SamplingParams | None = None) -> Rule | None:
    """The first engine-level rule that refuses `args`; given `params`, the first
    request-level rule that refuses a request with them on an engine built from `args` (the
    engine-level rules passed when it was built)."""
    for rule in ENGINE_RULES if params is None else REQUEST_RULES:
        if rule.applies(args, params):
            return rule
    return None


def _show(value: object) -> str:
    if isinstance(value, SpeculativeConfig):  # its one-line summary
        return f"({value.describe()})"
    return repr(value)


def check_compatible(args: EngineArgs, params: SamplingParams | None = None) -> None:
    """Raise `ConfigError` with the reason of the rule `refusal(args, params)` finds, followed
    by the values its settings have."""
    rule = refusal(args, params)
    if rule is None:
        return
    def value(name: str) -> str:
        source = params if rule.request_level and name in REQUEST_SETTINGS else args
        return f"{name}={_show(getattr(source, name))}"

    values = ", ".join(value(name) for name in rule.settings)
    raise ConfigError(f"{rule.reason} (got {values})")


def render_markdown() -> str:
    """The README's table of unsupported combinations, one row per rule."""
    lines = ["| refused combination | checked | why, and what to do instead |",
             "| --- | --- | --- |"]
    for rule in RULES:
        checked = "per request" if rule.request_level else "engine build"
        lines.append(f"| {rule.combination} | {checked} | {rule.reason} |")
    return "\n".join(lines) + "\n"


README_BEGIN, README_END = "<!-- compat-table:begin -->\n", "<!-- compat-table:end -->"


def with_table(text: str) -> str:
    """`text` (the README) with the part between its table markers replaced by the rules."""
    if README_BEGIN not in text or README_END not in text:
        raise ConfigError(f"no {README_BEGIN.strip()} ... {README_END} markers to put the "
                          "table between; add them where the table goes")
    head, rest = text.split(README_BEGIN, 1)
    return head + README_BEGIN + render_markdown() + README_END + rest.split(README_END, 1)[1]


if __name__ == "__main__":  # `python -m sim.engine.compat [README.md]`: print, or rewrite it
    import sys
    from pathlib import Path

    if len(sys.argv) > 1:
        path = Path(sys.argv[1])
        path.write_text(with_table(path.read_text()))
    else:
        print(render_markdown(), end="")
