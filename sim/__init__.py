"""infersim: real tokens and simulated time in one run.

`from sim import LLM, SamplingParams` is the front door (vLLM's names). The package stays light:
names are imported on first use, so `import sim.core.request` does not pull in the engine.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY: dict[str, str] = {
    "LLM": "sim.engine.llm",
    "SamplingParams": "sim.core.request",
    "RequestOutput": "sim.core.request",
    "CompletionOutput": "sim.core.request",
    "ModelConfig": "sim.core.model_config",
    "resolve_model": "sim.model.zoo",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sim' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
