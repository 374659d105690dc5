"""The no-KV-cache baseline: nothing is kept between steps, so every step recomputes every token.

This is how a transformer decodes without the cache (e.g. picoGPT, or HF `generate` with
`use_cache=False`): step t processes all t tokens again, O(n^2) work over a sequence instead of
O(n). The scheduler sees `retains_kv = False` and resets each request's progress counter to 0
after every step; the cost model then prices the whole sequence as new tokens.

References: Pope et al., "Efficiently Scaling Transformer Inference" (MLSys'23), section 2 on KV
caching; Karpathy's picoGPT.
"""

from __future__ import annotations

from sim.core.request import Request
from sim.core.step import NO_KV_WORK, ScheduledSeq, StepKV
from sim.core.usage import KVMemoryUsage


class NoKVCache:
    retains_kv = False

    def never_fits(self, request: Request, max_len: int) -> str | None:
        return None

    def cached_prefix(self, request: Request) -> int:
        return 0

    def allocate(self, request: Request, num_tokens: int, num_cached_tokens: int = 0) -> bool:
        return True

    def preempt(self, request: Request) -> bool:
        return False

    def capacity(self, request: Request) -> int:
        return 0

    def usage(self) -> KVMemoryUsage:
        return KVMemoryUsage(0, 0, 0, 0, 0)

    def free(self, request: Request) -> None:
        return None

    def num_free_tokens(self) -> int:
        return 0

    def num_used_tokens(self) -> int:
        return 0

    def num_reserved_tokens(self) -> int:
        return 0

    def take_step_kv(self, seqs: tuple[ScheduledSeq, ...]
                     ) -> tuple[tuple[ScheduledSeq, ...], StepKV]:
        """No KV is kept between steps: nothing to copy or price, no view to give."""
        return seqs, NO_KV_WORK
