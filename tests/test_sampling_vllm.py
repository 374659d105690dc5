"""vLLM's SamplingParams fields, each held exactly (float64) to a small textbook reference.

The reference below recomputes every token from scratch: a full forward of prompt + output so
far (no KV cache), the logits processors by their textbook formulas (CTRL's repetition penalty,
OpenAI's presence / frequency penalties and logit bias, masks for allowed ids and bad words),
then greedy arg-max or the filtered distribution, drawn with the request's own stream exactly as
the sampler draws (one uniform per token, inverse CDF). The engine must give the same tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
from scipy import stats

from sim import LLM, SamplingParams
from sim.core.errors import ConfigError
from sim.model.sampling import log_softmax, process_logits, sample_token, sampling_probs

MODEL = "meta-llama/Llama-2-7b-chat-hf"
PROMPT = [256, 72, 101, 108, 108, 111, 44, 32, 109, 121, 32, 110, 97, 109, 101]  # "<s>Hello, my name"


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(model=MODEL, dtype="float64", max_num_seqs=8, max_model_len=64)


def reference_logits(logits: np.ndarray, p: SamplingParams, prompt: Sequence[int],
                     output: Sequence[int], bad: Sequence[Sequence[int]]) -> np.ndarray:
    """The processors written out token by token, in vLLM v1's order."""
    x = np.array(logits, dtype=np.float64)
    for t in range(x.size):
        if p.allowed_token_ids is not None and t not in p.allowed_token_ids:
            x[t] = -np.inf
    for word in bad:
        if len(word) == 1 or list(output[len(output) - len(word) + 1:]) == list(word[:-1]):
            x[word[-1]] = -np.inf
    for t, bias in (p.logit_bias or {}).items():
        x[t] += bias
    for t in range(x.size):
        if t in prompt or t in output:
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
        count = list(output).count(t)
        x[t] -= p.frequency_penalty * count + p.presence_penalty * (count > 0)
    return x


def reference_probs(x: np.ndarray, p: SamplingParams) -> np.ndarray:
    """softmax(x / T), then min-p (prob < min_p * max prob dropped), top-k, top-p."""
    q = np.exp(x / p.temperature - np.max(x / p.temperature))
    q /= q.sum()
    q[q < p.min_p * q.max()] = 0
    q /= q.sum()
    order = np.argsort(-q, kind="stable")
    if p.top_k > 0:
        q[order[p.top_k:]] = 0
        q /= q.sum()
    if p.top_p < 1:
        sorted_q = q[order]
        drop = (np.cumsum(sorted_q) - sorted_q) >= p.top_p
        q[order[drop]] = 0
        q /= q.sum()
    return q


def reference_generate(llm: LLM, prompt: list[int], p: SamplingParams,
                       bad: Sequence[Sequence[int]] = ()) -> list[int]:
    model = llm.engine.functional_model
    rng = np.random.default_rng(np.random.SeedSequence(p.seed)) if not p.greedy else None
    out: list[int] = []
    eos = llm.engine.eos_token_ids
    for _ in range(p.max_tokens or 0):
        row = model.forward(np.asarray(prompt + out))[-1]  # [n_vocab]
        x = reference_logits(row, p, prompt, out, bad)
        if p.greedy:
            token = int(np.argmax(x))
        else:
            assert rng is not None
            cdf = np.cumsum(reference_probs(x, p))
            token = int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"),
                            cdf.size - 1))
        out.append(token)
        if token in eos and not p.ignore_eos:
            break
    return out


def run(llm: LLM, p: SamplingParams, prompt: list[int] = PROMPT) -> list[int]:
    return llm.generate({"prompt_token_ids": prompt}, p)[0].outputs[0].token_ids


CASES = {
    "presence": dict(presence_penalty=1.5),
    "frequency": dict(frequency_penalty=0.7),
    "repetition": dict(repetition_penalty=1.8),
    "repetition_below_1": dict(repetition_penalty=0.6),
    "all_penalties": dict(presence_penalty=-0.5, frequency_penalty=1.0, repetition_penalty=1.3),
    "logit_bias": dict(logit_bias={32: 4.0, 101: -100.0, 7: 2.5}),
    "allowed": dict(allowed_token_ids=[32, 97, 101, 105, 110, 111, 115, 116]),
    # bias before the repetition penalty (vLLM v1's order): the two do not commute
    "bias_then_repetition": dict(logit_bias={32: 3.0, 101: 2.0, 108: -1.0},
                                 repetition_penalty=2.0),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_field_matches_reference(llm: LLM, name: str, temperature: float) -> None:
    p = SamplingParams(temperature=temperature, seed=7, max_tokens=12, ignore_eos=True,
                       **CASES[name])
    assert run(llm, p) == reference_generate(llm, PROMPT, p)
    if temperature == 0:  # greedy repeats itself, so each field changes its output
        plain = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        assert run(llm, p) != run(llm, plain)


@pytest.mark.parametrize("extra", [dict(min_p=0.2), dict(min_p=0.05, top_k=20, top_p=0.9),
                                   dict(min_p=0.1, frequency_penalty=0.5, logit_bias={32: 3.0})])
def test_min_p_with_the_other_filters_matches_reference(llm: LLM, extra: dict) -> None:
    p = SamplingParams(temperature=1.3, seed=11, max_tokens=12, ignore_eos=True, **extra)
    assert run(llm, p) == reference_generate(llm, PROMPT, p)


def test_bad_words_ban_the_last_token_after_the_prefix(llm: LLM) -> None:
    plain = run(llm, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    # ban a one-token word the greedy output uses, and a two-token word made of its next pair
    one = bytes([plain[0]]).decode("latin-1") if plain[0] < 128 else None
    words = [bytes(plain[3:5]).decode("utf-8", errors="ignore")] + ([one] if one else [])
    words = [w for w in words if w.strip()]
    if not words:
        pytest.skip("the proxy's greedy output has no printable ASCII to ban")
    p = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, bad_words=words)
    tokenizer = llm.get_tokenizer()
    bad = []
    for w in words:  # vLLM's rule, written out: as given, and with a leading space if different
        bare = tokenizer.encode(w.lstrip(), add_bos=False)
        bad.append(bare)
        spaced = tokenizer.encode(" " + w.lstrip(), add_bos=False)
        if spaced[0] != bare[0] and len(spaced) == len(bare):
            bad.append(spaced)
    out = run(llm, p)
    assert out == reference_generate(llm, PROMPT, p, bad)
    for word in bad:
        assert not any(out[i:i + len(word)] == word for i in range(len(out)))


def test_processors_are_batch_invariant(llm: LLM) -> None:
    p = SamplingParams(temperature=0.8, seed=3, max_tokens=10, ignore_eos=True,
                       repetition_penalty=1.4, presence_penalty=0.3, min_p=0.05,
                       logit_bias={32: 2.0}, bad_words=["e"])
    alone = run(llm, p)
    others = [SamplingParams(temperature=0.7, seed=s, max_tokens=8, frequency_penalty=1.0,
                             allowed_token_ids=[97, 98, 99, 32]) for s in range(3)]
    prompts = [{"prompt_token_ids": PROMPT[: 5 + i]} for i in range(3)]
    outs = llm.generate([*prompts[:2], {"prompt_token_ids": PROMPT}, prompts[2]],
                        [others[0], others[1], p, others[2]])
    assert outs[2].outputs[0].token_ids == alone


def test_min_p_and_logit_bias_distribution() -> None:
    """20 000 draws of one row against its exact distribution (chi-square, fixed seed)."""
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, size=40)
    p = SamplingParams(temperature=0.8, min_p=0.08, logit_bias={5: 1.5, 9: -2.0}, seed=0)
    x = process_logits(logits, p, [], [])
    expected = reference_probs(reference_logits(logits, p, [], [], []), p)
    np.testing.assert_allclose(sampling_probs(x, p), expected, rtol=1e-12, atol=1e-15)
    assert (expected == 0).sum() > 10  # min_p dropped a good part of the vocabulary
    draws = np.random.default_rng(1)
    counts = np.bincount([sample_token(x, p, draws) for _ in range(20_000)], minlength=40)
    kept = expected > 0
    assert counts[~kept].sum() == 0
    _, p_value = stats.chisquare(counts[kept], 20_000 * expected[kept])
    assert p_value > 1e-3


def test_stop_strings_cut_the_text_as_vllm(llm: LLM) -> None:
    base = SamplingParams(temperature=0.9, seed=5, max_tokens=30, ignore_eos=True)
    full = llm.generate({"prompt_token_ids": PROMPT}, base)[0].outputs[0]
    decode = llm.get_tokenizer().decode
    stop_str = full.text[6:8]
    # reference: the first token after which the decoded text contains the stop string
    k = next(k for k in range(1, len(full.token_ids) + 1)
             if stop_str in decode(full.token_ids[:k]))
    text_k = decode(full.token_ids[:k])
    for include in (False, True):
        p = SamplingParams(temperature=0.9, seed=5, max_tokens=30, ignore_eos=True,
                           stop=[stop_str, "never-appears"], include_stop_str_in_output=include)
        out = llm.generate({"prompt_token_ids": PROMPT}, p)[0].outputs[0]
        at = text_k.index(stop_str)
        assert out.token_ids == full.token_ids[:k]
        assert out.text == text_k[: at + (len(stop_str) if include else 0)]
        assert (out.finish_reason, out.stop_reason) == ("stop", stop_str)


def test_stop_strings_wait_for_min_tokens(llm: LLM) -> None:
    base = SamplingParams(temperature=0.9, seed=5, max_tokens=30, ignore_eos=True)
    full = llm.generate({"prompt_token_ids": PROMPT}, base)[0].outputs[0]
    p = SamplingParams(temperature=0.9, seed=5, max_tokens=30, ignore_eos=True,
                       stop=[full.text[0:1]], min_tokens=29)
    out = llm.generate({"prompt_token_ids": PROMPT}, p)[0].outputs[0]
    assert len(out.token_ids) >= 29


def test_stop_strings_refused_in_timing_mode() -> None:
    timing = LLM(model=MODEL, mode="timing", max_num_seqs=4, max_model_len=64)
    with pytest.raises(ConfigError, match="stop=.*needs mode='functional'"):
        timing.generate("hi", SamplingParams(stop=["."]))
    # fields that change only token values are accepted (there are none to change)
    out = timing.generate("hi", SamplingParams(temperature=0.5, presence_penalty=1.0, min_p=0.1,
                                               logit_bias={3: 1.0}, max_tokens=4))
    assert out[0].metrics.num_generation_tokens == 4 and out[0].outputs[0].finish_reason == "length"


def test_best_of_returns_the_n_best_by_cumulative_logprob(llm: LLM) -> None:
    kw = dict(temperature=1.0, seed=21, max_tokens=8, ignore_eos=True)
    every = llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(n=4, logprobs=0, **kw))
    ranked = sorted(every[0].outputs, key=lambda c: -c.cumulative_logprob)[:2]
    best = llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(n=2, best_of=4, **kw))
    got = best[0].outputs
    assert [c.token_ids for c in got] == [c.token_ids for c in ranked]
    assert [c.index for c in got] == [0, 1]
    assert got[0].cumulative_logprob == pytest.approx(ranked[0].cumulative_logprob, abs=0)
    assert got[0].logprobs is None  # not asked for


def test_prompt_logprobs_match_a_full_forward(llm: LLM) -> None:
    out = llm.generate({"prompt_token_ids": PROMPT},
                       SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=3))[0]
    lp = log_softmax(llm.engine.functional_model.forward(np.asarray(PROMPT)))  # [n, n_vocab]
    assert out.prompt_logprobs is not None and out.prompt_logprobs[0] is None
    assert len(out.prompt_logprobs) == len(PROMPT)
    for i, entry in enumerate(out.prompt_logprobs[1:], start=1):
        assert entry is not None
        token = PROMPT[i]
        assert entry[token].logprob == lp[i - 1, token]
        assert entry[token].rank == 1 + int((lp[i - 1] > lp[i - 1, token]).sum())
        top = set(np.argsort(-lp[i - 1], kind="stable")[:3].tolist())
        assert set(entry) == top | {token}


def test_truncate_prompt_tokens_keeps_the_last_k(llm: LLM) -> None:
    p = SamplingParams(temperature=0, max_tokens=6, truncate_prompt_tokens=5)
    out = llm.generate({"prompt_token_ids": PROMPT}, p)[0]
    assert out.prompt_token_ids == PROMPT[-5:]
    assert out.outputs[0].token_ids == run(llm, SamplingParams(temperature=0, max_tokens=6),
                                           PROMPT[-5:])


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(presence_penalty=2.5), "presence_penalty must be in"),
    (dict(frequency_penalty=float("nan")), "frequency_penalty must be finite"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
    (dict(min_p=1.5), "min_p must be in"),
    (dict(stop=[""]), r"stop\[0\] must be a non-empty string"),
    (dict(stop=3), "stop must be a string"),
    (dict(best_of=1, n=2), "best_of must be in"),
    (dict(best_of=3, temperature=0), "best_of=3 needs sampling"),
    (dict(prompt_logprobs=-1), "prompt_logprobs must be >= 0"),
    (dict(logit_bias={-1: 1.0}), "logit_bias: key -1"),
    (dict(logit_bias=[1]), "logit_bias must be a dict"),
    (dict(allowed_token_ids=[]), "allowed_token_ids is empty"),
    (dict(truncate_prompt_tokens=0), "truncate_prompt_tokens must be >= 1"),
    (dict(include_stop_str_in_output="yes"), "include_stop_str_in_output must be True"),
    (dict(use_beam_search=True, temperature=0, n=2, presence_penalty=1.0),
     "not supported with use_beam_search"),
])
def test_each_field_is_checked(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        SamplingParams(**kwargs)


def test_logit_bias_is_clamped_and_ids_checked_against_the_vocabulary(llm: LLM) -> None:
    assert SamplingParams(logit_bias={"5": 1e9, 6: -1e9}).logit_bias == {5: 100.0, 6: -100.0}
    with pytest.raises(ConfigError, match="outside the model's vocabulary"):
        llm.generate("hi", SamplingParams(temperature=0, logit_bias={10**6: 1.0}))


def test_metrics_carry_v1_names_beside_v0(llm: LLM) -> None:
    out = llm.generate({"prompt_token_ids": PROMPT},
                       SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0]
    m = out.metrics
    assert m.first_token_ts == m.first_token_time and m.scheduled_ts == m.first_scheduled_time
    assert m.last_token_ts == m.last_token_time
    assert m.e2e_latency == m.finished_time - m.arrival_time
    assert m.queued_time == m.time_in_queue
    assert m.prefill_time + m.decode_time == pytest.approx(m.inference_time)
    assert m.num_generation_tokens == 5 and m.num_prompt_tokens == len(PROMPT)
    assert m.mean_time_per_output_token == pytest.approx(m.decode_time / 4)
    assert m.first_token_latency > 0


def test_lora_request_refused_and_chat_template_used(llm: LLM) -> None:
    with pytest.raises(ConfigError, match="lora_request=.*not supported"):
        llm.generate("hi", lora_request=object())
    with pytest.raises(ConfigError, match="lora_request"):
        llm.chat([{"role": "user", "content": "hi"}], lora_request="adapter")
    template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
    out = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=2),
                   chat_template=template)
    assert out[0].prompt == "[user] hi\n"
    assert out[0].prompt_token_ids == list(b"[user] hi\n")
