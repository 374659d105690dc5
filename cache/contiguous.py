"""Contiguous KV reservation: each admitted request reserves one slab for its maximum length.

The pre-PagedAttention baseline (FasterTransformer; Orca "Max"): memory for `max_model_len` tokens
is reserved when a request is admitted, whatever it will really use, so memory sits
reserved-but-unused (internal fragmentation) and fewer requests run at once.

References: Kwon et al., SOSP'23 (vLLM), section 3 and Fig. 2 (waste of contiguous reservation);
Yu et al., OSDI'22 (Orca).
"""

from __future__ import annotations

from sim.request import Request


class ContiguousKVCache:
    """Reserve `max_model_len` tokens per request out of a pool of `num_kv_tokens`."""

    retains_kv = True

    def __init__(self, num_kv_tokens: int, max_model_len: int) -> None:
        if num_kv_tokens < 0 or max_model_len < 1:
            raise ValueError("num_kv_tokens must be >= 0 and max_model_len >= 1")
        self.num_kv_tokens = num_kv_tokens
        self.max_model_len = max_model_len
        self._reserved: dict[str, int] = {}  # request_id -> reserved tokens
        self._used: dict[str, int] = {}  # request_id -> tokens with KV
        self._num_reserved = 0

    def reservation_tokens(self, request: Request) -> int:
        return self.max_model_len

    def never_fits(self, request: Request, max_len: int) -> str | None:
        need = self.reservation_tokens(request)
        if need > self.num_kv_tokens:
            return (
                f"larger than the KV cache: a contiguous reservation of {need} tokens > the "
                f"whole KV cache "
                f"({self.num_kv_tokens} tokens); lower max_model_len or use a larger GPU"
            )
        return None

    def allocate(self, request: Request, num_tokens: int) -> bool:
        rid = request.request_id
        reserved = self._reserved.get(rid)
        if reserved is None:
            reserved = self.reservation_tokens(request)
            if num_tokens > reserved or reserved > self.num_free_tokens():
                return False
            self._reserved[rid] = reserved
            self._num_reserved += reserved
        elif num_tokens > reserved:
            return False
        self._used[rid] = max(self._used.get(rid, 0), num_tokens)
        return True

    def free(self, request: Request) -> None:
        self._num_reserved -= self._reserved.pop(request.request_id, 0)
        self._used.pop(request.request_id, None)

    def num_free_tokens(self) -> int:
        return self.num_kv_tokens - self._num_reserved

    def num_used_tokens(self) -> int:
        return sum(self._used.values())

    def num_reserved_tokens(self) -> int:
        return self._num_reserved
