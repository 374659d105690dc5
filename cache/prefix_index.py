"""Prefix caching's index: which full blocks of a request are known by their chained hash.

Every full block of a request whose token ids are known gets the hash of all tokens up to its
end (`cache.block_pool.block_hashes`, chained, deterministic). Blocks are offered to the pool's
hash index once their KV is computed (`register`), looked up for a new request's prompt
(`cached_prefix`, `hit_blocks`), and the hit rate is counted. The paged manager
(`cache.paged`) owns the block tables; this owns the hashes.

References: Kwon et al., SOSP'23 (PagedAttention) section 4.4 (shared prefixes); vLLM
`vllm/v1/core/kv_cache_utils.py` (chained block hashes) and `kv_cache_manager.py`
(a hit covers at most `num_tokens - 1` tokens).
"""

from __future__ import annotations

from cache.block_pool import ROOT_HASH, BlockPool, block_hashes
from sim.core.errors import InfersimError
from sim.core.request import Request


class PrefixIndex:
    """Per request: the chained hashes of its known full blocks, and how many of its table
    entries were already offered to the pool's index."""

    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        self.block_size = pool.block_size
        self._hashes: dict[str, list[bytes]] = {}  # chained hashes of known full blocks
        self._num_registered: dict[str, int] = {}  # table entries already offered
        self.num_queried_tokens = 0  # prompt tokens of admissions that looked up the cache
        self.num_hit_tokens = 0

    @property
    def hit_rate(self) -> float:
        """Prompt tokens served from the prefix cache / prompt tokens looked up."""
        return self.num_hit_tokens / self.num_queried_tokens if self.num_queried_tokens else 0.0

    def cached_prefix(self, request: Request) -> int:
        """Tokens of the request's start whose KV is cached (whole blocks, < num_tokens)."""
        hashes = self.hashes(request, request.num_tokens)
        num = 0
        for h in hashes[: (request.num_tokens - 1) // self.block_size]:
            if self.pool.lookup(h) is None:
                break
            num += 1
        return num * self.block_size

    def hit_blocks(self, request: Request, num_cached_tokens: int) -> list[int]:
        """The pool blocks holding the request's first `num_cached_tokens` (from
        `cached_prefix`, unchanged since)."""
        if num_cached_tokens % self.block_size:
            raise InfersimError(f"allocate: num_cached_tokens={num_cached_tokens} must come from "
                                "cached_prefix() (whole blocks, prefix caching enabled)")
        hits = []
        for h in self.hashes(request, num_cached_tokens)[: num_cached_tokens // self.block_size]:
            block = self.pool.lookup(h)
            if block is None:
                raise InfersimError("allocate: the cached prefix changed since cached_prefix()")
            hits.append(block)
        return hits

    def admitted(self, request: Request, num_hit_blocks: int, count: bool) -> None:
        """A request got its first blocks, the first `num_hit_blocks` from the cache (already
        registered); `count` it in the hit rate."""
        self._num_registered[request.request_id] = num_hit_blocks
        if count:
            self.num_queried_tokens += request.num_prompt_tokens
            self.num_hit_tokens += num_hit_blocks * self.block_size

    def hashes(self, request: Request, num_tokens: int) -> list[bytes]:
        """Chained hashes of the full blocks among the request's first `num_tokens` tokens
        whose ids are known (prompt ids; output ids too when the engine keeps them)."""
        hashes = self._hashes.setdefault(request.request_id, [])
        if request.prompt_token_ids is None:
            return hashes
        known = min(num_tokens, request.num_tokens if request.keep_tokens
                    else request.num_prompt_tokens)
        bs = self.block_size
        if known // bs > len(hashes):
            ids = request.token_ids_slice(len(hashes) * bs, (known // bs) * bs)
            hashes.extend(block_hashes(ids, bs, hashes[-1] if hashes else ROOT_HASH))
        return hashes

    def register(self, request: Request, table: list[int], num_tokens: int) -> None:
        """Offer the request's newly full blocks to the pool's index (their KV is computed in
        the step being scheduled, before any later step can read it)."""
        rid = request.request_id
        hashes = self.hashes(request, num_tokens)
        start = self._num_registered[rid]
        end = min(len(hashes), len(table))
        for i in range(start, end):
            self.pool.register(table[i], hashes[i])
        self._num_registered[rid] = max(start, end)

    def fork(self, parent_id: str, child_id: str, num_full_blocks: int) -> None:
        """The child shares the parent's first `num_full_blocks` full blocks (and hashes)."""
        self._hashes[child_id] = list(self._hashes.get(parent_id, []))[:num_full_blocks]
        self._num_registered[child_id] = min(self._num_registered[parent_id], num_full_blocks)

    def forget(self, request_id: str) -> None:
        self._hashes.pop(request_id, None)
        self._num_registered.pop(request_id, None)
