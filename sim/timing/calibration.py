"""Calibrating the cost model's efficiency factors against measured GPU kernel times.

The data are Vidur's per-layer operator profiles (fp16, median of repeated runs) for several
Llama-family shapes at 1..4096 tokens and tensor parallelism 1..8 on A100-80GB and A40. For every
measured (GPU, model, op, tokens, TP) the cost model's roofline work of that op (`CostModel.
layer_op_work`: FLOPs and bytes, which do not depend on the efficiencies) is priced as

    gemm:        (c^p + m^p)^(1/p) + fixed,  c = flops / (peak * matmul_flops),
                                          m = bytes / (hbm * memory_bandwidth)
    elementwise: bytes / (hbm * elementwise_bandwidth * op scale) + fixed

(p = `roofline.ROOFLINE_P`; fixed = `roofline.LATENCY_UNITS[kind]` x the profile's
`kernel_launch_s`; op scale =
`roofline.NORM_BW_SCALE` / `ADD_BW_SCALE`, device-independent constants fitted once on both GPUs),
and the three efficiencies of the profile's `[efficiency]` table are fitted per GPU by least
squares on log(predicted / measured) (`scipy.optimize.least_squares`). The report gives the absolute relative
error |predicted / measured - 1| (median and p90) per op, per token-count range and overall, for
the profile's current factors and for the fitted ones.

References: Agrawal et al. 2024 (Vidur: a large-scale simulation framework for LLM inference,
MLSys; profiling data MIT-licensed, Copyright (c) Microsoft Corporation); Williams et al. 2009.
"""

from __future__ import annotations

import csv
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import least_squares

from sim.core.errors import ConfigError
from sim.core.model_config import ModelConfig
from sim.timing.cost_model import CostModel
from sim.timing.hardware import HardwareProfile, load_profile
from sim.timing.roofline import GEMM, LATENCY_UNITS, ROOFLINE_P

MEASURED_OPS: tuple[str, ...] = (
    "attn_pre_proj", "attn_post_proj", "mlp_up_proj", "mlp_down_proj", "mlp_act", "attn_rope",
    "input_layernorm", "post_attention_layernorm", "add",
)
GPU_PROFILES: dict[str, str] = {"a100": "a100-sxm4-80gb", "a40": "a40"}
TOKEN_RANGES: tuple[tuple[int, int], ...] = ((1, 16), (17, 128), (129, 1024), (1025, 4096))
FIT_KEYS: tuple[str, ...] = ("matmul_flops", "memory_bandwidth", "elementwise_bandwidth")


def default_data_dir() -> Path:
    """`<project root>/../shared/measured/vidur` (the data are read in place, never copied)."""
    return Path(__file__).resolve().parents[3] / "shared" / "measured" / "vidur"


@dataclass(frozen=True)
class Samples:
    """Measured per-layer op times (one entry per GPU x model x op x tokens x TP) and the cost
    model's FLOPs and bytes of the same op. Arrays are [n_sample]."""

    gpu: np.ndarray
    model: np.ndarray
    op: np.ndarray
    num_tokens: np.ndarray
    tp: np.ndarray
    measured_s: np.ndarray
    flops: np.ndarray
    bytes: np.ndarray
    is_gemm: np.ndarray
    bw_scale: np.ndarray
    latency_units: np.ndarray  # fixed time in units of kernel_launch_s

    def select(self, mask: np.ndarray) -> Samples:
        return Samples(**{f.name: getattr(self, f.name)[mask] for f in dataclasses.fields(self)})

    def __len__(self) -> int:
        return len(self.measured_s)


def model_from_row(name: str, row: dict[str, str]) -> ModelConfig:
    """One decoder layer of the shape a Vidur profile row describes."""
    n_embd, n_head = int(row["n_embd"]), int(row["n_head"])
    return ModelConfig(
        name=name, model_type="llama", n_layer=1, n_embd=n_embd, n_head=n_head,
        n_kv_head=int(row["n_kv_head"]), d_head=n_embd // n_head,
        n_inner=int(row["n_expanded_embd"]), n_vocab=int(row["vocab_size"]),
        max_position_embeddings=4096, gated_mlp=row["use_gated_mlp"] == "True",
        dtype="float16",
    )


def load_samples(data_dir: Path | None = None, gpus: tuple[str, ...] = ("a100", "a40")) -> Samples:
    """Read every `compute/<gpu>/<org>/<model>/mlp.csv` under `data_dir`."""
    root = (data_dir or default_data_dir()) / "compute"
    if not root.is_dir():
        raise ConfigError(f"no measured data at {root}; expected Vidur's compute/<gpu>/ folders")
    cols: dict[str, list[Any]] = {f.name: [] for f in dataclasses.fields(Samples)}
    for gpu in gpus:
        hw = load_profile(GPU_PROFILES[gpu])
        for path in sorted((root / gpu).glob("*/*/mlp.csv")):
            name = f"{path.parent.parent.name}/{path.parent.name}"
            with path.open(newline="") as f:
                rows = list(csv.DictReader(f))
            models: dict[int, CostModel] = {}
            for row in rows:
                tp, tokens = int(row["num_tensor_parallel_workers"]), int(row["num_tokens"])
                if tp not in models:
                    models[tp] = CostModel(model_from_row(name, row), hw, dtype="float16",
                                           tensor_parallel_size=tp, step_overhead_s=0.0)
                cm = models[tp]
                work = cm.layer_op_work(tokens)
                kinds = {op.name: op for op in cm.ops}
                for op in MEASURED_OPS:
                    value = row.get(f"time_stats.{op}.median", "")
                    if not value:
                        continue
                    flops, nbytes = work[op]
                    for key, item in (("gpu", gpu), ("model", name), ("op", op),
                                      ("num_tokens", tokens), ("tp", tp),
                                      ("measured_s", float(value) * 1e-3), ("flops", flops),
                                      ("bytes", nbytes), ("is_gemm", kinds[op].kind == GEMM),
                                      ("bw_scale", kinds[op].bw_scale),
                                      ("latency_units",
                                       kinds[op].launches * LATENCY_UNITS[kinds[op].kind])):
                        cols[key].append(item)
    if not cols["measured_s"]:
        raise ConfigError(f"no mlp.csv files found under {root}")
    return Samples(**{k: np.array(v) for k, v in cols.items()})


def predict_s(samples: Samples, hw: HardwareProfile, params: dict[str, float]) -> np.ndarray:
    """Predicted seconds [n_sample] with efficiencies `params` (keys `FIT_KEYS`); the same
    formula as `CostModel` for the measured ops."""
    peak, hbm = hw.peak_flops_for("float16"), hw.hbm_bytes_per_s
    compute = samples.flops / (peak * params["matmul_flops"])  # [n_sample]
    gemm_mem = samples.bytes / (hbm * params["memory_bandwidth"])  # [n_sample]
    elem_eff = np.minimum(1.0, params["elementwise_bandwidth"] * samples.bw_scale)  # [n_sample]
    elem_mem = samples.bytes / (hbm * elem_eff)  # [n_sample]
    soft = (compute**ROOFLINE_P + gemm_mem**ROOFLINE_P) ** (1.0 / ROOFLINE_P)  # [n_sample]
    roof = np.where(samples.is_gemm, soft, elem_mem)  # [n_sample]
    return roof + samples.latency_units * hw.kernel_launch_s


def profile_params(hw: HardwareProfile) -> dict[str, float]:
    """The factors a profile holds now (the starting point of the fit)."""
    return {key: hw.efficiency[key] for key in FIT_KEYS}


def fit_params(samples: Samples, hw: HardwareProfile) -> dict[str, float]:
    """Least-squares fit of `FIT_KEYS` on log(predicted / measured); efficiencies in (0, 1]."""
    start = profile_params(hw)

    def residuals(z: np.ndarray) -> np.ndarray:
        params = dict(zip(FIT_KEYS, z.tolist(), strict=True))
        return np.log(predict_s(samples, hw, params) / samples.measured_s)  # [n_sample]

    z0 = np.clip(np.array([start[k] for k in FIT_KEYS]), 0.05, 1.0)  # [n_key]
    fit = least_squares(residuals, z0, bounds=(0.05, 1.0))
    return dict(zip(FIT_KEYS, fit.x.tolist(), strict=True))


def error_table(samples: Samples, predicted_s: np.ndarray) -> dict[str, dict[str, float]]:
    """Median and p90 of |predicted / measured - 1| per op, per token range, per tensor
    parallel degree and overall."""
    err = np.abs(predicted_s / samples.measured_s - 1.0)  # [n_sample]
    groups: dict[str, np.ndarray] = {op: samples.op == op for op in MEASURED_OPS}
    for lo, hi in TOKEN_RANGES:
        groups[f"tokens {lo}-{hi}"] = (samples.num_tokens >= lo) & (samples.num_tokens <= hi)
    for tp in np.unique(samples.tp).tolist():
        groups[f"tp {tp}"] = samples.tp == tp
    groups["overall"] = np.ones(len(samples), dtype=bool)
    return {name: {"median": float(np.median(err[m])), "p90": float(np.quantile(err[m], 0.9)),
                   "n": int(m.sum())}
            for name, m in groups.items() if m.any()}


def load_all_reduce(data_dir: Path | None = None,
                    setup: str = "a100_dgx") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vidur's intra-node all-reduce measurements of `setup`: (GPUs [n_sample], bytes
    [n_sample], median seconds [n_sample]), rank 0, every GPU of the group on one node."""
    path = (data_dir or default_data_dir()) / "network" / setup / "all_reduce.csv"
    if not path.is_file():
        raise ConfigError(f"no measured all-reduce times at {path}")
    with path.open(newline="") as f:
        rows = [r for r in csv.DictReader(f)
                if r["rank"] == "0" and r["num_workers"] == r["devices_per_node"]]
    n = np.array([int(r["num_workers"]) for r in rows])  # [n_sample]
    size = np.array([float(r["size"]) for r in rows])  # [n_sample]
    measured = np.array([float(r["time_stats.all_reduce.median"]) * 1e-3 for r in rows])
    return n, size, measured


def eager_nccl_all_reduce_s(n: np.ndarray, size: np.ndarray, link_bw: float, latency_s: float,
                            efficiency: float, call_s: float) -> np.ndarray:
    """An eager NCCL all-reduce [n_sample]: a fixed cost per call plus the faster of ring
    (2(n-1) steps of size/n) and tree (2 ceil(log2 n) steps of size), as
    `parallel.collectives.Collectives.all_reduce` prices it with CUDA graphs and the custom
    all-reduce off (restated here: `sim.timing` sits below `parallel`)."""
    bw = link_bw * efficiency
    ring = 2 * (n - 1) * (latency_s + size / n / bw)  # [n_sample]
    tree = 2 * np.ceil(np.log2(n)) * (latency_s + size / bw)  # [n_sample]
    return call_s + np.minimum(ring, tree)


def fit_all_reduce(data_dir: Path | None = None, setup: str = "a100_dgx",
                   profile: str = "a100-sxm4-80gb") -> dict[str, Any]:
    """Fit the eager NCCL all-reduce (`eager_nccl_all_reduce_s`: per-step latency, link
    efficiency and a per-call cost) to Vidur's measured times of `setup`, by least squares on
    log(predicted / measured) (bandwidth from `profile`'s gpu_link).

    Vidur measures eager NCCL: `vidur/profiling/collectives` runs `torch.distributed.all_reduce`
    with CUDA graphs disabled (`DISABLE_GRAPH = True`), 11 back-to-back calls per sample, and
    times the NCCL kernels with the Kineto profiler; a kernel's time therefore includes waiting
    for the slowest GPU's launch, which the per-call cost absorbs."""
    n, size, measured = load_all_reduce(data_dir, setup)
    link_bw = load_profile(profile).gpu_link.bandwidth_bytes_per_s

    def model(z: np.ndarray) -> np.ndarray:
        return eager_nccl_all_reduce_s(n, size, link_bw, z[0] * 1e-6, z[1], z[2] * 1e-6)

    fit = least_squares(lambda z: np.log(model(z) / measured), [2.0, 0.5, 10.0],
                        bounds=([0.0, 0.05, 0.0], [100.0, 1.0, 500.0]))
    err = np.abs(model(fit.x) / measured - 1.0)  # [n_sample]
    return {"setup": setup, "profile": profile, "num_samples": len(n),
            "latency_s": float(fit.x[0]) * 1e-6, "gpu_link_bandwidth": float(fit.x[1]),
            "nccl_eager_call_s": float(fit.x[2]) * 1e-6,
            "median_err": float(np.median(err)), "p90_err": float(np.quantile(err, 0.9)),
            "median_err_by_workers": {int(k): float(np.median(err[n == k]))
                                      for k in sorted(set(n.tolist()))}}


def calibrate(data_dir: Path | None = None,
              gpus: tuple[str, ...] = ("a100", "a40")) -> dict[str, Any]:
    """Fit each GPU and report errors before (profile factors) and after (fitted factors)."""
    samples = load_samples(data_dir, gpus)
    report: dict[str, Any] = {}
    for gpu in gpus:
        sub = samples.select(samples.gpu == gpu)
        hw = load_profile(GPU_PROFILES[gpu])
        before = profile_params(hw)
        after = fit_params(sub, hw)
        report[gpu] = {
            "profile": hw.name, "num_samples": len(sub),
            "models": sorted(set(sub.model.tolist())),
            "profile_params": before, "fitted_params": after,
            "error_before": error_table(sub, predict_s(sub, hw, before)),
            "error_after": error_table(sub, predict_s(sub, hw, after)),
        }
    if "a100" in gpus:
        report["a100"]["all_reduce"] = fit_all_reduce(data_dir)
    return report


def format_report(report: dict[str, Any]) -> str:
    """A text table per GPU: fitted factors, then error per op / token range (before -> after)."""
    lines = []
    for gpu, rep in report.items():
        lines.append(f"{gpu} ({rep['profile']}): {rep['num_samples']} measured op times, "
                     f"{len(rep['models'])} models")
        for key in FIT_KEYS:
            before, after = rep["profile_params"][key], rep["fitted_params"][key]
            lines.append(f"  {key:<24} {before:6.3f} -> {after:6.3f}")
        lines.append(f"  {'group':<28} {'n':>6}  {'median err':>16}  {'p90 err':>16}")
        for name, after in rep["error_after"].items():
            before = rep["error_before"][name]
            lines.append(
                f"  {name:<28} {after['n']:>6}  {100 * before['median']:6.1f}% -> "
                f"{100 * after['median']:5.1f}%  {100 * before['p90']:6.1f}% -> "
                f"{100 * after['p90']:5.1f}%")
        if "all_reduce" in rep:
            ar = rep["all_reduce"]
            lines.append(
                f"  all-reduce ({ar['setup']}, eager NCCL ring/tree, {ar['num_samples']} sizes x "
                f"workers): {ar['nccl_eager_call_s'] * 1e6:.1f} us per call + "
                f"{ar['latency_s'] * 1e6:.2f} us per step, gpu_link_bandwidth "
                f"{ar['gpu_link_bandwidth']:.2f}; error median {100 * ar['median_err']:.1f}%, "
                f"p90 {100 * ar['p90_err']:.1f}%")
    return "\n".join(lines)
