"""Shared fixtures: the Azure traces and measured data live in ../shared beside the project."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def conv_trace():
    path = SHARED / "traces" / "azure_llm_2023_conv.csv"
    if not path.exists():
        pytest.skip(f"the Azure conv trace is not at {path} (it lives in ../shared/traces/)")
    from sim.workload import load_azure_trace

    return load_azure_trace(path)
