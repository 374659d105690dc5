"""Beam search: vLLM's `LLM.beam_search` and `BeamSearchParams`, and the one rule that both the
engine (`cache.beam_search`) and the cacheless reference (`sim.model.reference.beam_search`) follow.

Each *round*, every live beam of a prompt proposes its `2 * beam_width` likeliest next tokens
(log-probabilities of the model's raw distribution). A proposal ending in EOS (unless
`ignore_eos`) becomes a finished beam; of the others, the `beam_width` with the highest
cumulative log-probability live on (ties broken by token ids, so nothing depends on dict
order). After `max_tokens` rounds, or at `max_model_len`, the finished and live beams are ranked
by `cum_logprob / length ** length_penalty` (the length counts the prompt but not a final EOS:
vLLM's `get_beam_search_score`) and the best `beam_width` are returned.

`LLM.beam_search` runs every prompt as one engine request with
`SamplingParams(n=beam_width, use_beam_search=True)`: the beams share KV blocks with
copy-on-write, and the whole search is priced on the simulated clock.

References: Graves 2012 / Sutskever et al. 2014 (beam search for sequence models); vLLM
`vllm/entrypoints/llm.py` (`LLM.beam_search`, `2 * beam_width` logprobs per beam) and
`vllm/beam_search.py` (`BeamSearchParams`, `get_beam_search_score`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sim.core.errors import ConfigError
from sim.model.sampling import SamplingParams


@dataclass(frozen=True, slots=True)
class BeamSearchParams:
    """vLLM's `BeamSearchParams`: beams kept per prompt and new tokens per beam."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    length_penalty: float = 1.0

    def __post_init__(self) -> None:
        if self.beam_width < 1 or self.max_tokens < 1:
            raise ConfigError(f"beam_width and max_tokens must be >= 1, got {self.beam_width}, "
                              f"{self.max_tokens}")

    def sampling_params(self) -> SamplingParams:
        """The engine request that runs this search for one prompt."""
        return SamplingParams(n=self.beam_width, use_beam_search=True, temperature=0.0,
                              max_tokens=self.max_tokens, ignore_eos=self.ignore_eos,
                              length_penalty=self.length_penalty)


@dataclass(slots=True)
class BeamSequence:
    """One beam: prompt + generated ids, its cumulative log-probability, and how it ended
    (`"stop"`: it emitted EOS; `"length"`: max_tokens or max_model_len; None: still live)."""

    tokens: list[int]
    cum_logprob: float = 0.0
    num_prompt_tokens: int = 0
    finish_reason: str | None = None
    text: str | None = None

    @property
    def output_token_ids(self) -> list[int]:
        return self.tokens[self.num_prompt_tokens:]

    def score(self, length_penalty: float) -> float:
        """Cumulative log-probability over length ** length_penalty (vLLM's ranking); a final
        EOS does not count towards the length."""
        length = len(self.tokens) - (self.finish_reason == "stop")
        return self.cum_logprob / max(length, 1) ** length_penalty


@dataclass(slots=True)
class BeamSearchOutput:
    """The best `beam_width` beams of one prompt, best first."""

    sequences: list[BeamSequence] = field(default_factory=list)


def next_beams(live: Sequence[BeamSequence], proposals: Sequence[dict[int, float]],
               width: int, eos_token_ids: frozenset[int]
               ) -> tuple[list[tuple[int, BeamSequence]], list[BeamSequence]]:
    """One round. `proposals[i]` maps token -> log-probability for live beam i. Returns the next
    live beams, best first, each with the index of the beam it extends, and the beams this
    round finished with EOS."""
    extended: list[tuple[int, BeamSequence]] = []
    finished: list[BeamSequence] = []
    for i, (beam, tokens) in enumerate(zip(live, proposals, strict=True)):
        for token, logprob in tokens.items():
            new = BeamSequence([*beam.tokens, token], beam.cum_logprob + logprob,
                               beam.num_prompt_tokens)
            if token in eos_token_ids:
                new.finish_reason = "stop"
                finished.append(new)
            else:
                extended.append((i, new))
    extended.sort(key=lambda item: (-item[1].cum_logprob, item[1].tokens))
    return extended[:width], finished


def best_beams(beams: Sequence[BeamSequence], width: int,
               length_penalty: float) -> list[BeamSequence]:
    """The `width` best beams by length-penalised score, best first (ties by token ids)."""
    return sorted(beams, key=lambda b: (-b.score(length_penalty), b.tokens))[:width]


def beam_search(llm: Any, prompts: Sequence[Any],
                params: BeamSearchParams) -> list[BeamSearchOutput]:
    """Beam search for every prompt with `llm` (an `LLM`), in one engine run; outputs in prompt
    order (`llm.last_result` has the run's simulated times)."""
    results = []
    for out in llm.generate(list(prompts), params.sampling_params()):
        if out.reject_reason is not None:
            raise ConfigError(f"beam search: prompt {out.request_id} was rejected: "
                              f"{out.reject_reason}")
        prompt_ids = list(out.prompt_token_ids)
        results.append(BeamSearchOutput([
            BeamSequence(prompt_ids + c.token_ids, c.cumulative_logprob or 0.0,
                         len(prompt_ids), c.finish_reason, c.text)
            for c in out.outputs]))
    return results
