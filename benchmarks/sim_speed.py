"""Simulation speed: infersim's timing-only engine on the jobs of issue 14, and side by side with
splitwise-sim (Patel et al., ISCA'24; a Python discrete-event simulator) on the same job.

Runs (each a fresh process, timed wall to wall, so both simulators pay their start-up):

- `7b`: Llama-2-7B on one a100-sxm4-80gb, the whole Azure conv trace (19,366 requests);
- `dp8`: 8 replicas of Llama-2-70B fp16 at TP8 on a100-sxm4-80gb, the whole conv trace;
- `splitwise` (with `--splitwise DIR`): splitwise-sim on the dp8 job: 8 DGX-A100 servers, one
  Llama-2-70B TP8 instance each (`start_state=baseline`, its measured `db` performance model,
  the `token_jsq` scheduler), the conv trace converted to its CSV format;
- `1m` (with `--million`): 1,000,000 synthetic requests (Poisson 10 req/s, 512 in / 128 out),
  with peak RSS; and its cost against the number of requests (a log-log fit over 1/8, 1/4,
  1/2 and all of them: an exponent near 1 is linear).

splitwise-sim is not vendored: clone its public repository (github.com/Mutinifni/splitwise-sim)
and install its requirements into a scratch virtual environment (hydra-core, omegaconf, pandas,
numpy, scipy, networkx), then pass `--splitwise DIR --splitwise-python VENV/bin/python`. Its
default configuration asks for a Ray launcher; the script writes `configs/infersim_bench.yaml`
(the same configuration with Hydra's basic launcher) into that clone and runs with it.

Prints a table (wall seconds, ratios against splitwise-sim, the machine's load average) and
writes results/sim_speed.json. The machine is shared: compare ratios within one run.

    python benchmarks/sim_speed.py [--runs 7b dp8] [--splitwise DIR --splitwise-python PY]
                                   [--million]
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, print_table, trace_path, write_json

INFERSIM_JOBS = {
    "7b": ["--model", "meta-llama/Llama-2-7b-hf"],
    "dp8": ["--model", "meta-llama/Llama-2-70b-hf", "--tensor-parallel-size", "8",
            "--data-parallel-size", "8"],
}

SPLITWISE_ARGS = [
    "applications.0.scheduler=token_jsq", "applications.0.model_architecture=llama2-70b",
    "applications.0.model_size=llama2-70b-fp16", "cluster=half_half",
    "cluster.servers.0.count=8", "cluster.servers.1.count=0", "start_state=baseline",
    "performance_model=db", "seed=0",
]

# the child process for the one-million run: streams requests, reports wall and peak RSS
MILLION_CHILD = """
import json, resource, sys, time
from sim.engine.args import EngineArgs
from sim.engine.engine import Engine
from sim.workload.specs import make_workload
n = int(sys.argv[1])
engine = Engine(EngineArgs(mode="timing"))
start = time.perf_counter()
result = engine.run(make_workload(n, 10.0, 512, 128, seed=0), keep_requests=False)
print(json.dumps({"wall_s": time.perf_counter() - start, "completed": result.summary.num_completed,
                  "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def timed(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> tuple[float, str]:
    """Wall seconds of `cmd` (a fresh process) and its stdout; a failure stops the benchmark."""
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    wall_s = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed:\n{done.stderr[-2000:]}")
    return wall_s, done.stdout


def infersim(job: str, trace: Path, out: Path) -> dict[str, object]:
    cmd = [sys.executable, "-m", "sim.cli.main", "simulate", "--mode", "timing",
           "--hardware", "a100-sxm4-80gb", *INFERSIM_JOBS[job], "--dataset-path", str(trace),
           "--no-progress", "--result-json", str(out)]
    wall_s, _ = timed(cmd, ROOT, {**os.environ, "PYTHONPATH": str(ROOT)})
    result = json.loads(out.read_text(encoding="utf-8"))
    return {"run": f"infersim {job}", "wall_s": round(wall_s, 2),
            "completed": result.get("completed"), "steps": result.get("num_steps")}


def splitwise_trace(trace: Path, clone: Path) -> str:
    """The conv trace in splitwise-sim's CSV format (arrival seconds from the first request,
    plus 1 s: its instances start at t = 0 and take no request before), in its traces folder."""
    name = "infersim_azure_conv"
    rows = []
    with trace.open(encoding="utf-8") as f:
        for row in csv.DictReader(f):
            stamp = dt.datetime.fromisoformat(row["TIMESTAMP"][:26])
            rows.append((stamp, int(row["ContextTokens"]), int(row["GeneratedTokens"])))
    t0 = rows[0][0]
    with (clone / "traces" / f"{name}.csv").open("w", encoding="utf-8") as f:
        f.write("request_id,request_type,application_id,arrival_timestamp,batch_size,"
                "prompt_size,token_size\n")
        for i, (stamp, prompt, output) in enumerate(rows):
            f.write(f"{i},2,0,{(stamp - t0).total_seconds() + 1.0:.7f},1,{prompt},{output}\n")
    return name


def splitwise_config(clone: Path) -> str:
    """Its config.yaml with Hydra's basic launcher instead of the Ray one it defaults to."""
    text = (clone / "configs" / "config.yaml").read_text(encoding="utf-8")
    lines = [ln for ln in text.splitlines() if "override hydra/launcher" not in ln]
    kept, skip = [], False
    for ln in lines:
        if ln.strip() == "launcher:":
            skip = True
            continue
        if skip and (ln.startswith("    ") or not ln.strip()):
            continue
        skip = False
        kept.append(ln)
    (clone / "configs" / "infersim_bench.yaml").write_text("\n".join(kept) + "\n",
                                                           encoding="utf-8")
    return "infersim_bench"


def splitwise(clone: Path, python: str, trace: Path) -> dict[str, object]:
    name, config = splitwise_trace(trace, clone), splitwise_config(clone)
    cmd = [python, "run.py", "--config-name", config, *SPLITWISE_ARGS, f"trace.filename={name}"]
    wall_s, _ = timed(cmd, clone)
    return {"run": "splitwise-sim dp8", "wall_s": round(wall_s, 2), "completed": None,
            "steps": None}


def million(sizes: list[int]) -> list[dict[str, object]]:
    rows = []
    for n in sizes:
        _, out = timed([sys.executable, "-c", MILLION_CHILD, str(n)], ROOT,
                       {**os.environ, "PYTHONPATH": str(ROOT)})
        got = json.loads(out.strip().splitlines()[-1])
        rows.append({"run": f"infersim {n:,} synthetic", "wall_s": round(got["wall_s"], 2),
                     "completed": got["completed"], "steps": None,
                     "peak_rss_mib": round(got["rss_mib"], 1)})
    if len(rows) > 1:  # cost ~ n^b: b from the first and last size
        w0, w1 = float(rows[0]["wall_s"]), float(rows[-1]["wall_s"])  # type: ignore[arg-type]
        b = math.log(w1 / w0) / math.log(sizes[-1] / sizes[0])
        rows[-1]["fit_exponent"] = round(b, 3)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", choices=sorted(INFERSIM_JOBS),
                        default=sorted(INFERSIM_JOBS), help="infersim jobs to time")
    parser.add_argument("--splitwise", type=Path, default=None,
                        help="a clone of splitwise-sim: also run it on the dp8 job")
    parser.add_argument("--splitwise-python", default=sys.executable,
                        help="the Python of the virtual environment splitwise-sim is installed in")
    parser.add_argument("--million", action="store_true",
                        help="also time 1,000,000 synthetic requests (and 1/8, 1/4, 1/2 of them)")
    ns = parser.parse_args()
    trace = trace_path("conv")
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for job in ns.runs:
            rows.append(infersim(job, trace, Path(tmp) / f"{job}.json"))
    if ns.splitwise is not None:
        rows.append(splitwise(ns.splitwise.resolve(), ns.splitwise_python, trace))
        peer = float(rows[-1]["wall_s"])  # type: ignore[arg-type]
        for row in rows:
            row["splitwise_wall / wall"] = round(peer / float(row["wall_s"]), 2)  # type: ignore[arg-type]
    if ns.million:
        rows.extend(million([125_000, 250_000, 500_000, 1_000_000]))
    keys = list(dict.fromkeys(k for row in rows for k in row))  # one column set for the table
    rows = [{k: row.get(k, "") for k in keys} for row in rows]
    load = os.getloadavg()
    print_table(f"Simulation speed (load average {load[0]:.2f}, {os.cpu_count()} CPUs)", rows)
    print(f"\nwrote {write_json('sim_speed', {'load_average': load, 'rows': rows})}")


if __name__ == "__main__":
    main()
