"""`infersim simulate`: build the engine and workload from flags, run, print, write JSON."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from tqdm.auto import tqdm

from cache.contiguous import ContiguousKVCache
from sim.cli.main import engine_args_from
from sim.core.errors import InfersimError
from sim.engine.engine import Engine
from sim.engine.records import SimulationResult
from sim.metrics.summary import fragmentation_keys, padding_keys
from sim.workload.shared_prefix import shared_prefix_workload
from sim.workload.specs import (
    ArrivalProcess,
    RequestSpec,
    arrivals_from_rate,
    check_burstiness,
    load_azure_trace,
    make_workload,
    workload_from_trace,
)


def baseline_accounting(result: SimulationResult, scheduler: str) -> dict[str, object]:
    """The baselines' own waste, for the table and the result JSON: a request-level batch's
    padding (token-steps priced vs computed) and the contiguous KV pool's breakdown at its peak
    (used / reserved-unused / internal / external / free, summed over lanes)."""
    keys: dict[str, object] = {}
    if scheduler in ("static", "dynamic"):
        keys.update(padding_keys(result.stats.num_tokens_priced,
                                 result.stats.num_tokens_computed))
    peaks = [kv.peak_fragmentation() for kv in result.kv_managers
             if isinstance(kv, ContiguousKVCache)]
    if peaks:
        keys.update(fragmentation_keys({part: sum(p[part] for p in peaks) for part in peaks[0]}))
    return keys

def arrival_from_flags(ns: argparse.Namespace) -> ArrivalProcess | None:
    """The arrival process `--request-rate` and `--burstiness` describe; None when a trace
    (`--dataset-path` without `--request-rate`) replays its own timestamps.

    Checked before the engine is built, so a bad value is a one-line error (exit 2) at once.
    Every workload kind takes its arrivals from here: gamma gaps of shape `--burstiness`.
    """
    if ns.dataset_path and ns.request_rate is None:
        check_burstiness(ns.burstiness, shapes_gaps=False)
        return None
    return arrivals_from_rate(math.inf if ns.request_rate is None else ns.request_rate,
                              ns.burstiness)


def build_workload(ns: argparse.Namespace, arrival: ArrivalProcess | None,
                   vocab_size: int) -> tuple[Iterator[RequestSpec], int]:
    """The workload the flags describe (an Azure trace, shared-prefix or plain synthetic) and
    its number of requests. `vocab_size` bounds the shared-prefix token ids."""
    if ns.dataset_path:
        trace = load_azure_trace(ns.dataset_path, limit=ns.num_prompts)
        total = ns.num_prompts or len(trace)
        # The trace function turns the rate into arrivals itself (arrivals_from_rate, the
        # same rule `arrival` passed), or replays the trace's timestamps without a rate.
        return workload_from_trace(trace, num_requests=total, request_rate=ns.request_rate,
                                   seed=ns.seed, burstiness=ns.burstiness), total
    if arrival is None:
        raise InfersimError("a synthetic workload needs an arrival process; see "
                            "arrival_from_flags")
    total = ns.num_prompts or 100
    if ns.shared_prefix_len:
        return shared_prefix_workload(
            total, arrival, ns.shared_prefix_len, ns.input_len, ns.output_len,
            vocab_size=vocab_size, num_system_prompts=ns.num_system_prompts,
            seed=ns.seed), total
    return make_workload(total, arrival, ns.input_len, ns.output_len, seed=ns.seed), total


def check_result_path(path: Path) -> None:
    """Refuse a `--result-json` path that could not be written, before the run rather than after
    it: a directory, a missing parent under a file, or a parent (or file) without write access.
    Missing parent folders are fine (they are created)."""
    where = f"--result-json {str(path)!r}"
    if path.is_dir():
        raise InfersimError(f"{where} is a directory; name a file in it, e.g. {path / 'result.json'}")
    if path.exists() and not os.access(path, os.W_OK):
        raise InfersimError(f"{where} exists and is not writable; choose another path")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:  # the nearest folder that exists
        parent = parent.parent
    if not parent.is_dir():
        raise InfersimError(f"{where}: {str(parent)!r} is a file, not a folder; choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InfersimError(f"{where}: folder {str(parent)!r} is not writable; choose another "
                            "path, or '-' for stdout")


def run_simulate(ns: argparse.Namespace) -> int:
    if ns.num_prompts is not None and ns.num_prompts < 1:
        raise InfersimError(f"--num-prompts must be at least 1, got {ns.num_prompts}")
    if ns.shared_prefix_len and ns.dataset_path:
        raise InfersimError("--shared-prefix-len builds a synthetic workload; drop --dataset-path")
    arrival = arrival_from_flags(ns)
    to_stdout = ns.result_json == "-"
    if ns.result_json and not to_stdout:
        check_result_path(Path(ns.result_json))
    engine = Engine(engine_args_from(ns))
    vocab = (engine.functional_model.config.n_vocab if ns.mode == "functional"
             else engine.model_config.n_vocab)
    workload, total = build_workload(ns, arrival, vocab)
    bar = tqdm(total=total, desc="requests", unit="req", disable=ns.no_progress,
               file=sys.stderr, mininterval=0.5)
    try:
        result = engine.run(workload, keep_requests=False, on_finish=lambda _: bar.update())
    finally:
        bar.close()
    slo_ttft_s = None if ns.slo_ttft_ms is None else ns.slo_ttft_ms / 1e3
    slo_tpot_s = None if ns.slo_tpot_ms is None else ns.slo_tpot_ms / 1e3
    summary = result.metrics.summary(slo_ttft_s=slo_ttft_s, slo_tpot_s=slo_tpot_s)
    stats = result.stats
    summary.extra.update(baseline_accounting(result, ns.scheduler))
    # `--result-json -` (vLLM's convention) puts the JSON alone on stdout, so the report
    # moves to stderr and `infersim simulate ... --result-json - | jq` reads clean JSON
    def say(*args: object) -> None:
        print(*args, file=sys.stderr if to_stdout else sys.stdout)

    say(result.description)
    say(f"memory: {engine.num_kv_tokens} KV tokens ({engine.num_kv_blocks} blocks of "
        f"{engine.args.block_size}); max_model_len={engine.max_model_len}, "
        f"max_num_batched_tokens={engine.max_num_batched_tokens}")
    say(summary.format_table())
    if engine.args.enable_prefix_caching and summary.total_input_tokens:
        say(f"prefix cache: {summary.total_cached_prompt_tokens / summary.total_input_tokens:.1%}"
            " of prompt tokens hit")
    say(f"engine steps: {stats.num_steps}, busy {stats.busy_s:.2f} s simulated; "
        f"wall {result.wall_s:.2f} s ({total / max(result.wall_s, 1e-9):,.0f} requests/s, "
        f"{stats.num_tokens_computed / max(result.wall_s, 1e-9):,.0f} tokens/s simulated)")
    if ns.result_json:
        payload = summary.to_benchmark_json()
        payload.update({
            "model_id": ns.model, "hardware": ns.hardware, "mode": ns.mode,
            "kv_cache": ns.kv_cache, "scheduler": ns.scheduler, "description": result.description,
            "num_steps": stats.num_steps, "wall_s": result.wall_s,
            "num_preemptions": stats.num_preemptions, "swap_s": stats.swap_s,
        })
        text = json.dumps(payload, indent=2)
        if to_stdout:
            print(text)
        else:
            Path(ns.result_json).parent.mkdir(parents=True, exist_ok=True)
            Path(ns.result_json).write_text(text, encoding="utf-8")
            say(f"wrote {ns.result_json}")
    return 0
