"""Collectives: the all-reduce fit to Vidur's measurements, its error, and what each
implementation costs at decode sizes.

Vidur's all-reduce times (`../shared/measured/vidur/network/a100_dgx/all_reduce.csv`, 8x A100
DGX, NVSwitch) are EAGER NCCL: `vidur/profiling/collectives` runs `torch.distributed.all_reduce`
with CUDA graphs disabled (`DISABLE_GRAPH = True`), 11 calls back to back per sample, and times
the NCCL kernels with Kineto, so each kernel's time holds the wait for the slowest GPU's launch.
The fit (`sim.timing.calibration.fit_all_reduce`: a per-call cost plus the faster of ring and tree,
alpha-beta) gives the profile's `[collectives] nccl_eager_call_s`, the link's per-step latency and
`gpu_link_bandwidth`; this script prints its error per group size and size range (the old
ring-only fit, 6.1 us per step, alongside), checks that `parallel.collectives` prices the same
eager mode as the fit, and tabulates each mode's price of a decode-sized all-reduce on each
NVSwitch/mesh profile. Writes results/collectives.json.

    python benchmarks/collectives.py [--data ../shared/measured/vidur]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import print_table, write_json  # noqa: E402
from parallel.collectives import Collectives, CommMode  # noqa: E402
from sim.timing.calibration import (  # noqa: E402
    default_data_dir,
    fit_all_reduce,
    load_all_reduce,
)
from sim.timing.hardware import load_profile  # noqa: E402

SIZE_RANGES = ((0, 64 * 2**10), (64 * 2**10, 2**20), (2**20, 16 * 2**20), (16 * 2**20, 2**27))
MODES = {
    "vllm default (graphs + custom AR)": CommMode(),
    "graphs, NCCL only": CommMode(custom_all_reduce=False),
    "eager + custom AR": CommMode(cuda_graphs=False),
    "eager NCCL (enforce_eager + disable_custom_all_reduce)": CommMode(False, False),
}


def _errors(predicted: np.ndarray, measured: np.ndarray) -> np.ndarray:
    return np.abs(predicted / measured - 1.0)  # [n_sample]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=default_data_dir())
    args = parser.parse_args()
    fit = fit_all_reduce(args.data)
    n, size, measured = load_all_reduce(args.data)
    a100 = load_profile("a100-sxm4-80gb")
    eager = Collectives.gpu_link(a100, CommMode(cuda_graphs=False, custom_all_reduce=False))
    priced = np.array([eager.all_reduce_s(float(s), int(k)) for s, k in zip(size, n,
                                                                              strict=True)])
    link_bw = a100.gpu_link.bandwidth_bytes_per_s
    old = 2 * (n - 1) * (6.1e-6 + size / n / (link_bw * 0.49))  # the previous ring-only fit
    err, old_err = _errors(priced, measured), _errors(old, measured)
    rows = []
    groups = [(f"{k} GPUs", n == k) for k in sorted(set(n.tolist()))]
    groups += [(f"{lo // 1024}-{hi // 1024} KiB", (size >= lo) & (size < hi))
               for lo, hi in SIZE_RANGES]
    groups.append(("overall", np.ones(len(n), dtype=bool)))
    for name, mask in groups:
        rows.append({"group": name, "n": int(mask.sum()),
                     "median_err_%": round(100 * float(np.median(err[mask])), 1),
                     "p90_err_%": round(100 * float(np.quantile(err[mask], 0.9)), 1),
                     "old_ring_fit_median_err_%": round(100 * float(np.median(old_err[mask])), 1)})
    print(f"fit on {fit['num_samples']} samples ({fit['setup']}): "
          f"{fit['nccl_eager_call_s'] * 1e6:.1f} us per call + {fit['latency_s'] * 1e6:.2f} us "
          f"per step, gpu_link_bandwidth {fit['gpu_link_bandwidth']:.3f}")
    print_table("eager NCCL all-reduce: priced vs Vidur measured (8x A100 DGX)", rows)

    modes = []
    for hw in ("a100-sxm4-80gb", "h100-sxm", "h200-sxm", "mi300x", "l40s"):
        profile = load_profile(hw)
        for n_gpu in (2, 4, 8):
            for num_bytes in (8 * 1024, 256 * 1024, 2 * 2**20, 32 * 2**20):
                row: dict[str, object] = {"hardware": hw, "gpus": n_gpu, "bytes": num_bytes}
                for label, mode in MODES.items():
                    p = Collectives.gpu_link(profile, mode).all_reduce(num_bytes, n_gpu)
                    row[f"{label} us"] = round(p.total_s * 1e6, 1)
                    row[f"{label} algo"] = p.algorithm
                modes.append(row)
    short = [{k: v for k, v in r.items() if not k.endswith("algo")} for r in modes
             if r["gpus"] == 8]
    print_table("all-reduce at 8 GPUs by mode (us)", short)
    path = write_json("collectives", {"fit": fit, "error_table": rows, "modes": modes})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
