"""A snapshot of where KV memory goes: the vLLM paper's Fig. 2 accounting, in token slots.

Every slot of the KV pool is in one of four states:

- **used**: holds a real token's K/V (shared prefix blocks count once);
- **reserved**: held by a request for tokens it *will* produce (contiguous reservation up to the
  request's known limit: waste until those tokens arrive);
- **internal fragmentation**: held but never to be used (a contiguous slab longer than the
  request's limit; the unfilled tail of a request's last paged block);
- **free**: not held by any request (cached-but-unreferenced prefix blocks count as free, since
  they are evicted on demand).

`real_token_fraction` = used / (used + reserved + internal fragmentation): the fraction of the
memory held by requests that stores actual tokens (the vLLM paper reports 20.4-38.2 % for the
Orca baselines and ~96 % for vLLM).

References: Kwon et al., SOSP'23, section 3 and Fig. 2.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class KVMemoryUsage:
    num_total_tokens: int
    num_used_tokens: int
    num_reserved_tokens: int
    num_internal_frag_tokens: int
    num_free_tokens: int
    num_requests: int = 0
    num_cached_free_tokens: int = 0  # included in num_free_tokens
    #: free slots in chunks too small for the last reservation asked (a buddy allocator's
    #: external fragmentation); included in num_free_tokens
    num_external_frag_tokens: int = 0

    def __post_init__(self) -> None:
        parts = (self.num_used_tokens, self.num_reserved_tokens, self.num_internal_frag_tokens,
                 self.num_free_tokens)
        if min(parts) < 0 or sum(parts) != self.num_total_tokens:
            raise ValueError(f"KVMemoryUsage: parts {parts} must be >= 0 and add up to "
                             f"num_total_tokens={self.num_total_tokens}")

    @property
    def num_held_tokens(self) -> int:
        return self.num_used_tokens + self.num_reserved_tokens + self.num_internal_frag_tokens

    @property
    def real_token_fraction(self) -> float:
        """Used / held (1.0 when nothing is held)."""
        held = self.num_held_tokens
        return self.num_used_tokens / held if held else 1.0

    @property
    def used_fraction(self) -> float:
        """Used / the whole pool."""
        return self.num_used_tokens / self.num_total_tokens if self.num_total_tokens else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["real_token_fraction"] = self.real_token_fraction
        return d
