"""Acceptance rates of speculative proposers, measured greedily on real text, as replayable traces.

In greedy speculative decoding a draft proposes `k` tokens; the target verifies them in one step
and keeps the longest prefix that equals its own greedy tokens, plus one token of its own (the
correction or bonus token). So a step emits `accepted + 1` tokens, and the output is exactly the
target's greedy continuation. `measure_acceptance` replays that: it computes the target's greedy
continuation of each prompt, then walks along it asking the proposer for drafts and counting how
many match. Two proposers:

- **n-gram / prompt lookup** (`ngram_propose`): find the most recent earlier occurrence of the
  context's last n tokens (n from `max_n` down to `min_n`) and propose what followed it;
- **self-speculation** (`SelfSpecDraft`): the first `num_layers` layers of the target itself, then
  its final norm and LM head (an early exit sharing the head), run autoregressively with its own
  KV store.

An `AcceptanceTrace` holds, per request, the accepted and proposed counts of every verification
step; it saves to JSON. `AcceptanceReplay` feeds those counts back to a timing-only run (which
has no token values) so it can price speculative steps with real acceptance behaviour.

    trace = measure_ngram(model, eval_prompts(tokenizer), k=4, max_new_tokens=64)
    trace.save("results/acceptance_ngram.json")
    replay = AcceptanceReplay(AcceptanceTrace.load("results/acceptance_ngram.json"))
    accepted = replay.next_accepted(request_index=0, num_proposed=4)

References: Leviathan et al. 2023 and Chen et al. 2023 (speculative decoding); Saxena 2023
(prompt lookup decoding) and vLLM's n-gram proposer; Zhang et al. 2024 (Draft & Verify:
self-speculation by layer skipping); Elhoushi et al. 2024 (LayerSkip, early-exit drafts).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sim.core.errors import ConfigError
from sim.model.kv_store import ContiguousKVStore
from sim.model.numpy_model import NumpyModel, SeqChunk
from sim.model.weights import ModelWeights

TRACE_FORMAT = "infersim-acceptance-trace"
Proposer = Callable[[list[int], int], list[int]]


# ---------------------------------------------------------------------------------- proposers
def ngram_propose(context: Sequence[int], k: int, min_n: int = 1, max_n: int = 3) -> list[int]:
    """Up to `k` tokens that followed the latest earlier occurrence of the context's last n-gram
    (the longest n in `max_n..min_n` that occurs); [] when none does."""
    ctx = list(context)
    for n in range(min(max_n, len(ctx) - 1), min_n - 1, -1):
        tail = ctx[-n:]
        for start in range(len(ctx) - n - 1, -1, -1):  # latest earlier occurrence first
            if ctx[start: start + n] == tail:
                return ctx[start + n: start + n + k]
    return []


def truncated_model(model: NumpyModel, num_layers: int) -> NumpyModel:
    """The first `num_layers` layers of `model` with its final norm and head (weights shared)."""
    c = model.config
    if not 1 <= num_layers <= c.n_layer:
        raise ConfigError(f"num_layers must be in 1..{c.n_layer}, got {num_layers}")
    w = model.weights
    weights = ModelWeights(w.embed, w.layers[:num_layers], w.final_norm, w.lm_head)
    config = c.replace(n_layer=num_layers, name=f"{c.name}[:{num_layers} layers]")
    return NumpyModel(config, weights, model.dtype.name, model.layer_windows[:num_layers])


class SelfSpecDraft:
    """Self-speculation: the target's first `num_layers` layers as a greedy draft model.

    Keeps the KV of the tokens it has seen; a new context reuses the common prefix (rejected
    draft positions are simply overwritten)."""

    def __init__(self, model: NumpyModel, num_layers: int) -> None:
        self.model = truncated_model(model, num_layers)
        self.num_layers = num_layers
        c = self.model.config
        self._kv = ContiguousKVStore(c.n_layer, c.n_kv_head, c.d_head, self.model.dtype)
        self._tokens: list[int] = []

    def reset(self, capacity: int) -> None:
        """Forget all context; room for `capacity` tokens."""
        if self._kv.has("draft"):
            self._kv.free("draft")
        self._kv.allocate("draft", capacity)
        self._tokens = []

    def __call__(self, context: list[int], k: int) -> list[int]:
        return self.propose(context, k)

    def propose(self, context: Sequence[int], k: int) -> list[int]:
        if k <= 0:
            return []
        ctx = [int(t) for t in context]
        if not self._kv.has("draft") or self._kv.capacity("draft") < len(ctx) + k:
            self.reset(2 * (len(ctx) + k))
        common = 0
        for a, b in zip(self._tokens, ctx, strict=False):
            if a != b:
                break
            common += 1
        common = min(common, len(ctx) - 1)  # recompute at least the last token for its logits
        new = np.asarray(ctx[common:], dtype=np.int64)  # [n_new]
        logits = self.model.forward_step([SeqChunk("draft", new, common)], self._kv)  # [1, V]
        drafts = [int(np.argmax(logits[-1]))]
        for i in range(1, k):
            step = np.asarray([drafts[-1]], dtype=np.int64)  # [1]
            logits = self.model.forward_step([SeqChunk("draft", step, len(ctx) + i - 1)], self._kv)
            drafts.append(int(np.argmax(logits[-1])))
        self._tokens = ctx + drafts[:-1]
        return drafts


# ---------------------------------------------------------------------------------- traces
@dataclass(frozen=True)
class RequestAcceptance:
    """One request: per verification step, how many draft tokens were proposed and accepted."""

    prompt_len: int
    accepted: tuple[int, ...]
    proposed: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.accepted) != len(self.proposed) or any(
                not 0 <= a <= p for a, p in zip(self.accepted, self.proposed, strict=True)):
            raise ConfigError("accepted/proposed must be equally long with 0 <= accepted <= "
                              "proposed at every step")

    @property
    def num_output_tokens(self) -> int:
        return sum(self.accepted) + len(self.accepted)

    @property
    def acceptance_rate(self) -> float:
        """Accepted / proposed draft tokens (0 when nothing was proposed)."""
        total = sum(self.proposed)
        return sum(self.accepted) / total if total else 0.0


@dataclass(frozen=True)
class AcceptanceTrace:
    """Acceptance of one proposer on a set of requests (see module doc); saves to JSON."""

    method: str
    num_speculative_tokens: int
    model: str
    requests: tuple[RequestAcceptance, ...]
    params: dict[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if self.num_speculative_tokens < 1:
            raise ConfigError("num_speculative_tokens must be >= 1")
        if any(p > self.num_speculative_tokens for r in self.requests for p in r.proposed):
            raise ConfigError("a step proposed more than num_speculative_tokens tokens")

    def _steps(self) -> tuple[np.ndarray, np.ndarray]:
        acc = np.array([a for r in self.requests for a in r.accepted], dtype=np.int64)  # [n_step]
        prop = np.array([p for r in self.requests for p in r.proposed], dtype=np.int64)  # [n_step]
        return acc, prop

    @property
    def acceptance_rate(self) -> float:
        """Accepted / proposed draft tokens over all steps."""
        acc, prop = self._steps()
        return float(acc.sum() / prop.sum()) if prop.sum() else 0.0

    @property
    def mean_tokens_per_step(self) -> float:
        """Mean tokens emitted per verification step (accepted + 1)."""
        acc, _ = self._steps()
        return float(acc.mean() + 1) if acc.size else 0.0

    def per_position_acceptance(self) -> np.ndarray:
        """`[k]`: for draft position j, the fraction of steps that proposed it whose j-th draft
        token was accepted (so position j needs positions < j accepted too)."""
        acc, prop = self._steps()
        j = np.arange(self.num_speculative_tokens)[:, None]  # [k, 1]
        proposed = (prop[None, :] > j).sum(axis=1)  # [k]
        accepted = (acc[None, :] > j).sum(axis=1)  # [k]
        return np.divide(accepted, proposed, out=np.zeros(len(j)), where=proposed > 0)  # [k]

    def summary(self) -> dict[str, Any]:
        return {"num_requests": len(self.requests),
                "num_steps": sum(len(r.accepted) for r in self.requests),
                "num_output_tokens": sum(r.num_output_tokens for r in self.requests),
                "acceptance_rate": self.acceptance_rate,
                "mean_tokens_per_step": self.mean_tokens_per_step,
                "per_position_acceptance": self.per_position_acceptance().tolist(),
                "per_request_acceptance": [r.acceptance_rate for r in self.requests]}

    def to_dict(self) -> dict[str, Any]:
        return {"format": TRACE_FORMAT, "version": 1, "method": self.method, "model": self.model,
                "num_speculative_tokens": self.num_speculative_tokens, "params": self.params,
                "summary": self.summary(),
                "requests": [{"prompt_len": r.prompt_len, "accepted": list(r.accepted),
                              "proposed": list(r.proposed)} for r in self.requests]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AcceptanceTrace:
        if data.get("format") != TRACE_FORMAT:
            raise ConfigError(f"not an acceptance trace (format {data.get('format')!r}, expected "
                              f"{TRACE_FORMAT!r})")
        try:
            requests = tuple(RequestAcceptance(int(r["prompt_len"]), tuple(r["accepted"]),
                                               tuple(r["proposed"])) for r in data["requests"])
            return cls(str(data["method"]), int(data["num_speculative_tokens"]),
                       str(data["model"]), requests, dict(data.get("params") or {}))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"malformed acceptance trace: {exc}") from exc

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> AcceptanceTrace:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read an acceptance trace: {exc}") from exc
        return cls.from_dict(data)


class AcceptanceReplay:
    """Recorded acceptance counts for a timing-only run: request i replays recorded request
    `i mod n`, step after step, wrapping around; `num_proposed` caps the count."""

    def __init__(self, trace: AcceptanceTrace) -> None:
        self.trace = trace
        self._sequences = [r.accepted for r in trace.requests if r.accepted]
        if not self._sequences:
            raise ConfigError("the acceptance trace has no verification steps to replay")
        self._cursor: dict[int, int] = {}

    def next_accepted(self, request_index: int, num_proposed: int | None = None) -> int:
        seq = self._sequences[request_index % len(self._sequences)]
        at = self._cursor.get(request_index, 0)
        self._cursor[request_index] = at + 1
        accepted = seq[at % len(seq)]
        return accepted if num_proposed is None else min(accepted, num_proposed)


# ---------------------------------------------------------------------------------- measuring
def greedy_continuation(model: NumpyModel, prompt_ids: Sequence[int], max_new_tokens: int,
                        eos_token_ids: Iterable[int] = ()) -> list[int]:
    """The target's greedy continuation, decoded with a KV store (ends at and includes EOS)."""
    c = model.config
    kv = ContiguousKVStore(c.n_layer, c.n_kv_head, c.d_head, model.dtype)
    kv.allocate(0, len(prompt_ids) + max_new_tokens)
    stop = set(eos_token_ids)
    out: list[int] = []
    chunk, pos = np.asarray(prompt_ids, dtype=np.int64), 0  # [n_prompt]
    while len(out) < max_new_tokens:
        logits = model.forward_step([SeqChunk(0, chunk, pos)], kv)  # [1, n_vocab]
        pos += len(chunk)
        out.append(int(np.argmax(logits[-1])))
        if out[-1] in stop:
            break
        chunk = np.asarray(out[-1:], dtype=np.int64)  # [1]
    return out


def measure_acceptance(model: NumpyModel, prompts: Sequence[Sequence[int]], proposer: Proposer,
                       k: int, max_new_tokens: int, eos_token_ids: Iterable[int] = (),
                       method: str = "custom", params: dict[str, Any] | None = None
                       ) -> AcceptanceTrace:
    """Greedy speculative decoding of each prompt with `proposer(context, k) -> draft tokens`;
    the trace of accepted/proposed counts per verification step."""
    if k < 1 or max_new_tokens < 1:
        raise ConfigError(f"need k >= 1 and max_new_tokens >= 1, got {k}, {max_new_tokens}")
    eos = list(eos_token_ids)
    requests = []
    for prompt in prompts:
        prompt = [int(t) for t in prompt]
        target = greedy_continuation(model, prompt, max_new_tokens, eos)
        accepted, proposed, pos = [], [], 0
        while pos < len(target):
            budget = min(k, len(target) - pos - 1)  # a step emits at most the tokens left
            draft = list(proposer(prompt + target[:pos], budget))[:budget] if budget else []
            n_ok = 0
            while n_ok < len(draft) and draft[n_ok] == target[pos + n_ok]:
                n_ok += 1
            accepted.append(n_ok)
            proposed.append(len(draft))
            pos += n_ok + 1
        requests.append(RequestAcceptance(len(prompt), tuple(accepted), tuple(proposed)))
    return AcceptanceTrace(method, k, model.config.name, tuple(requests),
                           {"max_new_tokens": max_new_tokens, **(params or {})})


def measure_ngram(model: NumpyModel, prompts: Sequence[Sequence[int]], k: int = 4,
                  max_new_tokens: int = 64, min_n: int = 1, max_n: int = 3,
                  eos_token_ids: Iterable[int] = ()) -> AcceptanceTrace:
    """Acceptance of n-gram prompt lookup (vLLM's `prompt_lookup_min/max`)."""
    def propose(context: list[int], budget: int) -> list[int]:
        return ngram_propose(context, budget, min_n, max_n)

    return measure_acceptance(model, prompts, propose, k, max_new_tokens, eos_token_ids,
                              "ngram", {"min_n": min_n, "max_n": max_n})


def measure_self_speculation(model: NumpyModel, prompts: Sequence[Sequence[int]],
                             num_draft_layers: int, k: int = 4, max_new_tokens: int = 64,
                             eos_token_ids: Iterable[int] = ()) -> AcceptanceTrace:
    """Acceptance of the first `num_draft_layers` layers (+ shared head) as the draft."""
    draft = SelfSpecDraft(model, num_draft_layers)
    return measure_acceptance(model, prompts, draft, k, max_new_tokens, eos_token_ids,
                              "self_speculation", {"num_draft_layers": num_draft_layers})


def eval_prompts(tokenizer: Any, num_prompts: int = 4, prompt_len: int = 64) -> list[list[int]]:
    """`num_prompts` windows of `prompt_len` tokens of the project's evaluation text, evenly
    spaced (real language prompts for acceptance measurements)."""
    from sim.model.quality import eval_token_ids

    ids = eval_token_ids(tokenizer)
    if prompt_len < 1 or prompt_len > len(ids):
        raise ConfigError(f"prompt_len must be in 1..{len(ids)} (the text's length), got "
                          f"{prompt_len}")
    starts = np.linspace(0, len(ids) - prompt_len, num_prompts).astype(int)  # [num_prompts]
    return [ids[s: s + prompt_len] for s in starts]
