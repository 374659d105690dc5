"""Each choice list is declared once, by the package that implements the choices, and
`EngineArgs` and the CLI take theirs from it.

For every choice-valued engine argument: `sim.engine.args.CHOICES` holds the implementing
package's own registry (not a copy), the `simulate` parser offers exactly that registry, every
value in it is accepted (from Python and from the command line) and builds and runs an engine, and
a value outside is refused with a `ConfigError` naming the argument, the value and the choices. A
registry entry added without its wiring (a name the build cannot construct, a preemption mode the
paged cache cannot run) fails the run; a list restated anywhere fails the equality.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Collection
from typing import Any

import pytest

from batching import SCHEDULER_OPTIONS, SCHEDULERS
from batching.policy import POLICIES
from cache import KV_CACHES
from cache.contiguous import RESERVATIONS
from cache.kv_eviction import KV_EVICTION_POLICIES
from cache.paged import PREEMPTION_MODES
from parallel.data import ROUTERS
from sim.cli.main import build_parser, engine_args_from
from sim.core.errors import ConfigError
from sim.core.quantization import METHODS as QUANTIZATION_METHODS
from sim.engine import args as engine_args
from sim.engine.args import CHOICES, OPTIONAL_CHOICES, EngineArgs
from sim.engine.engine import Engine
from sim.model.kv_quant import KV_CACHE_DTYPES
from sim.workload.specs import make_workload
from speculative.config import METHODS as SPECULATIVE_METHODS

#: engine argument -> the registry of the package that implements its choices (`mode` and
#: `dtype` are implemented by the engine arguments themselves)
REGISTRIES: dict[str, Collection[str]] = {
    "mode": engine_args.MODES,
    "dtype": engine_args.DTYPE_CHOICES,
    "kv_cache": KV_CACHES,
    "contiguous_reservation": RESERVATIONS,
    "preemption_mode": PREEMPTION_MODES,
    "kv_cache_dtype": KV_CACHE_DTYPES,
    "kv_eviction": KV_EVICTION_POLICIES,
    "scheduler": SCHEDULERS,
    "scheduling_policy": POLICIES,
    "data_parallel_router": ROUTERS,
    "quantization": QUANTIZATION_METHODS,
}

#: what else a value needs to take effect in a small run
COMPANIONS: dict[str, dict[str, Any]] = {
    # a pool of 160 tokens (buddy roots 128 + 32) for requests of at most 40: max_len (128)
    # runs one at a time, pow2 (64) two, and oracle (40) also two, since each exact reservation
    # still needs a free 64-token buddy chunk: it differs from pow2 in what it holds
    "contiguous_reservation": {"kv_cache": "contiguous", "max_model_len": 128,
                               "num_gpu_blocks_override": 10},
    # a pool of 8 blocks of 8 tokens for 8 requests growing to 40 tokens: some are preempted
    "preemption_mode": {"kv_cache": "paged", "block_size": 8, "num_gpu_blocks_override": 8,
                        "max_model_len": 64},
    # a budget (4 heavy + 8 recent) below the 40 tokens each request reaches: positions evicted
    "kv_eviction": {"kv_eviction_window": 8, "kv_eviction_heavy": 4},
    "data_parallel_router": {"data_parallel_size": 2},
}

#: arguments whose implementation is on the functional side too (codecs, masked attention):
#: their values also run in functional mode (a tiny NumPy proxy, a fraction of a second)
FUNCTIONAL = ("kv_cache_dtype", "kv_eviction")

CASES = [(name, value) for name, registry in REGISTRIES.items() for value in registry]


def simulate_parser() -> argparse.ArgumentParser:
    """The `infersim simulate` sub-parser, where every engine flag lives."""
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices["simulate"]


def choice_flags() -> dict[str, argparse.Action]:
    """dest -> action of every `simulate` flag that offers choices."""
    return {a.dest: a for a in simulate_parser()._actions if a.choices is not None}


def flag(name: str) -> str:
    return choice_flags()[name].option_strings[0]


def run(**kwargs: Any) -> Any:
    """An engine of `kwargs` run on 8 requests of 32 prompt and 8 output tokens, all at once."""
    return Engine(EngineArgs(**kwargs)).run(make_workload(8, math.inf, 32, 8, seed=0),
                                            record_steps=True)


def test_every_choice_valued_argument_has_one_registry():
    """The arguments with choices are the same set in `CHOICES`, on the command line and here,
    and each is an engine argument."""
    fields = {f.name for f in dataclasses.fields(EngineArgs)}
    assert set(CHOICES) == set(REGISTRIES) == set(choice_flags())
    assert set(REGISTRIES) <= fields
    defaults = {f.name: f.default for f in dataclasses.fields(EngineArgs)}
    assert {name for name in CHOICES if defaults[name] is None} == OPTIONAL_CHOICES


@pytest.mark.parametrize("name", REGISTRIES)
def test_engine_args_hold_the_registry_itself(name):
    assert CHOICES[name] is REGISTRIES[name]  # held, not restated: an added entry is seen


@pytest.mark.parametrize("name", REGISTRIES)
def test_the_cli_offers_exactly_the_registry(name):
    action = choice_flags()[name]
    assert list(action.choices) == list(REGISTRIES[name])
    assert action.default == next(f.default for f in dataclasses.fields(EngineArgs)
                                  if f.name == name)


@pytest.mark.parametrize(("name", "value"), CASES, ids=[f"{n}={v}" for n, v in CASES])
def test_every_registry_value_is_accepted_and_runs(name, value):
    """Accepted from Python and from the command line, and an engine built with it serves a
    small workload to completion (timing mode; functional too where the choice is computed)."""
    extra = COMPANIONS.get(name, {})
    argv = ["--mode", "timing", flag(name), value]
    for key, companion in extra.items():  # the companions by their flags, vLLM-spelled
        argv += [f"--{key.replace('_', '-')}", str(companion)]
    assert getattr(engine_args_from(simulate_parser().parse_args(argv)), name) == value
    modes = [value] if name == "mode" else ["timing", *(["functional"] if name in FUNCTIONAL
                                                       else [])]
    for mode in modes:
        result = run(**{**extra, "mode": mode, name: value})
        assert all(r.status.name == "FINISHED" for r in result.requests), (mode, result.requests)
        assert sum(r.num_output_tokens for r in result.requests) == 8 * 8
        if name == "preemption_mode":  # the mode ran, not only its name
            assert result.stats.num_preemptions > 0


@pytest.mark.parametrize(("name", "mode"), [("preemption_mode", "timing"),
                                          ("contiguous_reservation", "timing"),
                                          ("kv_eviction", "functional")])
def test_each_choice_runs_its_own_way(name, mode):
    """Choices an if-chain implements could fall through to another's behaviour unnoticed: under
    these settings each one serves the workload its own way (timeline, or tokens where the
    choice changes what attention reads)."""
    outcomes = {}
    for value in REGISTRIES[name]:
        result = run(**{**COMPANIONS[name], "mode": mode, name: value})
        timeline = tuple((r.first_token_s, r.finished_s, tuple(r.output_token_ids))
                         for r in result.requests)
        held = tuple(result.steps.columns()["kv_reserved_tokens"].tolist())  # [num_steps]
        outcomes[value] = (timeline, held)
    assert len(set(outcomes.values())) == len(outcomes), outcomes


@pytest.mark.parametrize("name", REGISTRIES)
def test_a_value_outside_is_refused_naming_field_value_and_choices(name):
    bad = "not_a_" + name
    with pytest.raises(ConfigError) as info:
        EngineArgs(**{name: bad})
    message = str(info.value)
    assert name in message and repr(bad) in message
    assert all(choice in message for choice in REGISTRIES[name]), message
    with pytest.raises(SystemExit):  # argparse refuses it before EngineArgs sees it
        simulate_parser().parse_args([flag(name), bad])


def test_a_near_miss_is_answered_with_the_closest_choice():
    with pytest.raises(ConfigError, match=r"kv_cache='paegd'.*did you mean 'paged'\?"):
        EngineArgs(kv_cache="paegd")
    with pytest.raises(ConfigError, match="is not one of"):
        EngineArgs(scheduling_policy=["fcfs"])  # not a name at all (unhashable): still refused


@pytest.mark.parametrize("name", sorted(OPTIONAL_CHOICES))
def test_optional_choices_accept_none(name):
    assert getattr(EngineArgs(**{name: None}), name) is None
    with pytest.raises(ConfigError, match="None"):  # the message says None turns it off
        EngineArgs(**{name: "nonexistent"})


@pytest.mark.parametrize(("name", "registry", "existing"), [
    ("kv_cache", KV_CACHES, "contiguous"),
    ("contiguous_reservation", RESERVATIONS, "pow2"),
    ("scheduling_policy", POLICIES, "priority"),
    ("data_parallel_router", ROUTERS, "least_outstanding"),
])
def test_an_entry_added_to_a_registry_is_accepted_offered_and_built(name, registry, existing,
                                                                     monkeypatch):
    """A policy registered at run time (here: an existing one under a new name) needs no second
    list: `EngineArgs` accepts it, `--help` offers it and the engine builds and runs it."""
    monkeypatch.setitem(registry, "added", registry[existing])
    assert "added" in choice_flags()[name].choices
    result = run(**{**COMPANIONS.get(name, {}), "mode": "timing", name: "added"})
    assert all(r.status.name == "FINISHED" for r in result.requests)


def test_every_scheduler_names_its_options():
    """A scheduler added to `SCHEDULERS` must say which engine arguments it takes."""
    fields = {f.name for f in dataclasses.fields(EngineArgs)}
    assert set(SCHEDULER_OPTIONS) == set(SCHEDULERS)
    for options in SCHEDULER_OPTIONS.values():
        assert set(options) <= fields


@pytest.mark.parametrize("method", SPECULATIVE_METHODS)
def test_every_speculative_method_is_accepted_and_runs(method):
    spec = {"method": method, "num_speculative_tokens": 2, "acceptance_rate": 0.5}
    ns = simulate_parser().parse_args(["--mode", "timing", "--speculative-config",
                                       f'{{"method": "{method}", "acceptance_rate": 0.5}}'])
    assert engine_args_from(ns).speculative_config.method == method
    result = run(mode="timing", speculative_config=spec)
    assert sum(r.num_output_tokens for r in result.requests) == 8 * 8


def test_a_speculative_method_outside_is_refused_naming_it_and_the_choices():
    with pytest.raises(ConfigError) as info:
        EngineArgs(speculative_config={"method": "medusa"})
    message = str(info.value)
    assert "method" in message and "'medusa'" in message
    assert all(m in message for m in SPECULATIVE_METHODS)
