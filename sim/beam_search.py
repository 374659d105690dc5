"""Beam search over the engine, as vLLM's `LLM.beam_search` does it.

Each step runs every live beam for one token through the engine (`LLM.generate`, greedy, with
the `2 * beam_width` most likely next tokens reported as logprobs from the raw distribution), then
keeps the `beam_width` extensions with the highest cumulative log-probability per prompt. A beam
that emits EOS (unless `ignore_eos`) is complete. The final ranking divides each cumulative
log-probability by `length ** length_penalty` (vLLM's `get_beam_search_score`).

Functional only: each step is its own engine run, so the simulated clock and the KV sharing
between beams (copy-on-write forks in a real engine) are not modelled here.

References: Graves 2012 / Sutskever et al. 2014 (beam search for sequence models); vLLM
`vllm/entrypoints/llm.py` `LLM.beam_search` and `vllm/beam_search.py` (BeamSearchParams, score).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sim.errors import ConfigError
from sim.sampling import SamplingParams


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


@dataclass(slots=True)
class BeamSequence:
    """One beam: prompt + generated ids, its cumulative log-probability, and whether it ended."""

    tokens: list[int]
    cum_logprob: float = 0.0
    num_prompt_tokens: int = 0
    finished: bool = False
    text: str | None = None

    @property
    def output_token_ids(self) -> list[int]:
        return self.tokens[self.num_prompt_tokens:]

    def score(self, length_penalty: float) -> float:
        """Cumulative log-probability over length ** length_penalty (vLLM's ranking)."""
        return self.cum_logprob / max(len(self.tokens), 1) ** length_penalty


@dataclass(slots=True)
class BeamSearchOutput:
    """The best `beam_width` beams of one prompt, best first."""

    sequences: list[BeamSequence] = field(default_factory=list)


def beam_search(llm: Any, prompts: Sequence[Any],
                params: BeamSearchParams) -> list[BeamSearchOutput]:
    """Beam search for every prompt with `llm` (an `LLM`); outputs in prompt order."""
    width = params.beam_width
    eos = set() if params.ignore_eos else set(llm.engine.eos_token_ids)
    step_params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True,
                                 logprobs=2 * width)
    live: list[list[BeamSequence]] = []
    for prompt in prompts:
        _, ids = llm._encode(prompt)
        live.append([BeamSequence(list(ids), 0.0, len(ids))])
    done: list[list[BeamSequence]] = [[] for _ in prompts]
    for _ in range(params.max_tokens):
        flat = [(i, beam) for i, beams in enumerate(live) for beam in beams]
        if not flat:
            break
        outs = llm.generate([{"prompt_token_ids": beam.tokens} for _, beam in flat], step_params)
        candidates: list[list[BeamSequence]] = [[] for _ in prompts]
        for (i, beam), out in zip(flat, outs, strict=True):
            logprobs = out.outputs[0].logprobs
            if not logprobs:
                raise ConfigError(f"beam search: a beam of prompt {i} was not run "
                                  f"({out.reject_reason}); lower max_tokens or raise "
                                  "max_model_len")
            for token, lp in logprobs[0].items():
                candidates[i].append(BeamSequence([*beam.tokens, token],
                                                  beam.cum_logprob + lp.logprob,
                                                  beam.num_prompt_tokens, token in eos))
        for i, cands in enumerate(candidates):
            # ties broken by token ids, so the result does not depend on dict order
            cands.sort(key=lambda b: (-b.cum_logprob, b.tokens))
            kept = cands[:width]
            done[i].extend(b for b in kept if b.finished)
            live[i] = [b for b in kept if not b.finished]
    tokenizer = llm.get_tokenizer()
    results = []
    for i in range(len(prompts)):
        beams = sorted(done[i] + live[i],
                       key=lambda b: (-b.score(params.length_penalty), b.tokens))[:width]
        for b in beams:
            b.text = tokenizer.decode(b.output_token_ids)
        results.append(BeamSearchOutput(beams))
    return results
