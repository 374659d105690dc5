"""What the timing side sees of an engine step, and what it charges for it.

`StepShape` is the shape of one forward pass over a batch: per sequence, how many new tokens it
computes and how many tokens of context it already has in the KV cache. New tokens attend to the
whole context plus, causally, to each other. A decode step is one new token per sequence; a
prefill (or a chunk of one) is many; a no-KV-cache baseline is context 0 and the whole sequence
as new tokens. Token values never appear here: the pricer sees shapes only (ARCHITECTURE.md).

`StepCost` is the price: seconds per part of the forward pass, which bound (compute or memory)
limited each part, and the FLOPs and bytes behind it.

References: Yu et al. 2022 (Orca, iteration-level batches of mixed prefill and decode);
Agrawal et al. 2024 (Sarathi-Serve, chunked prefill: new tokens on top of a context).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sim.core.errors import ConfigError


@dataclass(frozen=True, slots=True)
class StepShape:
    """Token counts of one engine step, one entry per sequence (order does not matter).

    `num_logits[i]` is how many LM-head rows sequence i needs (default None: 1 each, the last
    token; speculative verification needs k+1, a chunk that does not finish its prompt needs 0).
    """

    num_new_tokens: tuple[int, ...]
    num_context_tokens: tuple[int, ...]
    num_logits: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        new, ctx = self.num_new_tokens, self.num_context_tokens
        if type(new) is not tuple:
            new = tuple(int(n) for n in new)
            object.__setattr__(self, "num_new_tokens", new)
        if type(ctx) is not tuple:
            ctx = tuple(int(c) for c in ctx)
            object.__setattr__(self, "num_context_tokens", ctx)
        if not new:
            raise ConfigError("a StepShape needs at least one sequence; skip empty steps")
        if len(new) != len(ctx):
            raise ConfigError(
                f"StepShape: num_new_tokens has {len(new)} entries but num_context_tokens has "
                f"{len(ctx)}; give one of each per sequence"
            )
        if min(new) < 1:
            raise ConfigError(
                f"StepShape: every sequence computes at least 1 new token, got {min(new)}; "
                "leave idle sequences out of the step"
            )
        if min(ctx) < 0:
            raise ConfigError(f"StepShape: context lengths must be >= 0, got {min(ctx)}")
        logits = self.num_logits
        if logits is not None:
            if type(logits) is not tuple:
                logits = tuple(int(n) for n in logits)
                object.__setattr__(self, "num_logits", logits)
            if len(logits) != len(new):
                raise ConfigError(
                    f"StepShape: num_logits has {len(logits)} entries for {len(new)} sequences"
                )
            if any(lg < 0 or lg > n for lg, n in zip(logits, new, strict=True)):
                raise ConfigError(
                    "StepShape: num_logits[i] must be between 0 and num_new_tokens[i] "
                    "(the LM head runs only on tokens computed in this step)"
                )

    @classmethod
    def decode(cls, context_lens: tuple[int, ...] | list[int]) -> StepShape:
        """One new token per sequence on top of `context_lens` cached tokens."""
        ctx = tuple(int(c) for c in context_lens)
        return cls((1,) * len(ctx), ctx)

    @classmethod
    def prefill(cls, prompt_lens: tuple[int, ...] | list[int]) -> StepShape:
        """Whole prompts from an empty cache (also the shape of a no-KV-cache forward)."""
        new = tuple(int(n) for n in prompt_lens)
        return cls(new, (0,) * len(new))

    @property
    def num_seqs(self) -> int:
        return len(self.num_new_tokens)

    @property
    def total_new_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def total_logits(self) -> int:
        return len(self.num_new_tokens) if self.num_logits is None else sum(self.num_logits)


@dataclass(frozen=True)
class StepCost:
    """The price of one step: `total_s` = sum of `parts` (seconds).

    `bound[part]` is "compute" or "memory" (which roofline limited it), or "latency" for the
    fixed per-step `overhead` and for `comm`. `flops` counts tensor-core work (GEMMs and
    attention); `bytes` all HBM traffic. Both are per GPU.
    """

    total_s: float
    parts: dict[str, float] = field(hash=False)
    bound: dict[str, str] = field(hash=False)
    flops: float
    bytes: float

    def breakdown(self, unit: str = "ms") -> str:
        """A text table of the parts, largest first, with share of the total and bound."""
        scale = {"s": 1.0, "ms": 1e3, "us": 1e6}.get(unit)
        if scale is None:
            raise ConfigError(f"unit must be one of s, ms, us; got {unit!r}")
        width = max(len(p) for p in self.parts) if self.parts else 5
        lines = [f"{'part':<{width}}  {unit:>10}  {'share':>6}  bound"]
        total = self.total_s or 1.0
        for name, sec in sorted(self.parts.items(), key=lambda kv: -kv[1]):
            lines.append(
                f"{name:<{width}}  {sec * scale:>10.4f}  {100 * sec / total:>5.1f}%  "
                f"{self.bound.get(name, '')}"
            )
        lines.append(f"{'total':<{width}}  {self.total_s * scale:>10.4f}  100.0%")
        lines.append(f"flops {self.flops:.4g}, bytes {self.bytes:.4g}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, float | dict[str, float] | dict[str, str]]:
        return {"total_s": self.total_s, "parts": dict(self.parts), "bound": dict(self.bound),
                "flops": self.flops, "bytes": self.bytes}
