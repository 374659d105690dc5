"""Schedulers: which requests run each step and with how many tokens.

`SCHEDULERS` maps the engine argument `scheduler=` to a scheduler class.
"""

from batching.continuous import ContinuousScheduler
from batching.static import StaticScheduler

SCHEDULERS = {
    "static": StaticScheduler,
    "continuous": ContinuousScheduler,
}

__all__ = ["SCHEDULERS", "ContinuousScheduler", "StaticScheduler"]
