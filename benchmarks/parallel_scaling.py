"""Parallel scaling: TP 1/2/4/8 on NVLink vs PCIe, TP vs PP at equal GPUs, EP vs TP for Mixtral.

Every number is simulated (timing-only engine runs and cost-model step prices) from the hardware
profiles; the expert-load imbalance of the EP rows is measured by running the functional tiny
proxy of Mixtral (its real top-2 router) on a batch of tokens.

    .venv/bin/python benchmarks/parallel_scaling.py      # prints tables, writes results/parallel_scaling.json
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from common import print_table, write_json

from parallel.cost import ParallelCostModel
from parallel.plan import ParallelPlan
from parallel.tensor import ShardedModel
from sim.core.errors import InfersimError
from sim.core.step_shape import StepShape
from sim.engine.args import EngineArgs
from sim.engine.engine import Engine
from sim.model.numpy_model import NumpyModel
from sim.model.proxy import tiny_proxy_config
from sim.model.zoo import resolve_model
from sim.workload.specs import make_workload

LLAMA7, LLAMA70 = "meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-70b-hf"
MIXTRAL = "mistralai/Mixtral-8x7B-v0.1"
NUM_PROMPTS, INPUT_LEN, OUTPUT_LEN = 256, 512, 128


def serve(model: str, hardware: str, plan: ParallelPlan,
          expert_imbalance: float = 1.0) -> dict[str, Any]:
    """One timing-only run of the default workload; step prices of three typical shapes."""
    row: dict[str, Any] = {"model": model.split("/")[1], "hardware": hardware, "tp": plan.tp,
                           "pp": plan.pp, "ep": plan.ep, "gpus": plan.num_gpus}
    try:
        engine = Engine(EngineArgs(model=model, hardware=hardware, mode="timing",
                                   kv_cache="paged", tensor_parallel_size=plan.tp,
                                   pipeline_parallel_size=plan.pp,
                                   enable_expert_parallel=plan.ep > 1))
    except InfersimError as exc:
        return {**row, "fits": False, "reason": str(exc).split(":")[0]}
    cost = ParallelCostModel(engine.model_config, engine.hardware, plan,
                             dtype=engine.timing_dtype, expert_imbalance=expert_imbalance)
    engine.cost_model = cost
    result = engine.run(make_workload(NUM_PROMPTS, math.inf, INPUT_LEN, OUTPUT_LEN, seed=0),
                        keep_requests=False)
    s = result.summary
    shapes = {"decode_b1": StepShape.decode([1024]), "decode_b64": StepShape.decode([1024] * 64),
              "prefill_2048": StepShape.prefill([2048])}
    for key, shape in shapes.items():
        c = cost.step_cost(shape)
        row[f"{key}_ms"] = round(c.total_s * 1e3, 3)
        comm_s = c.parts["comm"] + c.parts.get("comm_launch", 0.0)  # transfers + call costs
        row[f"{key}_comm_%"] = round(100 * comm_s / c.total_s, 1)
    stats = engine.parallel_stats
    row.update({
        "fits": True, "kv_tokens": engine.memory.num_kv_tokens,
        "out_tok_s": round(s.output_throughput), "out_tok_s_per_gpu": round(
            s.output_throughput / plan.num_gpus), "mean_ttft_ms": round(
            s.stats("ttft").mean_s * 1e3, 1), "mean_tpot_ms": round(s.stats("tpot").mean_s * 1e3,
                                                                    2),
        "bubble_%": round(100 * stats.bubble_fraction(), 1) if stats is not None else 0.0,
    })
    return row


def measured_imbalance(ep: int, num_tokens: int = 512, seed: int = 0) -> dict[str, Any]:
    """Expert-rank imbalance of the functional Mixtral proxy's real router at `ep` ranks."""
    config = tiny_proxy_config(resolve_model(MIXTRAL), n_layer=4)
    model = ShardedModel(NumpyModel.random(config, seed=seed), ParallelPlan(tp=ep, ep=ep))
    ids = np.random.default_rng(seed).integers(0, config.n_vocab, size=num_tokens)  # [n_tok]
    model.forward(ids)
    load = model.expert_load
    assert load is not None
    return {"ep": ep, "imbalance": round(load.imbalance(), 3),
            "expert_share": load.summary()["expert_share"]}


def main() -> None:
    tp_rows = [serve(m, hw, ParallelPlan(tp=tp)) for m in (LLAMA7, LLAMA70)
               for hw in ("a100-sxm4-80gb", "l40s") for tp in (1, 2, 4, 8)]
    keys = ["model", "hardware", "tp", "kv_tokens", "out_tok_s", "out_tok_s_per_gpu",
            "mean_tpot_ms", "decode_b1_ms", "decode_b1_comm_%", "decode_b64_comm_%",
            "prefill_2048_ms", "prefill_2048_comm_%"]
    print_table(f"TP scaling ({NUM_PROMPTS} requests, {INPUT_LEN} in / {OUTPUT_LEN} out, all at "
                "once; step prices at context 1024)", _table(tp_rows, keys))

    tp_pp = [(4, 1), (2, 2), (1, 4), (8, 1), (4, 2), (2, 4), (1, 8)]
    pp_rows = [serve(LLAMA70, hw, ParallelPlan(tp=t, pp=p)) for hw in ("a100-sxm4-80gb", "l40s")
               for t, p in tp_pp]
    keys = ["hardware", "gpus", "tp", "pp", "kv_tokens", "out_tok_s", "mean_ttft_ms",
            "mean_tpot_ms", "decode_b64_comm_%", "bubble_%"]
    print_table("TP vs PP at equal GPU count, Llama-2-70B", _table(pp_rows, keys))

    imbalance = {ep: measured_imbalance(ep) for ep in (2, 4, 8)}
    ep_rows = []
    for gpus in (2, 4, 8):
        ep_rows.append(serve(MIXTRAL, "a100-sxm4-80gb", ParallelPlan(tp=gpus)))
        row = serve(MIXTRAL, "a100-sxm4-80gb", ParallelPlan(tp=gpus, ep=gpus),
                    imbalance[gpus]["imbalance"])
        ep_rows.append({**row, "imbalance": imbalance[gpus]["imbalance"]})
    keys = ["gpus", "tp", "ep", "imbalance", "out_tok_s", "mean_tpot_ms", "decode_b64_ms",
            "decode_b64_comm_%", "prefill_2048_ms", "prefill_2048_comm_%"]
    print_table("EP vs TP, Mixtral-8x7B on A100-SXM4-80GB (EP imbalance measured by the "
                "functional proxy's router)", _table(ep_rows, keys))
    path = write_json("parallel_scaling", {
        "workload": {"num_prompts": NUM_PROMPTS, "input_len": INPUT_LEN,
                     "output_len": OUTPUT_LEN, "arrivals": "all at once"},
        "tp_scaling": tp_rows, "tp_vs_pp": pp_rows, "ep_vs_tp": ep_rows,
        "ep_imbalance": list(imbalance.values())})
    print(f"\nwrote {path}")


def _table(rows: list[dict[str, Any]], keys: list[str]) -> list[dict[str, Any]]:
    return [{k: r.get(k, "-") if r["fits"] else ("does not fit" if k == "kv_tokens"
                                                else r.get(k, "-")) for k in keys}
            for r in rows]


if __name__ == "__main__":
    main()
