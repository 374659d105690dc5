"""The vLLM-style front door: `from sim import LLM, SamplingParams`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sim import LLM, SamplingParams
from sim.core.errors import ConfigError, InfersimError


@pytest.fixture(scope="module")
def llm():
    return LLM(model="meta-llama/Llama-2-7b-chat-hf", max_num_seqs=256)


def test_classic_snippet(llm):
    prompts = ["Hello, my name is", "The president of the United States is",
               "The capital of France is", "The future of AI is"]
    outputs = llm.generate(prompts, SamplingParams(temperature=0.7, top_p=0.9, max_tokens=32))
    assert [o.prompt for o in outputs] == prompts
    for out in outputs:
        completion = out.outputs[0]
        assert isinstance(completion.text, str)
        assert 0 < len(completion.token_ids) <= 32
        assert completion.finish_reason in ("stop", "length")
        m = out.metrics
        assert 0 == m.arrival_time <= m.first_scheduled_time < m.first_token_time
        assert m.first_token_time <= m.last_token_time <= m.finished_time
        assert m.time_in_queue == m.first_scheduled_time - m.arrival_time
    assert "Llama-2-7b-chat-hf" in llm.last_result.description


def test_logprobs_and_token_id_prompts(llm):
    params = SamplingParams(temperature=0.0, max_tokens=5, logprobs=3, ignore_eos=True)
    out = llm.generate({"prompt_token_ids": [1, 72, 101, 108]}, params)[0]
    completion = out.outputs[0]
    assert out.prompt_token_ids == [1, 72, 101, 108]
    assert len(completion.logprobs) == 5
    for token, entry in zip(completion.token_ids, completion.logprobs, strict=True):
        assert token in entry and entry[token].rank == 1  # greedy picks the top token
        assert 3 <= len(entry) <= 4
    assert completion.cumulative_logprob == pytest.approx(
        sum(e[t].logprob for t, e in zip(completion.token_ids, completion.logprobs, strict=True)))


def test_sampling_params_per_prompt_and_mismatch(llm):
    outs = llm.generate(["a", "b"], [SamplingParams(max_tokens=2, ignore_eos=True),
                                     SamplingParams(max_tokens=3, ignore_eos=True)])
    assert [len(o.outputs[0].token_ids) for o in outs] == [2, 3]
    with pytest.raises(ConfigError, match="one per prompt"):
        llm.generate(["a", "b"], [SamplingParams()])


def test_too_long_prompt_rejected_others_run():
    llm = LLM(model="meta-llama/Llama-2-7b-hf", max_model_len=64)
    outs = llm.generate(["x" * 200, "short"], SamplingParams(max_tokens=4, ignore_eos=True))
    assert outs[0].outputs[0].finish_reason == "rejected"
    assert "max_model_len" in outs[0].reject_reason
    assert outs[1].outputs[0].finish_reason == "length"


def test_timing_mode_generate_counts_only():
    llm = LLM(model="meta-llama/Llama-2-7b-hf", mode="timing")
    out = llm.generate(["hello"], SamplingParams(max_tokens=7))[0]
    assert out.outputs[0].token_ids == [] and out.metrics.finished_time > 0


def test_unknown_engine_argument():
    with pytest.raises(ConfigError, match="max_num_seqs"):
        LLM(model="meta-llama/Llama-2-7b-hf", max_num_seq=4)


def test_tensor_parallel_size_that_does_not_divide_the_heads_is_a_clear_error():
    with pytest.raises(ConfigError, match="tensor_parallel_size 3 must divide n_head"):
        LLM(model="meta-llama/Llama-2-7b-hf", tensor_parallel_size=3)


def test_unknown_model_suggests():
    with pytest.raises(InfersimError, match="Llama-2-7b-hf"):
        LLM(model="meta-llama/Llama-2-7b")


def test_local_checkpoint_folder_runs_real_weights(tmp_path):
    """A Hugging Face folder (config.json + model.safetensors) is both what runs and what is
    priced; its greedy tokens equal the cacheless reference on the same weights."""
    from safetensors.numpy import save_file

    from sim.core.model_config import ModelConfig
    from sim.model.numpy_model import NumpyModel
    from sim.model.reference import generate

    hf_config = {
        "model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 300, "max_position_embeddings": 128, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "torch_dtype": "float32", "bos_token_id": 256,
        "eos_token_id": 257, "tie_word_embeddings": False,
    }
    (tmp_path / "config.json").write_text(json.dumps(hf_config))
    model = NumpyModel.random(ModelConfig.from_hf_config(hf_config, "tiny"), seed=3,
                              dtype="float64")
    save_file({k: np.ascontiguousarray(v) for k, v in model.state_dict().items()},
              str(tmp_path / "model.safetensors"))
    llm = LLM(model=str(tmp_path), dtype="float64", hardware="l4", tokenizer="byte")
    ids = [256, 10, 20, 30, 40]
    out = llm.generate({"prompt_token_ids": ids},
                       SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    assert out.outputs[0].token_ids == generate(model, ids, 8)
    assert llm.engine.model_config.n_embd == 32  # the folder's shape is priced
