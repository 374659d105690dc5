"""Schedulers: which requests run each step and with how many tokens.

`SCHEDULERS` maps the engine argument `scheduler=` to a scheduler class and `SCHEDULER_OPTIONS`
names the engine arguments each one takes; the keys of `SCHEDULERS` and of
`batching.policy.POLICIES` (`scheduling_policy=`) are the choices `EngineArgs` accepts and the
CLI offers (`sim.engine.args.CHOICES`).
"""

from collections.abc import Callable

from batching.continuous import ContinuousScheduler
from batching.static import DynamicScheduler, StaticScheduler
from sim.core.protocols import Scheduler

SCHEDULERS: dict[str, Callable[..., Scheduler]] = {
    "static": StaticScheduler,
    "dynamic": DynamicScheduler,
    "continuous": ContinuousScheduler,
}

# engine arguments each scheduler takes beyond (kv, stop, max_num_seqs, max_num_batched_tokens)
SCHEDULER_OPTIONS: dict[str, tuple[str, ...]] = {
    "static": ("max_wait_s",),
    "dynamic": ("preferred_batch_sizes", "max_queue_delay_s"),
    "continuous": ("enable_chunked_prefill", "long_prefill_token_threshold",
                   "max_num_partial_prefills", "scheduling_policy", "kv_watermark"),
}

__all__ = ["SCHEDULERS", "SCHEDULER_OPTIONS", "ContinuousScheduler", "DynamicScheduler", "StaticScheduler"]
