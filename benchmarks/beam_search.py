"""Beam search and parallel sampling: KV blocks shared by copy-on-write vs one slab per sequence.

Llama-2-7B on A100-SXM4-80GB: tokens come from the functional tiny proxy (so the beams and the
forks are real), times are simulated for the named model on the named GPU. Prompts of 20 tokens
(short prompts and longer outputs: the vLLM paper's Alpaca regime), 256 and 1024 tokens, 64 new
tokens each (`ignore_eos`, fixed lengths as in vLLM's benchmarks), beam widths / samples 1, 2, 4,
8, for

- beam search (`SamplingParams(n=w, use_beam_search=True, temperature=0)`) with a paged KV cache
  (block 16: forked beams share blocks, the partly filled last block is copied on write) and with
  a contiguous one (`contiguous_reservation="oracle"`, the fairest contiguous baseline: a forked
  beam recomputes its whole sequence into a slab of exactly its final length);
- parallel sampling (`n=w`, temperature 0.8): the samples share the prompt's blocks only.

1. One search alone: peak distinct KV tokens held (`kv_used_tokens` of the step series) paged vs
   contiguous and the saving in %, and the vLLM paper's Fig. 15 measure over the run: KV blocks
   saved by sharing / blocks the same sequences would hold without sharing (sampled every step
   from the block tables); tokens computed; copy-on-write block copies; simulated latency.
2. A batch of 16 prompts at once: the same, with simulated mean / last E2E latency, throughput
   (prompts per second) and the run's wall time.

Every beam-search setting's beams (all `w` of them) are checked against the cacheless
`sim.model.reference.beam_search` for the first prompt, and paged == contiguous for every prompt, so
the numbers come from correct runs. Threads: one (OPENBLAS/OMP_NUM_THREADS=1).

Usage: .venv/bin/python benchmarks/beam_search.py [--quick] [--batch-prompt-lens 20 256]
Writes results/beam_search.json.

References: Kwon et al., SOSP'23 (vLLM / PagedAttention), section 4.4 (copy-on-write sharing for
parallel sampling and beam search), section 6.3 and Fig. 15 (memory saving from sharing on OPT-13B:
6.1-9.8 % parallel sampling and 37.6-55.2 % beam search on Alpaca, 16.2-30.5 % and 44.3-66.3 % on
ShareGPT, widths 2-6); section 6.1 (ShareGPT has 8.4x longer prompts, 5.8x longer outputs).
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):  # small matrices: one BLAS thread
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
from common import print_table, write_json  # noqa: E402

from sim import SamplingParams  # noqa: E402
from sim.core.step import StepPlan  # noqa: E402
from sim.engine.args import EngineArgs  # noqa: E402
from sim.engine.engine import Engine  # noqa: E402
from sim.engine.records import StepCharge  # noqa: E402
from sim.model.reference import beam_search as reference_beam_search  # noqa: E402

MODEL, HARDWARE = "meta-llama/Llama-2-7b-hf", "a100-sxm4-80gb"
BLOCK_SIZE = 16
KV: dict[str, dict[str, Any]] = {"paged": {"kv_cache": "paged", "block_size": BLOCK_SIZE},
      "contiguous": {"kv_cache": "contiguous", "contiguous_reservation": "oracle"}}
PAPER = {"source": "Kwon et al., SOSP'23, Fig. 15 (OPT-13B, widths 2, 4, 6)",
         "alpaca_saving_%": {"parallel": [6.1, 9.8], "beam": [37.6, 55.2]},
         "sharegpt_saving_%": {"parallel": [16.2, 30.5], "beam": [44.3, 66.3]}}


class SharingProbe(Engine):
    """An engine that samples, at every dispatched step, the KV blocks its sequences hold
    (distinct) and the blocks their tables name (what they would hold without sharing), read
    from the step plan's block tables (`ScheduledSeq.kv`)."""

    block_samples: list[tuple[int, int]]  # (distinct, logical) per step

    def charge(self, plan: StepPlan, busy_s: float, draft_s: float = 0.0) -> StepCharge:
        # (once per dispatched step)
        tables = [s.kv.block_table for s in plan.seqs if s.kv is not None]
        if tables:
            distinct = {b for table in tables for b in table if b >= 0}
            logical = sum(sum(1 for b in table if b >= 0) for table in tables)
            self.block_samples.append((len(distinct), logical))
        return super().charge(plan, busy_s, draft_s)


def params(kind: str, width: int, max_tokens: int) -> SamplingParams:
    if kind == "beam":
        return SamplingParams(n=width, use_beam_search=True, temperature=0.0,
                              max_tokens=max_tokens, ignore_eos=True)
    return SamplingParams(n=width, temperature=0.8, seed=0, max_tokens=max_tokens,
                          ignore_eos=True)


def run(kind: str, kv: str, prompts: list[list[int]], width: int, max_tokens: int
        ) -> dict[str, Any]:
    """One engine run of `prompts` (all arriving at 0) and what it measured."""
    prompt_len = len(prompts[0])
    engine = SharingProbe(EngineArgs(model=MODEL, hardware=HARDWARE, mode="functional",
                                     max_model_len=prompt_len + max_tokens, **KV[kv]))
    engine.block_samples = []
    sp = params(kind, width, max_tokens)
    reqs = [engine.make_request(str(i), i, prompt_len, sp, 0.0, p) for i, p in enumerate(prompts)]
    result = engine.run(reqs, record_steps=True)
    assert result.steps is not None
    cols = result.steps.columns()
    done = [r for r in result.requests if r.reject_reason is None]
    assert len(done) == len(result.requests), [r.reject_reason for r in result.requests]
    e2e_s = np.array([max(r.finished_s for r in result.requests if r.index == i)
                      for i in range(len(prompts))])  # [n_prompts]
    samples = np.array(engine.block_samples, dtype=np.float64).reshape(-1, 2)  # [n_steps, 2]
    assert kv != "paged" or len(samples) == result.stats.num_steps, "a step was not sampled"
    saving = (1 - samples[:, 0] / np.maximum(samples[:, 1], 1)) if kv == "paged" else None
    outputs: dict[Any, Any]
    if kind == "beam":  # each prompt's w beams, best first
        outputs = {r.index: [b.tokens for b in r.beam.result] for r in reqs}
    else:  # each sample's tokens
        outputs = {r.request_id: r.output_token_ids for r in result.requests}
    return {
        "peak_kv_tokens": int(cols["kv_used_tokens"].max()),
        "peak_kv_reserved_tokens": int(cols["kv_reserved_tokens"].max()),
        "mean_block_saving_%": None if saving is None else 100 * float(saving.mean()),
        "tokens_computed": result.stats.num_tokens_computed,
        "block_copies": result.stats.num_copied_blocks,
        "mean_e2e_s": float(e2e_s.mean()), "last_e2e_s": float(e2e_s.max()),
        "prompts_per_s": len(prompts) / float(e2e_s.max()),
        "wall_s": result.wall_s, "outputs": outputs, "engine": engine,
    }


def check_beams(paged: dict[str, Any], contiguous: dict[str, Any], prompt: list[int], width: int,
                max_tokens: int) -> float:
    """Assert paged == contiguous for every prompt and == the cacheless reference for the first
    (all `width` beams); returns the reference's wall time."""
    assert paged["outputs"] == contiguous["outputs"], "paged and contiguous beams differ"
    engine = paged["engine"]
    t0 = time.perf_counter()
    ref = reference_beam_search(engine.functional_model, prompt, width, max_tokens,
                                max_model_len=engine.max_model_len)
    assert paged["outputs"][0] == [b.tokens for b in ref], "beams differ from the reference"
    return time.perf_counter() - t0


def per_search(prompt_lens: list[int], widths: list[int], max_tokens: int,
               prompts: dict[int, list[list[int]]]
               ) -> tuple[list[dict[str, Any]], float, dict[tuple[int, int], Any]]:
    """Table 1: one search (or one n-sample request) alone. Also returns the reference
    check's wall time and the checked beams of each (prompt length, width)."""
    rows, ref_wall_s, first = [], 0.0, {}
    for kind in ("beam", "parallel"):
        for prompt_len in prompt_lens:
            for width in widths:
                one = prompts[prompt_len][:1]
                p, c = (run(kind, kv, one, width, max_tokens) for kv in ("paged", "contiguous"))
                if kind == "beam":
                    ref_wall_s += check_beams(p, c, one[0], width, max_tokens)
                    first[prompt_len, width] = p["outputs"][0]
                rows.append({
                    "kind": kind, "prompt": prompt_len, "width": width,
                    "kv_paged": p["peak_kv_tokens"], "kv_contig": c["peak_kv_tokens"],
                    "saving_peak_%": round(100 * (1 - p["peak_kv_tokens"] / c["peak_kv_tokens"]), 1),
                    "saving_mean_%": round(p["mean_block_saving_%"], 1),
                    "computed_paged": p["tokens_computed"], "computed_contig": c["tokens_computed"],
                    "copies": p["block_copies"],
                    "latency_ms_paged": round(1e3 * p["last_e2e_s"], 1),
                    "latency_ms_contig": round(1e3 * c["last_e2e_s"], 1),
                    "wall_s": round(p["wall_s"] + c["wall_s"], 2),
                })
    return rows, ref_wall_s, first


def batch(prompt_lens: list[int], widths: list[int], max_tokens: int,
          prompts: dict[int, list[list[int]]], first: dict[tuple[int, int], Any]
          ) -> list[dict[str, Any]]:
    """Table 2: a batch of prompts arriving at once."""
    rows = []
    for prompt_len in prompt_lens:
        for width in widths:
            res = {}
            for kind, kv in (("beam", "paged"), ("beam", "contiguous"), ("parallel", "paged")):
                r = res[kind, kv] = run(kind, kv, prompts[prompt_len], width, max_tokens)
                rows.append({
                    "prompt": prompt_len, "width": width, "setting": f"{kind} {kv}",
                    "peak_kv": r["peak_kv_tokens"],
                    "saving_mean_%": (None if r["mean_block_saving_%"] is None
                                      else round(r["mean_block_saving_%"], 1)),
                    "mean_e2e_s": round(r["mean_e2e_s"], 3), "last_e2e_s": round(r["last_e2e_s"], 3),
                    "prompts/s": round(r["prompts_per_s"], 2),
                    "computed": r["tokens_computed"], "copies": r["block_copies"],
                    "wall_s": round(r["wall_s"], 2),
                })
            paged, contig = res["beam", "paged"], res["beam", "contiguous"]
            assert paged["outputs"] == contig["outputs"], "paged and contiguous beams differ"
            # the first prompt was checked against the reference alone (table 1)
            assert paged["outputs"][0] == first[prompt_len, width], "batch changed the beams"
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="widths 1 and 4, prompts of 20 and 256")
    ap.add_argument("--prompt-lens", type=int, nargs="+", default=[20, 256, 1024])
    ap.add_argument("--batch-prompt-lens", type=int, nargs="*", default=[20, 256],
                    help="prompt lengths of the 16-prompt batch table (1024 with contiguous "
                         "beams recomputes millions of tokens: minutes)")
    ap.add_argument("--widths", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--num-prompts", type=int, default=16)
    args = ap.parse_args()
    if args.quick:
        args.widths, args.prompt_lens = [1, 4], [20, 256]
        args.batch_prompt_lens = [p for p in args.batch_prompt_lens if p <= 256][:1]
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    lens = sorted(set(args.prompt_lens) | set(args.batch_prompt_lens))
    prompts = {n: [rng.integers(1, 250, n).tolist() for _ in range(args.num_prompts)]
               for n in lens}
    table1, ref_wall_s, first = per_search(lens, args.widths, args.max_tokens, prompts)
    print_table(f"One search alone: {MODEL} on {HARDWARE}, {args.max_tokens} new tokens, "
                f"paged (block {BLOCK_SIZE}) vs contiguous (oracle); beams checked against the "
                f"cacheless reference ({ref_wall_s:.1f} s)", table1)
    table2 = batch(args.batch_prompt_lens, args.widths, args.max_tokens, prompts, first)
    print_table(f"A batch of {args.num_prompts} prompts at once (simulated times; wall_s: this "
                "machine, one thread)", table2)
    total_s = time.perf_counter() - t0
    path = write_json("beam_search", {
        "model": MODEL, "hardware": HARDWARE, "block_size": BLOCK_SIZE,
        "contiguous_reservation": "oracle", "max_tokens": args.max_tokens,
        "num_prompts": args.num_prompts, "per_search": table1, "batch": table2,
        "reference_check_wall_s": ref_wall_s, "paper": PAPER, "wall_s": total_s})
    print(f"\nwrote {path} ({total_s:.0f} s)")


if __name__ == "__main__":
    main()
