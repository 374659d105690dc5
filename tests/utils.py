"""Helpers for tests that drive an engine's parts directly instead of through `Engine.run`.

Follows vLLM's `tests/v1/core/utils.py:create_scheduler`: one call builds the engine (its limits,
stop criteria, cost model) and hands back a KV manager and a scheduler built as the engine's own
lanes build theirs (`sim.engine.build.build_kv_manager` / `build_scheduler`), for tests that
schedule, commit and check the KV accounting step by step.
"""

from __future__ import annotations

from typing import Any

from sim.core.protocols import KVCacheManager, Scheduler
from sim.engine.args import EngineArgs
from sim.engine.build import build_kv_manager, build_scheduler
from sim.engine.engine import Engine


def create_scheduler(num_blocks: int | None = None, **engine_args: Any
                     ) -> tuple[Engine, KVCacheManager, Scheduler]:
    """`(engine, kv, scheduler)` for `EngineArgs(**engine_args)`, in timing mode unless `mode`
    is given (no NumPy model to build). `num_blocks` sizes the KV pool apart from the engine's
    (which must hold `max_model_len` tokens), e.g. a few blocks to provoke preemption."""
    engine = Engine(EngineArgs.from_kwargs(**{"mode": "timing", **engine_args}))
    kv = build_kv_manager(engine, num_blocks)
    return engine, kv, build_scheduler(engine, kv)
