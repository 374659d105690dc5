"""Shared fixtures: the Azure traces and measured data live in ../shared beside the project."""

from __future__ import annotations

import os

# the NumPy model's matrices are small: one BLAS thread is faster and keeps timings stable on a
# shared 2-core machine (set before NumPy is first imported)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def conv_trace():
    path = SHARED / "traces" / "azure_llm_2023_conv.csv"
    if not path.exists():
        pytest.skip(f"the Azure conv trace is not at {path} (it lives in ../shared/traces/)")
    from sim.workload.specs import load_azure_trace

    return load_azure_trace(path)
