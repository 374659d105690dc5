"""What a lossy policy costs on real language: perplexity, next-token KL, top-1 agreement.

A lossy optimisation (a quantized or evicting KV cache, quantized weights, lossy speculation)
changes the model's next-token distributions. On a real text run teacher-forced through the
unmodified model (the reference) and through the modified path (the candidate), we report

- perplexity `exp(mean NLL)` of each on the text's next tokens (lower is better),
- `KL(p_ref || p_cand)` per position, in nats (0 = the same distribution), mean and max,
- top-1 agreement: the fraction of positions whose greedy (argmax) token is unchanged.

The text is `sim/data/eval_text.txt`, a few paragraphs written for this project (prose, a log
of numbers, a Python snippet). `teacher_forced_logits` runs a text through `forward_step` with
any `KVStore`, in chunks (`chunk_size=1` is token-by-token decode, the way a lossy cache is
exercised in serving). All statistics are computed in float64.

References: Jelinek et al. 1977 (perplexity); Kullback & Leibler 1951; the KL/top-1 metrics
used to evaluate KV-cache compression (e.g. Hooper et al. 2024, KVQuant; Liu et al. 2024, KIVI).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np

from sim.core.errors import ConfigError
from sim.core.protocols import KVStore
from sim.model.kv_store import ContiguousKVStore
from sim.model.numpy_model import NumpyModel, SeqChunk

EVAL_TEXT_FILE = "data/eval_text.txt"


def eval_text() -> str:
    """The project's evaluation text (a few paragraphs of English and a little Python)."""
    return resources.files("sim").joinpath(EVAL_TEXT_FILE).read_text(encoding="utf-8")


def eval_token_ids(tokenizer: Any, max_tokens: int | None = None) -> list[int]:
    """The evaluation text as token ids (BOS first when the tokenizer adds one), cut to
    `max_tokens`."""
    ids = list(tokenizer.encode(eval_text()))
    return ids[:max_tokens] if max_tokens is not None else ids


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """`log p` over the last axis, in float64."""
    x = np.asarray(logits, dtype=np.float64)  # [n, n_vocab]
    x = x - x.max(axis=-1, keepdims=True)  # [n, n_vocab]
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))  # [n, n_vocab]


def token_nll(logits: np.ndarray, token_ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """`-log p(token_ids[t+1] | ..t)` for each position but the last: `[n - 1]` (nats)."""
    ids = np.asarray(token_ids)  # [n]
    if logits.shape[0] != ids.shape[0] or ids.shape[0] < 2:
        raise ConfigError(f"need logits for every one of >= 2 tokens, got {logits.shape[0]} rows "
                          f"for {ids.shape[0]} tokens")
    logp = log_softmax(logits[:-1])  # [n - 1, n_vocab]
    return -logp[np.arange(ids.shape[0] - 1), ids[1:]]  # [n - 1]


def perplexity(logits: np.ndarray, token_ids: Sequence[int] | np.ndarray) -> float:
    """`exp(mean NLL)` of the text's next tokens under `logits` `[n, n_vocab]`."""
    return math.exp(float(np.mean(token_nll(logits, token_ids))))


def next_token_kl(ref_logits: np.ndarray, cand_logits: np.ndarray) -> np.ndarray:
    """`KL(p_ref || p_cand)` per position `[n]`, in nats."""
    if ref_logits.shape != cand_logits.shape:
        raise ConfigError(f"logit shapes differ: {ref_logits.shape} vs {cand_logits.shape}")
    log_p, log_q = log_softmax(ref_logits), log_softmax(cand_logits)  # [n, n_vocab] x2
    return np.maximum((np.exp(log_p) * (log_p - log_q)).sum(axis=-1), 0.0)  # [n]


def top1_agreement(ref_logits: np.ndarray, cand_logits: np.ndarray) -> float:
    """Fraction of positions whose argmax token is the same."""
    return float(np.mean(np.argmax(ref_logits, axis=-1) == np.argmax(cand_logits, axis=-1)))


@dataclass(frozen=True)
class QualityReport:
    """A candidate's cost against the reference on one text (`compare`)."""

    num_tokens: int
    reference_perplexity: float
    perplexity: float
    mean_kl: float
    max_kl: float
    top1_agreement: float

    def __post_init__(self) -> None:
        if self.num_tokens < 2:
            raise ConfigError("a quality report needs at least 2 tokens")

    @property
    def perplexity_increase(self) -> float:
        """Relative perplexity change (0.01 = 1 % worse)."""
        return self.perplexity / self.reference_perplexity - 1.0

    def as_dict(self) -> dict[str, float]:
        return {"num_tokens": self.num_tokens, "reference_perplexity": self.reference_perplexity,
                "perplexity": self.perplexity, "perplexity_increase": self.perplexity_increase,
                "mean_kl": self.mean_kl, "max_kl": self.max_kl,
                "top1_agreement": self.top1_agreement}

    def format_table(self) -> str:
        return "\n".join([
            f"tokens                 {self.num_tokens}",
            f"perplexity (ref)       {self.reference_perplexity:.3f}",
            f"perplexity (cand)      {self.perplexity:.3f} ({self.perplexity_increase:+.2%})",
            f"next-token KL mean     {self.mean_kl:.5f} nats (max {self.max_kl:.4f})",
            f"top-1 agreement        {self.top1_agreement:.2%}",
        ])


def compare(ref_logits: np.ndarray, cand_logits: np.ndarray,
            token_ids: Sequence[int] | np.ndarray) -> QualityReport:
    """Perplexity of both, KL and top-1 agreement of the candidate against the reference."""
    kl = next_token_kl(ref_logits, cand_logits)  # [n]
    return QualityReport(
        num_tokens=int(np.asarray(token_ids).shape[0]),
        reference_perplexity=perplexity(ref_logits, token_ids),
        perplexity=perplexity(cand_logits, token_ids),
        mean_kl=float(kl.mean()), max_kl=float(kl.max()),
        top1_agreement=top1_agreement(ref_logits, cand_logits),
    )


def teacher_forced_logits(model: NumpyModel, token_ids: Sequence[int] | np.ndarray,
                          kv: KVStore | None = None, chunk_size: int | None = None,
                          seq_id: Any = "eval") -> np.ndarray:
    """Logits `[n, n_vocab]` at every position of `token_ids`, fed through `forward_step` and
    `kv` (a fresh contiguous store by default) `chunk_size` tokens at a time (None: one
    prefill). A `kv` that is not a `ContiguousKVStore` must already hold room for `seq_id`."""
    ids = np.asarray(token_ids, dtype=np.int64)  # [n]
    n = ids.shape[0]
    step = chunk_size or n
    if step < 1:
        raise ConfigError(f"chunk_size must be >= 1, got {chunk_size}")
    if kv is None:
        c = model.config
        kv = ContiguousKVStore(c.n_layer, c.n_kv_head, c.d_head, model.dtype)
    if isinstance(kv, ContiguousKVStore) and not kv.has(seq_id):
        kv.allocate(seq_id, n)
    out = np.empty((n, model.config.n_vocab), dtype=model.dtype)  # [n, n_vocab]
    for start in range(0, n, step):
        chunk = ids[start: start + step]  # [k]
        out[start: start + len(chunk)] = model.forward_step(
            [SeqChunk(seq_id, chunk, start, num_logits=len(chunk))], kv)  # [k, n_vocab]
    return out


def reference_logits(model: NumpyModel, token_ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """The unmodified model's logits `[n, n_vocab]` (one cacheless forward pass)."""
    return model.forward(np.asarray(token_ids))  # [n, n_vocab]
