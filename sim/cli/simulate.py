"""`infersim simulate`: build the engine and workload from flags, run, print, write JSON.

The flags and the result JSON follow `vllm bench serve` (vLLM's `vllm/benchmarks/serve.py` and
`vllm/benchmarks/datasets.py`), so scripts and tooling written for it read a simulated run: the
run metadata, the per-request arrays, `--goodput`, `--percentile-metrics` and
`--metric-percentiles` keys, beside infersim's own keys (queueing delay, rejections, steps).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from cache.contiguous import ContiguousKVCache
from sim.cli.main import DATASET_NAMES, PERCENTILE_METRICS, engine_args_from
from sim.core.errors import ConfigError, InfersimError
from sim.core.request import Request
from sim.engine.engine import Engine
from sim.engine.records import SimulationResult, request_times
from sim.metrics.collector import RequestTimes
from sim.metrics.summary import fragmentation_keys, padding_keys
from sim.metrics.trace_export import write_trace
from sim.workload.shared_prefix import shared_prefix_workload
from sim.workload.specs import (
    ArrivalProcess,
    FixedLength,
    LengthDistribution,
    RequestSpec,
    UniformLength,
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
    if ns.dataset_path and ns.request_rate is None and ns.dataset_name != "sharegpt":
        check_burstiness(ns.burstiness, shapes_gaps=False)
        return None
    return arrivals_from_rate(math.inf if ns.request_rate is None else ns.request_rate,
                              ns.burstiness)


def dataset_name(ns: argparse.Namespace) -> str:
    """`--dataset-name`, or the one the older flags imply; a contradiction is refused."""
    implied = ("azure-conv" if ns.dataset_path else
               "shared-prefix" if ns.shared_prefix_len else "random")
    name: str = ns.dataset_name or implied
    if name not in DATASET_NAMES:
        raise ConfigError(f"--dataset-name {name!r} is not offered; choose one of "
                          f"{', '.join(DATASET_NAMES)}")
    if name in ("azure-conv", "azure-code") and not ns.dataset_path:
        raise ConfigError(f"--dataset-name {name} reads an Azure trace CSV; give its path with "
                          "--dataset-path")
    if ns.sharegpt_output_len is not None and name != "sharegpt":
        raise ConfigError(f"--sharegpt-output-len needs --dataset-name sharegpt, not {name}")
    if name not in ("azure-conv", "azure-code", "sharegpt") and ns.dataset_path:
        raise ConfigError(f"--dataset-path is an Azure trace, but --dataset-name is {name}; "
                          "use --dataset-name azure-conv or azure-code, or drop --dataset-path")
    if name == "shared-prefix" and ns.shared_prefix_len < 1:
        raise ConfigError(f"--dataset-name shared-prefix needs --shared-prefix-len >= 1 "
                          f"(system-prompt tokens), got {ns.shared_prefix_len}")
    if name != "shared-prefix" and ns.shared_prefix_len:
        raise ConfigError(f"--shared-prefix-len builds a shared-prefix workload, but "
                          f"--dataset-name is {name}; use --dataset-name shared-prefix")
    return name


def random_lengths(length: int, range_ratio: float, what: str) -> LengthDistribution:
    """vLLM's random-dataset rule (`RandomDataset` in `vllm/benchmarks/datasets.py`): uniform
    integers in [floor(length x (1 - r)), ceil(length x (1 + r))], 0 <= r < 1. vLLM takes the
    tokenizer's special tokens off the input length first; the simulated prompts have none.
    vLLM clamps the output's low end to 1; a prompt must have a token too, so an input low
    end below 1 is refused rather than clamped."""
    if not (isinstance(range_ratio, float) and 0.0 <= range_ratio < 1.0):
        raise ConfigError(f"--random-range-ratio must be in [0, 1) (vLLM's rule), got "
                          f"{range_ratio!r}")
    if length < 1:
        raise ConfigError(f"--random-{what}-len must be >= 1 token, got {length}")
    low = math.floor(length * (1 - range_ratio))
    high = math.ceil(length * (1 + range_ratio))
    if what == "output":
        low = max(low, 1)
    elif low < 1:
        raise ConfigError(f"--random-input-len {length} with --random-range-ratio "
                          f"{range_ratio} allows {low}-token prompts; raise the length or "
                          "lower the ratio")
    return FixedLength(length) if low == high else UniformLength(low, high)


def build_workload(ns: argparse.Namespace, arrival: ArrivalProcess | None,
                   vocab_size: int) -> tuple[Iterable[RequestSpec], int]:
    """The workload the flags describe (an Azure trace, ShareGPT, shared-prefix or random
    synthetic) and its number of requests. `vocab_size` bounds the token ids."""
    name = dataset_name(ns)
    if name == "sharegpt":
        from sim.workload.sharegpt import sample_sharegpt, sharegpt_workload, smollm2_tokenizer

        if arrival is None:
            raise InfersimError("ShareGPT needs an arrival process; see arrival_from_flags")
        total = ns.num_prompts or 100
        tokenizer = smollm2_tokenizer()
        pairs = sample_sharegpt(total, tokenizer, seed=ns.seed, path=ns.dataset_path,
                                output_len=ns.sharegpt_output_len)
        # real token ids only for a model that reads SmolLM2's vocabulary (else out of range)
        ids_fit = tokenizer is not None and tokenizer.vocab_size <= vocab_size
        return sharegpt_workload(pairs, arrival, seed=ns.seed, with_token_ids=ids_fit), total
    if name in ("azure-conv", "azure-code"):
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
    # a ratio of 0 keeps the plain integer lengths (the goldens' workloads stay identical)
    input_len = random_lengths(ns.input_len, ns.random_range_ratio, "input")
    output_len = random_lengths(ns.output_len, ns.random_range_ratio, "output")
    if name == "shared-prefix":
        return shared_prefix_workload(
            total, arrival, ns.shared_prefix_len, input_len, output_len,
            vocab_size=vocab_size, num_system_prompts=ns.num_system_prompts,
            seed=ns.seed), total
    return make_workload(total, arrival, input_len, output_len, seed=ns.seed), total


GOODPUT_KEYS = ("ttft", "tpot", "e2el")


def parse_goodput(ns: argparse.Namespace) -> dict[str, float]:
    """`--goodput KEY:VALUE ...` (ms, vLLM's syntax) merged with `--slo-ttft-ms/--slo-tpot-ms`,
    as SLOs in seconds by metric. A key given twice with two values is refused."""
    slos_ms: dict[str, float] = {}
    for item in ns.goodput or ():
        key, sep, value = item.partition(":")
        if not sep or key not in GOODPUT_KEYS:
            raise ConfigError(f"--goodput {item!r}: write KEY:VALUE with KEY one of "
                              f"{', '.join(GOODPUT_KEYS)} and VALUE in ms, e.g. ttft:200")
        try:
            ms = float(value)
        except ValueError:
            raise ConfigError(f"--goodput {item!r}: {value!r} is not a number of ms") from None
        if not (math.isfinite(ms) and ms >= 0):
            raise ConfigError(f"--goodput {item!r}: the SLO must be finite and >= 0 ms")
        if key in slos_ms and slos_ms[key] != ms:
            raise ConfigError(f"--goodput gives {key} twice ({slos_ms[key]:g} and {ms:g} ms); "
                              "keep one")
        slos_ms[key] = ms
    for key, flag in (("ttft", "slo_ttft_ms"), ("tpot", "slo_tpot_ms")):
        ms = getattr(ns, flag)
        if ms is None:
            continue
        if key in slos_ms and slos_ms[key] != ms:
            raise ConfigError(f"--{flag.replace('_', '-')} {ms:g} contradicts --goodput "
                              f"{key}:{slos_ms[key]:g}; keep one")
        slos_ms[key] = ms
    return {key: ms / 1e3 for key, ms in slos_ms.items()}


def parse_percentiles(ns: argparse.Namespace) -> tuple[list[str], list[float]]:
    """`--percentile-metrics` and `--metric-percentiles`, checked."""
    metrics = [m.strip() for m in ns.percentile_metrics.split(",") if m.strip()]
    for m in metrics:
        if m not in PERCENTILE_METRICS:
            raise ConfigError(f"--percentile-metrics: unknown metric {m!r}; choose from "
                              f"{', '.join(PERCENTILE_METRICS)}")
    percentiles = []
    for text in ns.metric_percentiles.split(","):
        try:
            p = float(text)
        except ValueError:
            raise ConfigError(f"--metric-percentiles: {text!r} is not a number") from None
        if not (0 < p <= 100):
            raise ConfigError(f"--metric-percentiles: {text!r} must be in (0, 100]")
        percentiles.append(p)
    return metrics, percentiles


@dataclass
class PerRequest:
    """What `vllm bench serve` writes per request, gathered as each request ends (`on_finish`),
    in finish order. Failed (rejected, aborted) requests carry an error and no tokens, as
    vLLM's failed requests do."""

    arrival_s: list[float] = field(default_factory=list)
    finished_s: list[float] = field(default_factory=list)
    input_lens: list[int] = field(default_factory=list)
    output_lens: list[int] = field(default_factory=list)
    ttfts_s: list[float] = field(default_factory=list)
    tpots_s: list[float] = field(default_factory=list)
    itls_s: list[list[float]] = field(default_factory=list)
    token_times_s: list[list[float]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def add(self, req: Request) -> None:
        t = request_times(req)
        ok = t.finish_reason not in ("rejected", "aborted")
        self.arrival_s.append(t.arrival_s)
        self.finished_s.append(t.finished_s if ok else t.arrival_s)
        self.input_lens.append(t.num_prompt_tokens)
        self.output_lens.append(t.num_output_tokens if ok else 0)
        self.ttfts_s.append(t.first_token_s - t.arrival_s if ok else 0.0)
        # vLLM's TPOT excludes the first token; 0 for a one-token output
        n = t.num_output_tokens
        self.tpots_s.append((t.finished_s - t.first_token_s) / (n - 1) if ok and n > 1 else 0.0)
        self.itls_s.append(t.itls_s().tolist() if ok else [])
        self.token_times_s.append(list(t.token_times_s) if ok else [])
        self.errors.append("" if ok else (t.reject_reason or t.finish_reason))

    def good(self, slos_s: dict[str, float]) -> np.ndarray:
        """Completed requests meeting every SLO (vLLM's goodput rule). [num]"""
        ok = np.array([not e for e in self.errors], dtype=bool)  # [num]
        measured = {"ttft": np.array(self.ttfts_s), "tpot": np.array(self.tpots_s),
                    "e2el": np.array(self.finished_s) - np.array(self.arrival_s)}
        for key, slo_s in slos_s.items():
            ok &= measured[key] <= slo_s
        return ok

    def peaks(self) -> tuple[float, int]:
        """vLLM's `max_output_tokens_per_s` and `max_concurrent_requests`: output tokens, and
        requests in flight, in whole 1-second buckets from the first arrival, the busiest
        bucket of each."""
        if not self.arrival_s:
            return 0.0, 0
        start_s = min(self.arrival_s)
        end_s = max(self.finished_s)
        num_buckets = int(end_s - start_s) + 1
        tokens = np.zeros(num_buckets, dtype=np.int64)  # [num_buckets]
        in_flight = np.zeros(num_buckets + 1, dtype=np.int64)  # [num_buckets + 1] deltas
        for times_s in self.token_times_s:
            if times_s:
                idx = ((np.asarray(times_s) - start_s).astype(np.int64))  # [num_tokens]
                np.add.at(tokens, np.minimum(idx, num_buckets - 1), 1)
        for a_s, f_s, err in zip(self.arrival_s, self.finished_s, self.errors, strict=True):
            if err:
                continue
            in_flight[int(a_s - start_s)] += 1
            in_flight[min(int(f_s - start_s), num_buckets - 1) + 1] -= 1
        return float(tokens.max()), int(np.cumsum(in_flight)[:-1].max())


def _pct_name(p: float) -> str:
    # vLLM's spelling: p99, p99.9
    return str(int(p)) if int(p) == p else str(p)


def vllm_keys(ns: argparse.Namespace, per: PerRequest, slos_s: dict[str, float],
              duration_s: float, metrics: list[str], percentiles: list[float]) -> dict[str, Any]:
    """The keys `vllm bench serve --save-result` writes (vLLM `vllm/benchmarks/serve.py`) that
    infersim's summary lacks: run metadata, the per-request arrays, goodput over every SLO
    given, the peaks, and mean/median/std/p<N> of each `--percentile-metrics` metric."""
    good = per.good(slos_s)
    peak_tokens_per_s, peak_requests = per.peaks()
    rate = math.inf if ns.request_rate is None else ns.request_rate
    completed = [i for i, e in enumerate(per.errors) if not e]
    out: dict[str, Any] = {
        "date": datetime.datetime.now().strftime("%Y%m%d-%H%M%S"),
        "backend": "infersim",
        "model_id": ns.model,
        "tokenizer_id": ns.model,
        "num_prompts": len(per.errors),
        "request_rate": rate if math.isfinite(rate) else "inf",
        "burstiness": ns.burstiness,
        "max_concurrency": ns.max_concurrency,
        "request_goodput": (float(good.sum()) / duration_s if slos_s and duration_s > 0
                            else None),
        # infersim's share of all requests (rejected and aborted included) meeting every SLO
        "goodput_fraction": float(good.sum()) / len(per.errors) if slos_s and per.errors else None,
        "max_output_tokens_per_s": peak_tokens_per_s,
        "max_concurrent_requests": peak_requests,
        "input_lens": per.input_lens,
        "output_lens": per.output_lens,
        "ttfts": per.ttfts_s,
        "itls": per.itls_s,
        # the simulator reports token counts, not detokenized text
        "generated_texts": ["" for _ in per.errors],
        "errors": per.errors,
    }
    values_s = {
        "ttft": np.array([per.ttfts_s[i] for i in completed]),
        "tpot": np.array([per.tpots_s[i] for i in completed]),
        "itl": np.array([x for i in completed for x in per.itls_s[i]]),
        "e2el": np.array([per.finished_s[i] - per.arrival_s[i] for i in completed]),
    }
    for metric in metrics:
        v_ms = values_s[metric] * 1e3  # [num]
        # vLLM: `np.mean(x or 0)`; an empty metric reads 0 there, null here (no data)
        has = v_ms.size > 0
        out[f"mean_{metric}_ms"] = float(v_ms.mean()) if has else None
        out[f"median_{metric}_ms"] = float(np.median(v_ms)) if has else None
        out[f"std_{metric}_ms"] = float(v_ms.std()) if has else None
        for p in percentiles:
            out[f"p{_pct_name(p)}_{metric}_ms"] = float(np.percentile(v_ms, p)) if has else None
    return out


def check_result_path(path: Path, flag: str = "--result-json") -> None:
    """Refuse a `flag` output path that could not be written, before the run rather than after
    it: a directory, a missing parent under a file, or a parent (or file) without write access.
    Missing parent folders are fine (they are created)."""
    where = f"{flag} {str(path)!r}"
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
    dataset_name(ns)
    slos_s = parse_goodput(ns)
    metrics, percentiles = parse_percentiles(ns)
    arrival = arrival_from_flags(ns)
    to_stdout = ns.result_json == "-"
    if ns.result_json and not to_stdout:
        check_result_path(Path(ns.result_json))
    # --trace-json (sim.metrics.trace_export): the step series and every request's times
    trace_path = None if ns.trace_json is None else Path(ns.trace_json)
    if trace_path is not None:
        check_result_path(trace_path, "--trace-json")
    traced: list[RequestTimes] = []
    engine = Engine(engine_args_from(ns))
    vocab = (engine.functional_model.config.n_vocab if ns.mode == "functional"
             else engine.model_config.n_vocab)
    workload, total = build_workload(ns, arrival, vocab)
    bar = tqdm(total=total, desc="requests", unit="req", disable=ns.no_progress,
               file=sys.stderr, mininterval=0.5)
    # the per-request arrays only when a result JSON asks for them (memory stays flat otherwise)
    per = PerRequest()

    def finished(req: Request) -> None:
        bar.update()
        if ns.result_json:
            per.add(req)
        if trace_path is not None:
            traced.append(request_times(req))

    try:
        result = engine.run(workload, keep_requests=False, on_finish=finished,
                            max_concurrency=ns.max_concurrency,
                            record_steps=trace_path is not None)
    finally:
        bar.close()
    summary = result.metrics.summary(slo_ttft_s=slos_s.get("ttft"), slo_tpot_s=slos_s.get("tpot"))
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
    if "e2el" in slos_s:
        good = per.good(slos_s) if ns.result_json else None
        say("goodput with the e2el SLO: in the result JSON" if good is None else
            f"requests meeting every SLO (ttft, tpot, e2el): {int(good.sum())}")
    if trace_path is not None:
        write_trace(trace_path, result.steps, traced, engine.plan.pp, result.description)
        say(f"wrote {trace_path} (open it in ui.perfetto.dev)")
    if ns.result_json:
        payload = summary.to_benchmark_json()
        payload.update(vllm_keys(ns, per, slos_s, summary.duration_s, metrics, percentiles))
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
