"""Schedulers: which requests run each step and with how many tokens.

`SCHEDULERS` maps the engine argument `scheduler=` to a scheduler class.
"""

from collections.abc import Callable

from batching.base import Scheduler
from batching.continuous import ContinuousScheduler
from batching.static import StaticScheduler

SCHEDULERS: dict[str, Callable[..., Scheduler]] = {
    "static": StaticScheduler,
    "continuous": ContinuousScheduler,
}

__all__ = ["SCHEDULERS", "ContinuousScheduler", "StaticScheduler"]
