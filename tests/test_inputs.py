"""Every input gets a clear answer (issue 16): EngineArgs, model configs, trace CSVs, sizes.

Each bad input is a `ConfigError`/`InfersimError` naming the field (or row and column) and the
value, raised before anything sized by it is allocated; each accepted oddity (a BOM header,
`n > 1` under a tight pool) gives the right result. The randomised counterpart, every CLI
command in a subprocess under a memory cap, is `tests/test_fuzz.py`.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest

from cache.block_pool import BlockPool
from cache.swap_space import SwapSpace
from sim import LLM, SamplingParams
from sim.cli.demo import check_demo_sizes
from sim.cli.main import main
from sim.core.errors import ConfigError, InfersimError
from sim.core.model_config import ModelConfig
from sim.engine.args import MAX_NUM_GPUS, EngineArgs
from sim.engine.engine import Engine
from sim.engine.planner import evaluate_plans
from sim.model.zoo import BUILTIN_HF_CONFIGS
from sim.workload.azure_trace import load_azure_trace
from sim.workload.shared_prefix import shared_prefix_workload
from sim.workload.specs import RequestSpec, make_workload
from speculative.tree import MAX_TREE_NODES, TreeShape

LLAMA = "meta-llama/Llama-2-7b-hf"
TINY = "JackFram/llama-68m"
HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"


# ----------------------------------------------------------------------------- EngineArgs
@pytest.mark.parametrize(("kwargs", "words"), [
    ({"block_size": "16"}, ["block_size='16'", "not a string"]),
    ({"max_num_seqs": 2.5}, ["max_num_seqs=2.5", "not a float"]),
    ({"max_num_seqs": 8.0}, ["max_num_seqs=8.0", "pass 8"]),
    ({"tensor_parallel_size": True}, ["tensor_parallel_size=True", "not a bool"]),
    ({"seed": -1}, ["seed=-1", "0.."]),
    ({"gpu_memory_utilization": math.nan}, ["gpu_memory_utilization=nan", "finite"]),
    ({"gpu_memory_utilization": 90}, ["gpu_memory_utilization=90", "(0, 1]"]),
    ({"gpu_memory_utilization": 0}, ["gpu_memory_utilization=0", "(0, 1]"]),
    ({"swap_space": math.inf}, ["swap_space=inf", "finite"]),
    ({"swap_space": 1e9}, ["swap_space=1e+09", "GiB"]),
    ({"kv_watermark": "0.1"}, ["kv_watermark='0.1'", "number"]),
    ({"enable_prefix_caching": 1}, ["enable_prefix_caching=1", "True or False"]),
    ({"data_parallel_size": 100_000}, ["data_parallel_size=100000", "1..1,024"]),
    ({"tensor_parallel_size": 16, "pipeline_parallel_size": 16, "data_parallel_size": 32},
     ["8,192 GPUs", str(MAX_NUM_GPUS)]),
    ({"pipeline_parallel_size": 0}, ["pipeline_parallel_size=0"]),
    ({"max_model_len": 10**12}, ["max_model_len=1000000000000", "typo"]),
    ({"num_gpu_blocks_override": 10**12}, ["num_gpu_blocks_override=1000000000000"]),
    ({"long_prefill_token_threshold": 64}, ["long_prefill_token_threshold=64",
                                            "enable_chunked_prefill"]),
    ({"max_num_partial_prefills": 2}, ["max_num_partial_prefills=2", "enable_chunked_prefill"]),
    ({"preferred_batch_sizes": "4"}, ["preferred_batch_sizes='4'", "list of integers"]),
    ({"preferred_batch_sizes": [4, 2.5]}, ["preferred_batch_sizes[1]=2.5"]),
    ({"preferred_batch_sizes": [512]}, ["preferred_batch_sizes=[512]", "max_num_seqs"]),
    ({"max_wait_s": -1.0}, ["max_wait_s=-1", ">= 0"]),
    ({"admission_rate_per_s": 0.0}, ["admission_rate_per_s=0", "> 0"]),
    ({"mode": None}, ["mode=None", "is not one of"]),
    ({"max_num_seqs": None}, ["max_num_seqs=None", "not allowed"]),
])
def test_engine_args_refusals_name_field_and_value(kwargs, words):
    with pytest.raises(ConfigError) as info:
        EngineArgs(**kwargs)
    message = str(info.value)
    for word in words:
        assert word in message, (word, message)


def test_engine_args_normalise_numpy_scalars_and_lists():
    args = EngineArgs(max_num_seqs=np.int64(8), gpu_memory_utilization=np.float32(0.5),
                      scheduler="dynamic", preferred_batch_sizes=[2, np.int32(4)],
                      enable_expert_parallel=np.bool_(True))
    assert type(args.max_num_seqs) is int and args.max_num_seqs == 8
    assert type(args.gpu_memory_utilization) is float
    assert args.preferred_batch_sizes == (2, 4)
    assert args.enable_expert_parallel is True
    # chunked prefill settings are accepted together with chunked prefill
    EngineArgs(enable_chunked_prefill=True, long_prefill_token_threshold=64,
               max_num_partial_prefills=2)


# ----------------------------------------------------------------------------- model configs
def _hf(**changes: object) -> dict[str, object]:
    return {**BUILTIN_HF_CONFIGS[LLAMA], **changes}


@pytest.mark.parametrize(("changes", "words"), [
    ({"num_key_value_heads": 0}, ["num_key_value_heads", "0"]),
    ({"num_attention_heads": 0}, ["num_attention_heads", "0"]),
    ({"head_dim": 7}, ["head_dim = 7", "even"]),
    ({"hidden_size": 4097}, ["4097", "multiple of num_attention_heads"]),
    ({"rope_theta": math.nan}, ["rope_theta", "nan"]),
    ({"rope_theta": -1.0}, ["rope_theta", "-1.0"]),
    ({"rms_norm_eps": "1e-5"}, ["rms_norm_eps", "'1e-5'"]),
    ({"eos_token_id": "2"}, ["eos_token_id", "'2'"]),
    ({"eos_token_id": [2, 2.5]}, ["eos_token_id", "2.5"]),
    ({"eos_token_id": 10**9}, ["eos_token_id", "vocab_size"]),
    ({"num_hidden_layers": 10**9}, ["num_hidden_layers = 1,000,000,000", "typo"]),
    ({"intermediate_size": "11008"}, ["intermediate_size", "'11008'"]),
    ({"sliding_window": 4.5, "model_type": "mistral"}, ["sliding_window", "4.5"]),
    ({"num_hidden_layers": 4000, "hidden_size": 2**19, "num_attention_heads": 2**12,
      "intermediate_size": 2**21}, ["parameters", "num_hidden_layers"]),
])
def test_model_config_refusals(changes, words):
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_hf_config(_hf(**changes))
    message = str(info.value)
    for word in words:
        assert word in message, (word, message)


def test_parameter_count_is_closed_form():
    """num_params of a deep MoE answers at once and equals the per-layer sum it replaces."""
    qwen = ModelConfig.from_hf_config(BUILTIN_HF_CONFIGS["Qwen/Qwen1.5-MoE-A2.7B"])
    deep = qwen.replace(n_layer=4096, decoder_sparse_step=3, mlp_only_layers=(2, 5, 5, 7, 9999))
    start = time.perf_counter()
    total = deep.num_params()
    assert time.perf_counter() - start < 0.01
    by_layer = deep.n_layer * (deep.attn_params_per_layer() + 2 * deep.norm_params())
    by_layer += sum(deep.moe_params_per_layer() if deep.is_moe_layer(i)
                    else deep.dense_mlp_params(deep.n_inner) for i in range(deep.n_layer))
    # embedding (+ lm_head unless tied) + final norm
    by_layer += deep.n_vocab * deep.n_embd * (1 + (not deep.tie_word_embeddings))
    by_layer += deep.norm_params()
    assert total == by_layer
    assert deep.num_moe_layers == sum(deep.is_moe_layer(i) for i in range(deep.n_layer))


def test_absent_kv_heads_is_still_mha():
    config = ModelConfig.from_hf_config({k: v for k, v in _hf().items()
                                         if k != "num_key_value_heads"})
    assert config.n_kv_head == config.n_head


# ----------------------------------------------------------------------------- trace CSVs
def _trace(tmp_path: Path, text: str, name: str = "t.csv", encoding: str = "utf-8") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode(encoding))
    return path


def test_trace_with_bom_header_reads(tmp_path):
    rows = "2023-11-16 18:15:46.6805900,374,44\n2023-11-16 18:15:47.6805900,10,4\n"
    trace = load_azure_trace(_trace(tmp_path, HEADER + rows, encoding="utf-8-sig"))
    assert list(trace.prompt_len) == [374, 10] and trace.arrival_s[1] == pytest.approx(1.0)


@pytest.mark.parametrize(("row", "words"), [
    ("2023-11-16 18:15:46,100000000000000000000000,4", ["data row 2", "ContextTokens",
                                                        "100000000000000000000000"]),
    ("2023-11-16 18:15:46,10,3000000000", ["data row 2", "GeneratedTokens", "3,000,000,000"]),
    ("2023-11-16 18:15:46,1e23,4", ["data row 2", "ContextTokens", "'1e23'"]),
    ("2023-11-16 18:15:46,-5,4", ["data row 2", "ContextTokens", "-5"]),
    ("2900-01-01 00:00:00,10,4", ["data row 2", "2900", "1678..2261"]),
    ("2023-11-16 18:15:45,10,4", ["data row 2", "earlier", "sorted"]),
    ("2023-13-45 18:15:45,10,4", ["data row 2", "bad TIMESTAMP"]),
])
def test_trace_bad_values_name_row_and_column(tmp_path, row, words):
    path = _trace(tmp_path, HEADER + "2023-11-16 18:15:46,10,4\n" + row + "\n")
    with pytest.raises(ConfigError) as info:
        load_azure_trace(path)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_trace_spanning_centuries_is_refused_not_wrapped(tmp_path):
    path = _trace(tmp_path, HEADER + "1700-01-01 00:00:00,10,4\n2250-01-01 00:00:00,10,4\n")
    with pytest.raises(ConfigError, match="more than 200 years"):
        load_azure_trace(path)
    ok = load_azure_trace(_trace(tmp_path, HEADER + "2020-01-01 00:00:00,10,4\n"
                                 "2023-01-01 00:00:00.0000001,10,4\n", "years.csv"))
    assert ok.arrival_s[1] == pytest.approx(1096 * 86400 + 1e-7, abs=1e-6)


def test_trace_repeated_column_and_blank_middle_line(tmp_path):
    path = _trace(tmp_path, "TIMESTAMP,ContextTokens,GeneratedTokens,ContextTokens\n")
    with pytest.raises(ConfigError, match="more than once"):
        load_azure_trace(path)
    path = _trace(tmp_path, HEADER + "2023-11-16 18:15:46,10,4\n\n2023-11-16 18:15:47,10,4\n",
                  "blank.csv")
    with pytest.raises(ConfigError, match="data row 2"):
        load_azure_trace(path)
    trailing = _trace(tmp_path, HEADER + "2023-11-16 18:15:46,10,4\n\n\n", "trail.csv")
    assert len(load_azure_trace(trailing)) == 1


def test_trace_limit_reads_only_the_rows_it_needs(tmp_path):
    """Rows past `limit` are never read: a corrupt tail does not matter."""
    rows = "".join(f"2023-11-16 18:15:{i:02d},10,4\n" for i in range(5))
    path = _trace(tmp_path, HEADER + rows + "garbage\xff,row\n" * 3)
    assert len(load_azure_trace(path, limit=5)) == 5
    with pytest.raises(ConfigError, match="data row 6"):
        load_azure_trace(path)


# ----------------------------------------------------------------------------- bounded sizes
def test_pool_override_past_gpu_memory_is_refused_with_the_size():
    engine = Engine(EngineArgs(mode="timing", num_gpu_blocks_override=10_000_000))
    with pytest.raises(ConfigError, match=r"num_gpu_blocks_override=10,000,000 .* GiB"):
        engine.run(make_workload(1, math.inf, 8, 2))


def test_pools_are_lazy_and_hand_out_lowest_ids_first():
    pool = BlockPool(10**12, 16)  # no per-block list: instant
    assert pool.num_free_blocks() == 10**12
    first = pool.take_new(3)
    assert first == [0, 1, 2]
    pool.release([1])
    assert pool.take_new(2) == [1, 3]  # the released id first, then the next fresh one
    pool.check()
    swap = SwapSpace(10**12)
    assert swap.swap_out("r", [5, -1, 7]) is not None and swap.host_table("r") == [0, -1, 1]
    swap.check()


def test_many_replicas_of_a_tiny_model_fit_in_memory():
    engine = Engine(EngineArgs(model=TINY, mode="timing", data_parallel_size=256))
    result = engine.run(make_workload(4, math.inf, 16, 4))
    assert sum(r.num_output_tokens for r in result.requests) == 16


def test_workload_sizes_are_checked_before_drawing():
    with pytest.raises(InfersimError, match="system_len=1,000,000,000,000"):
        shared_prefix_workload(2, math.inf, 10**12, 8, 4)
    with pytest.raises(InfersimError, match="100,000,000,000 tokens"):
        make_workload(1, math.inf, 10**11, 4)
    with pytest.raises(InfersimError, match="prompt tokens"):
        next(iter(make_workload(4, math.inf, 2**25, 4, vocab_size=100)))
    # found by tests/test_fuzz.py: --num-prompts 1e30 hung, then ran out of memory
    with pytest.raises(InfersimError, match="arriving at once"):
        make_workload(10**30, math.inf, 8, 4)
    assert next(iter(make_workload(10**30, 10.0, 8, 4))).request_id == "req-0"  # streams lazily


def test_functional_prompt_longer_than_context_is_rejected_without_ids():
    engine = Engine(EngineArgs(model=TINY, max_model_len=64))
    result = engine.run([RequestSpec("long", 0.0, 10**10, 4)])
    assert result.requests[0].prompt_token_ids is None
    assert "max_model_len" in str(result.requests[0].reject_reason)


def test_demo_and_plans_bounds():
    with pytest.raises(ConfigError, match="--input-len 100000000000"):
        check_demo_sizes(1, 10**11, 4, 4096)
    with pytest.raises(ConfigError, match="max_model_len is 2048"):
        check_demo_sizes(1, 2000, 100, 2048)
    check_demo_sizes(16, 128, 128, 4096)
    with pytest.raises(InfersimError, match="--num-gpus 1000000"):
        evaluate_plans(LLAMA, "a100-sxm4-80gb", 1_000_000)
    with pytest.raises(InfersimError, match="max_position_embeddings"):
        evaluate_plans(LLAMA, "a100-sxm4-80gb", 1, input_len=10**6)


def test_large_token_tree_is_refused_before_its_mask():
    with pytest.raises(ConfigError, match=f"more than {MAX_TREE_NODES} nodes"):
        TreeShape((50, 50, 50))
    with pytest.raises(ConfigError, match="depth 100,000"):
        TreeShape((1,) * 100_000)
    assert TreeShape((4, 3, 2, 2)).num_nodes == 4 + 12 + 24 + 48


@pytest.mark.parametrize("argv", [
    ["simulate", "--mode", "timing", "--num-gpu-blocks-override", "1000000000000"],
    ["simulate", "--mode", "timing", "--shared-prefix-len", "1000000000000"],
    ["simulate", "--mode", "timing", "--data-parallel-size", "100000"],
    ["demo", "--input-len", "100000000000"],
    ["plans", "--num-gpus", "1000000"],
])
def test_cli_sizes_refused_in_one_line(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("infersim: error: ") and "\n" not in err


# ----------------------------------------------------------------------------- no lost work
@pytest.mark.parametrize("mode", ["timing", "functional"])
def test_parallel_sampling_under_a_tight_pool_serves_every_sample(mode):
    """n = 8 samples of 4 prompts in a pool that holds 12 blocks of 4 tokens: the forks are
    preempted and recomputed as needed, and every sample runs to its length."""
    llm = LLM(model=TINY, mode=mode, block_size=4, num_gpu_blocks_override=12,
              max_model_len=48, max_num_seqs=16)
    prompts = [{"prompt_token_ids": [1 + i, *range(2, 21)]} for i in range(4)]
    outs = llm.generate(prompts, SamplingParams(n=8, temperature=0.8, max_tokens=28, seed=1,
                                                ignore_eos=True))
    reasons = [c.finish_reason for o in outs for c in o.outputs]
    assert reasons == ["length"] * 32
    if mode == "functional":
        assert all(len(c.token_ids) == 28 for o in outs for c in o.outputs)
