"""Collectives by implementation: vLLM's custom all-reduce rules, one-/two-shot pricing by
topology, the per-call (launch/graph) term, the two engine flags and the eager fit to Vidur."""

from __future__ import annotations

import math

import pytest

from parallel.collectives import (
    CUDA_GRAPH_MAX_TOKENS,
    CUSTOM_AR_MAX_BYTES,
    Collectives,
    CommMode,
    custom_all_reduce_algorithm,
    one_shot_all_reduce_s,
    two_shot_all_reduce_s,
)
from parallel.cost import ParallelCostModel
from parallel.plan import ParallelPlan
from sim.core.errors import ConfigError
from sim.core.step_shape import StepShape
from sim.engine.args import EngineArgs
from sim.engine.engine import Engine
from sim.model.zoo import resolve_model
from sim.timing.calibration import default_data_dir, fit_all_reduce
from sim.timing.hardware import Link, load_profile

A100 = load_profile("a100-sxm4-80gb")
MI300X = load_profile("mi300x")
L40S = load_profile("l40s")
LLAMA7 = resolve_model("meta-llama/Llama-2-7b-hf")
KIB = 1024


@pytest.mark.parametrize(("num_bytes", "n", "topology", "expected"), [
    (8 * KIB, 2, "bus", "one_shot"),  # pairs: one-shot at any size under the buffer
    (4 * 2**20, 2, "switch", "one_shot"),
    (511 * KIB, 4, "switch", "one_shot"),
    (512 * KIB, 4, "switch", "two_shot"),
    (255 * KIB, 8, "switch", "one_shot"),
    (256 * KIB, 8, "switch", "two_shot"),
    (255 * KIB, 6, "mesh", "one_shot"),
    (CUSTOM_AR_MAX_BYTES, 8, "switch", None),  # over the registered buffer: NCCL
    (8 * KIB, 3, "switch", None),  # no kernel for 3 GPUs
    (8 * KIB, 16, "switch", None),
    (8 * KIB, 4, "bus", None),  # more than 2 GPUs not fully connected: vLLM disables it
])
def test_vllm_custom_all_reduce_selection(num_bytes: int, n: int, topology: str,
                                          expected: str | None) -> None:
    assert custom_all_reduce_algorithm(num_bytes, n, topology) == expected


def test_one_and_two_shot_bytes_by_topology() -> None:
    switch = Link("nvs", 100e9, 1e-6, topology="switch")
    mesh = Link("xgmi", 100e9, 1e-6, topology="mesh")
    s, n = 1e6, 8
    # a switch shares the GPU's port: (n-1) S into each GPU in one step
    assert one_shot_all_reduce_s(switch, s, n) == pytest.approx(1e-6 + (n - 1) * s / 100e9)
    # a mesh reads each peer over its own link, all at once
    assert one_shot_all_reduce_s(mesh, s, n) == pytest.approx(1e-6 + s / 100e9)
    assert two_shot_all_reduce_s(switch, s, n) == pytest.approx(2 * (1e-6 + (n - 1) * s / n
                                                                    / 100e9))
    assert two_shot_all_reduce_s(mesh, s, n) == pytest.approx(2 * (1e-6 + s / n / 100e9))
    assert one_shot_all_reduce_s(switch, s, 1) == two_shot_all_reduce_s(mesh, 0.0, 8) == 0.0


def test_default_is_vllm_graphs_and_custom_all_reduce() -> None:
    c = Collectives.gpu_link(A100)
    assert c.mode == CommMode(cuda_graphs=True, custom_all_reduce=True)
    small = c.all_reduce(8 * KIB, 8)
    assert small.algorithm == "one_shot"
    assert A100.collectives is not None
    assert small.call_s == A100.collectives.custom_all_reduce_call_s
    # the 8 KB all-reduce at TP8 on A100: ~37 us priced as eager NCCL; now a few us
    assert small.total_s < 10e-6
    eager = Collectives.gpu_link(A100, CommMode.from_flags(True, True)).all_reduce(8 * KIB, 8)
    assert eager.algorithm == "tree"
    assert eager.call_s == A100.collectives.nccl_eager_call_s
    assert eager.total_s > 4 * small.total_s
    graphs_nccl = Collectives.gpu_link(A100, CommMode(custom_all_reduce=False))
    assert graphs_nccl.all_reduce(8 * KIB, 8).call_s == A100.collectives.nccl_graph_call_s
    # large messages are NCCL's ring whatever the flags
    assert c.all_reduce(64 * 2**20, 8).algorithm == "ring"


def test_eager_custom_all_reduce_pays_the_launch() -> None:
    eager_custom = Collectives.gpu_link(A100, CommMode(cuda_graphs=False))
    graphed = Collectives.gpu_link(A100)
    assert eager_custom.all_reduce(8 * KIB, 8).algorithm == "one_shot"
    assert eager_custom.all_reduce_s(8 * KIB, 8) > graphed.all_reduce_s(8 * KIB, 8) + 20e-6
    # a step over the graph capture limit runs eagerly even with graphs on
    assert graphed.all_reduce(8 * KIB, 8, graphed=False).call_s == pytest.approx(
        eager_custom.all_reduce(8 * KIB, 8).call_s)


def test_mi300x_custom_all_reduce_uses_every_mesh_link() -> None:
    c = Collectives.gpu_link(MI300X, CommMode(cuda_graphs=True))
    one = c.all_reduce(200 * KIB, 8)
    assert one.algorithm == "one_shot"
    nccl = Collectives.gpu_link(MI300X, CommMode(custom_all_reduce=False)).all_reduce(200 * KIB, 8)
    assert one.transfer_s < nccl.transfer_s / 3


def test_pcie_profiles_use_custom_all_reduce_for_pairs_only() -> None:
    c = Collectives.gpu_link(L40S)
    assert L40S.gpu_link.topology == "bus"
    assert c.all_reduce(8 * KIB, 2).algorithm == "one_shot"
    assert c.all_reduce(8 * KIB, 4).algorithm in ("ring", "tree")


def test_step_reports_the_launch_term_and_follows_the_capture_limit() -> None:
    plan = ParallelPlan(tp=8)
    default = ParallelCostModel(LLAMA7, A100, plan)
    eager = ParallelCostModel(LLAMA7, A100, plan, comm_mode=CommMode.from_flags(True, True))
    decode = StepShape.decode([1024] * 32)
    d, e = default.step_cost(decode), eager.step_cost(decode)
    assert "comm_launch" in default.part_names
    assert d.total_s == pytest.approx(math.fsum(d.parts.values()))
    n_calls = 2 * LLAMA7.n_layer + 2  # two per layer, the embedding's, the logits' gather
    assert A100.collectives is not None
    assert e.parts["comm_launch"] == pytest.approx(n_calls * A100.collectives.nccl_eager_call_s)
    assert d.parts["comm_launch"] < e.parts["comm_launch"] / 5
    assert d.total_s < e.total_s
    # 32 x 4096 x 2 bytes = 256 KiB at 8 GPUs: just at the one-shot limit, so two-shot
    assert default.comm_breakdown(decode).all_reduce_algorithm == "two_shot"
    # the fast path agrees with the full price
    assert default.step_time_s((1,) * 32, (1024,) * 32) == pytest.approx(d.total_s, rel=1e-12)
    # a prefill over the capture limit runs eagerly: the same call costs as enforce_eager
    big = StepShape.prefill([CUDA_GRAPH_MAX_TOKENS + 1])
    assert default.comm_breakdown(big).launch_s > default.comm_breakdown(
        StepShape.prefill([CUDA_GRAPH_MAX_TOKENS])).launch_s * 3


def test_engine_flags_reach_the_pricer() -> None:
    base = dict(model="meta-llama/Llama-2-7b-hf", mode="timing", tensor_parallel_size=2)
    default = Engine(EngineArgs(**base)).cost_model
    eager = Engine(EngineArgs(**base, enforce_eager=True,
                              disable_custom_all_reduce=True)).cost_model
    assert isinstance(default, ParallelCostModel) and isinstance(eager, ParallelCostModel)
    assert default.comm_mode == CommMode()
    assert eager.comm_mode == CommMode(cuda_graphs=False, custom_all_reduce=False)
    shape = StepShape.decode([512] * 16)
    assert eager.step_cost(shape).total_s > default.step_cost(shape).total_s


@pytest.mark.parametrize("name", ["enforce_eager", "disable_custom_all_reduce"])
def test_flags_must_be_bools(name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        EngineArgs(model="meta-llama/Llama-2-7b-hf", mode="timing", **{name: "yes"})


def test_cli_flags_parse() -> None:
    from sim.cli.main import build_parser, engine_args_from

    ns = build_parser().parse_args(["simulate", "--model", "meta-llama/Llama-2-7b-hf",
                                   "--enforce-eager", "--disable-custom-all-reduce"])
    args = engine_args_from(ns)
    assert args.enforce_eager and args.disable_custom_all_reduce


DATA = default_data_dir() / "network" / "a100_dgx" / "all_reduce.csv"


@pytest.mark.skipif(not DATA.is_file(), reason=f"Vidur's network data not at {DATA}")
def test_eager_fit_beats_the_old_ring_only_fit() -> None:
    fit = fit_all_reduce()
    assert fit["median_err"] < 0.10  # the ring-only fit had 17%
    assert 20e-6 < fit["nccl_eager_call_s"] < 60e-6  # eager: launch and skew dominate
    assert all(err < 0.15 for err in fit["median_err_by_workers"].values())


def test_gaudi_has_no_custom_all_reduce_and_new_profiles_price() -> None:
    gaudi = Collectives.gpu_link(load_profile("gaudi3"))
    assert not gaudi.mode.custom_all_reduce  # HCCL runs every collective on Gaudi
    assert gaudi.all_reduce(8 * KIB, 8).algorithm in ("ring", "tree")
    b200 = Collectives.gpu_link(load_profile("b200"))
    h100 = Collectives.gpu_link(load_profile("h100-sxm"))
    assert b200.all_reduce(64 * 2**20, 8).total_s < h100.all_reduce(64 * 2**20, 8).total_s
    v100 = Collectives.gpu_link(load_profile("v100-sxm2-32gb"))  # DGX-1 cube mesh: pairs only
    assert v100.all_reduce(8 * KIB, 2).algorithm == "one_shot"
    assert v100.all_reduce(8 * KIB, 8).algorithm in ("ring", "tree")
