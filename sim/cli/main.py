"""The `infersim` command line: simulate, serve, demo, kv-memory, explain, models, profiles, plans.

Every engine argument is a flag in vLLM's spelling (`--max-num-seqs`, `--kv-cache`, ...);
`simulate --result-json` writes vLLM `benchmark_serving.py`'s key names.
"""

from __future__ import annotations

import os

# The NumPy model's matrices are small: one BLAS thread is several times faster than OpenBLAS's
# threads fighting over a few cores. Set before NumPy is first imported; an explicit setting wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from typing import Any

from sim import __version__
from sim.cli.explain import add_explain_parser, run_explain
from sim.cli.kv_memory import add_kv_memory_parser, run_kv_memory
from sim.cli.serve import add_serve_parser, add_trace_json_flag, run_serve
from sim.core.errors import ConfigError, InfersimError
from sim.engine.args import CHOICES, EngineArgs
from sim.model.zoo import DEFAULT_MODEL
from sim.timing.hardware import DEFAULT_HARDWARE

DESCRIPTION = """\
infersim: a NumPy reference simulator of LLM inference. One run computes real tokens with a NumPy
transformer (a seeded tiny proxy of the named model, or real local weights) and prices every
engine step for the named model on a GPU profile, on a simulated clock."""

EXIT_CODES = """\
exit codes:
  0  success
  1  an unexpected internal error (a bug: the traceback says where; please report it)
  2  a usage or configuration error: a bad flag, value, --config file or input file
     (one line on stderr naming the field, the value and the fix)"""


def choices(name: str) -> tuple[str, ...]:
    """The choices of engine argument `name`, read from its registry when the parser is built
    (`sim.engine.args.CHOICES`), so `--help` offers what `EngineArgs` accepts."""
    return tuple(CHOICES[name])


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine (vLLM names)")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help="Hugging Face id of a built-in shape, or a local folder with config.json "
                        "(+ safetensors for real weights); see `infersim models`")
    g.add_argument("--hardware", default=DEFAULT_HARDWARE,
                   help="GPU profile name or .toml path; see `infersim profiles`")
    g.add_argument("--dtype", default="auto", choices=choices("dtype"),
                   help="weights/compute dtype priced on the GPU; float64 also runs the "
                        "functional model in float64")
    g.add_argument("--mode", default="functional", choices=choices("mode"),
                   help="functional: real NumPy tokens; timing: token counts only (fast)")
    g.add_argument("--seed", type=int, default=0, help="seed of workload and sampling")
    g.add_argument("--tokenizer", default=None, metavar="byte|PATH",
                   help="functional mode: the tokenizer (default: the model's own; a checkpoint "
                        "without tokenizer.json is refused): 'byte' opts in to byte ids, or a "
                        "folder holding tokenizer.json")
    g.add_argument("--kv-cache", default="paged", choices=choices("kv_cache"),
                   help="paged (default, vLLM): blocks of --block-size tokens allocated as "
                        "requests grow; contiguous: one reservation per request (see "
                        "--contiguous-reservation); none: recompute the whole sequence every step")
    g.add_argument("--block-size", type=int, default=16, help="paged: tokens per KV block")
    g.add_argument("--enable-prefix-caching", action="store_true",
                   help="paged: share cached prompt-prefix blocks (hash-chained, LRU eviction)")
    g.add_argument("--contiguous-reservation", default="max_len",
                   choices=choices("contiguous_reservation"),
                   help="contiguous: reserve max_model_len (Orca Max), the next power of two of "
                        "the request's limit (Pow2), or exactly its final length (Oracle)")
    g.add_argument("--preemption-mode", default="recompute", choices=choices("preemption_mode"),
                   help="paged, out of blocks: free the newest request's KV and recompute it, "
                        "or swap it to host memory over the PCIe link")
    g.add_argument("--swap-space", type=float, default=4.0,
                   help="GiB of host memory for swapped-out KV (--preemption-mode swap)")
    g.add_argument("--num-gpu-blocks-override", type=int, default=None,
                   help="KV pool size in blocks instead of what the memory plan leaves")
    g.add_argument("--kv-eviction", default=None,
                   choices=choices("kv_eviction"),
                   help="paged: keep only some KV per request (cache.kv_eviction): the last "
                        "--kv-eviction-window tokens, plus --kv-eviction-sinks first tokens "
                        "(streaming_llm) or --kv-eviction-heavy heavy hitters (h2o)")
    g.add_argument("--kv-eviction-window", type=int, default=1024,
                   help="--kv-eviction: recent tokens kept")
    g.add_argument("--kv-eviction-sinks", type=int, default=4,
                   help="--kv-eviction streaming_llm: attention-sink tokens kept")
    g.add_argument("--kv-eviction-heavy", type=int, default=0,
                   help="--kv-eviction h2o: heavy-hitter tokens kept")
    g.add_argument("--kv-cache-dtype", default="auto", choices=choices("kv_cache_dtype"),
                   help="8-bit KV (fp8 = fp8_e4m3, fp8_e5m2, int8; per-token, per-head scales): "
                        "twice the KV capacity of 16-bit, priced and quantized for real")
    g.add_argument("--scheduler", default="continuous", choices=choices("scheduler"),
                   help="static: request-level batches; dynamic: request-level, Triton-style "
                        "preferred sizes and queue delay; continuous: iteration-level (Orca/vLLM)")
    g.add_argument("--max-wait-s", type=float, default=0.0,
                   help="static: launch a batch when full or once its oldest request waited this")
    g.add_argument("--preferred-batch-sizes", type=int, nargs="+", default=(),
                   help="dynamic: launch as soon as one of these batch sizes can be formed")
    g.add_argument("--max-queue-delay-s", type=float, default=0.05,
                   help="dynamic: launch whatever is waiting once the oldest waited this long")
    g.add_argument("--enable-chunked-prefill", action="store_true",
                   help="continuous: split long prompts into chunks that ride along with decodes "
                        "(Sarathi-Serve); the budget then defaults to 2048 tokens")
    g.add_argument("--long-prefill-token-threshold", type=int, default=0,
                   help="chunked prefill: most tokens of one prompt per step (0: no cap)")
    g.add_argument("--max-num-partial-prefills", type=int, default=1,
                   help="chunked prefill: prompts in progress at once")
    g.add_argument("--scheduling-policy", default="fcfs",
                   choices=choices("scheduling_policy"),
                   help="waiting-queue order: arrival, request priority (lower first, may "
                        "preempt), or shortest prompt first")
    g.add_argument("--kv-watermark", type=float, default=0.01,
                   help="continuous: admit only while this share of the KV pool stays free")
    a = p.add_argument_group("admission control (reject at arrival, with a reason)")
    a.add_argument("--admission-max-waiting", type=int, default=None,
                   help="queue limit: reject when this many requests already wait")
    a.add_argument("--admission-rate-per-s", type=float, default=None,
                   help="token bucket: sustained admissions per second")
    a.add_argument("--admission-burst", type=int, default=1, help="token bucket: burst size")
    a.add_argument("--admission-ttft-slo-s", type=float, default=None,
                   help="reject when the predicted TTFT already exceeds this SLO")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="context window in tokens (default: the model's max_position_embeddings)")
    g.add_argument("--max-num-seqs", type=int, default=256,
                   help="most requests running in one engine step")
    g.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="most tokens (prefill + decode) in one engine step (default: "
                        "max_model_len, or 2048 with chunked prefill)")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="share of GPU memory the engine may use (weights, activations, KV)")
    g.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="GPUs each layer's matrices are split over (Megatron-style)")
    g.add_argument("--pipeline-parallel-size", type=int, default=1,
                   help="pipeline stages of contiguous layers (micro-batches in flight)")
    g.add_argument("--data-parallel-size", type=int, default=1,
                   help="model replicas behind a router (see --data-parallel-router)")
    g.add_argument("--enable-expert-parallel", action="store_true",
                   help="MoE: place experts whole over the tensor-parallel GPUs")
    g.add_argument("--enforce-eager", action="store_true",
                   help="run without CUDA graphs (vLLM's flag): every collective pays an eager "
                        "launch and the wait for the slowest GPU's launch (about 40 us per call "
                        "on A100, fitted to Vidur's measurements)")
    g.add_argument("--disable-custom-all-reduce", action="store_true",
                   help="vLLM's flag: tensor-parallel all-reduces always use NCCL ring/tree "
                        "instead of the one-shot/two-shot custom kernel for messages under 8 MiB "
                        "on fully connected GPUs")
    g.add_argument("--data-parallel-router", default="round_robin",
                   choices=choices("data_parallel_router"),
                   help="how requests pick a replica when --data-parallel-size > 1")
    g.add_argument("--quantization", default=None,
                   choices=choices("quantization"),
                   help="weights (and activations for w8a8 / fp8): int8 / int4 weight-only "
                        "round-to-nearest, gptq (int4, error-compensated on calibration text), "
                        "w8a8 (SmoothQuant int8), fp8 (e4m3); default: unquantized")
    g.add_argument("--quantization-group-size", type=int, default=128,
                   help="weights per scale for int8 / int4 / gptq (-1: one per output channel)")
    g.add_argument("--speculative-config", default=None, metavar="JSON",
                   help='speculative decoding as in vLLM, e.g. \'{"method": "ngram", '
                        '"num_speculative_tokens": 4}\' or \'{"method": "draft_model", "model": '
                        '"JackFram/llama-68m", "draft_noise_scale": 0.3}\'; timing mode adds '
                        '"acceptance_rate" or "acceptance_trace"')


DATASET_NAMES = ("random", "sharegpt", "shared-prefix", "azure-conv", "azure-code")
PERCENTILE_METRICS = ("ttft", "tpot", "itl", "e2el")


def add_bench_flags(p: argparse.ArgumentParser) -> None:
    """The workload and report flags of `vllm bench serve` (vLLM's `vllm/benchmarks/serve.py`
    and `datasets.py`), with the older infersim spellings kept as aliases."""
    w = p.add_argument_group("workload (vLLM `bench serve` names)")
    # checked in `sim.cli.simulate.dataset_name`, not by argparse `choices`: the flags with
    # choices are exactly the engine registries (tests/test_registries.py)
    w.add_argument("--dataset-name", default=None, metavar="{" + ",".join(DATASET_NAMES) + "}",
                   help="random: synthetic lengths (--random-*); sharegpt: real ShareGPT "
                        "prompts and reply lengths, sampled as vLLM does (the "
                        "infersim[datasets] extra, or the JSON at --dataset-path); "
                        "shared-prefix: random prompts behind --num-system-prompts shared "
                        "system prompts; azure-conv / azure-code: an Azure LLM trace CSV at "
                        "--dataset-path (default: "
                        "azure-conv with --dataset-path, shared-prefix with "
                        "--shared-prefix-len, else random)")
    w.add_argument("--dataset-path", default=None,
                   help="Azure LLM trace CSV (TIMESTAMP,ContextTokens,GeneratedTokens), whose "
                        "timestamps give arrivals unless --request-rate is set; or, with "
                        "--dataset-name sharegpt, a ShareGPT JSON file")
    w.add_argument("--sharegpt-output-len", type=int, default=None,
                   help="sharegpt: every output this many tokens instead of the reply's length")
    w.add_argument("--num-prompts", type=int, default=None,
                   help="number of requests (default: 100, or the whole trace)")
    w.add_argument("--request-rate", type=float, default=None,
                   help="requests/s, Poisson (inf = all at once: the default without a trace)")
    w.add_argument("--burstiness", type=float, default=1.0,
                   help="shape of the gamma inter-arrival gaps (mean 1/--request-rate, cv "
                        "1/sqrt(burstiness)), for synthetic, shared-prefix and re-timed trace "
                        "workloads alike: 1 = Poisson, < 1 burstier, > 1 smoother; finite and "
                        "> 0, and needs a finite --request-rate")
    w.add_argument("--max-concurrency", type=int, default=None,
                   help="at most this many requests in flight (client side, as vllm bench "
                        "serve): a request due while that many are unfinished is sent when one "
                        "ends, and its latencies count from then; default: no cap")
    w.add_argument("--random-input-len", "--input-len", dest="input_len", type=int, default=512,
                   help="random / shared-prefix: prompt tokens (own tokens after the system "
                        "prompt)")
    w.add_argument("--random-output-len", "--output-len", dest="output_len", type=int,
                   default=128, help="random / shared-prefix: output tokens")
    w.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="random / shared-prefix: lengths uniform in [floor(len x (1 - r)), "
                        "ceil(len x (1 + r))] (outputs at least 1), vLLM's rule; 0 <= r < 1")
    w.add_argument("--shared-prefix-len", type=int, default=0,
                   help="shared-prefix: every prompt starts with one of --num-system-prompts "
                        "fixed system prompts of this many tokens, then --random-input-len own "
                        "tokens (what --enable-prefix-caching is for)")
    w.add_argument("--num-system-prompts", type=int, default=1,
                   help="shared-prefix: distinct system prompts")
    r = p.add_argument_group("report (vLLM `bench serve` names)")
    r.add_argument("--goodput", nargs="+", default=None, metavar="KEY:VALUE",
                   help="service-level objectives in ms, e.g. `--goodput ttft:200 tpot:50`; "
                        "keys ttft, tpot, e2el; request_goodput counts the completed requests "
                        "meeting all of them, per second")
    r.add_argument("--slo-ttft-ms", type=float, default=None,
                   help="TTFT SLO for goodput (same as --goodput ttft:MS)")
    r.add_argument("--slo-tpot-ms", type=float, default=None,
                   help="TPOT SLO for goodput (same as --goodput tpot:MS)")
    r.add_argument("--percentile-metrics", default="ttft,tpot,itl",
                   help="comma-separated metrics whose percentiles the result JSON gets "
                        f"(of {', '.join(PERCENTILE_METRICS)})")
    r.add_argument("--metric-percentiles", default="99",
                   help="comma-separated percentiles (0 < p <= 100) written as p<N>_<metric>_ms, "
                        "e.g. 25,50,75,99")


def engine_args_from(ns: argparse.Namespace) -> EngineArgs:
    """EngineArgs from every parsed flag whose name is an engine argument (same spelling)."""
    names = {f.name for f in dataclasses.fields(EngineArgs)}
    return EngineArgs(**{key: value for key, value in vars(ns).items() if key in names})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="infersim", description=DESCRIPTION, epilog=EXIT_CODES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sim = sub.add_parser("simulate", help="serve a workload and report latency/throughput",
                         description="Serve a synthetic workload or an Azure trace and report "
                                     "TTFT, TPOT, ITL, E2E and throughput in simulated time; "
                                     "flags and result JSON as `vllm bench serve`.",
                         epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_flags(sim)
    add_bench_flags(sim)
    sim.add_argument("--result-json", default=None,
                     help="write the metrics to this JSON file (- for stdout)")
    sim.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_trace_json_flag(sim)  # --trace-json (sim.cli.serve, shared with `serve`)
    sim.add_argument("--config", default=None, metavar="FILE",
                     help="TOML file of these same flags (`max-num-seqs = 64`, `request-rate = "
                          "inf`, `enable-prefix-caching = true`; dashes or underscores), as "
                          "vLLM's --config; flags on the command line override the file, and "
                          "an unknown key is refused by name")

    demo = sub.add_parser("demo", help="no KV cache vs the KV-cached engine (the quick start)",
                          description="Runs one workload twice, without and with a KV cache, "
                                      "and compares latency, throughput and the tokens produced.")
    demo.add_argument("--model", default=DEFAULT_MODEL, help="model name or local folder")
    demo.add_argument("--hardware", default=DEFAULT_HARDWARE, help="GPU profile name or .toml")
    demo.add_argument("--num-prompts", type=int, default=16, help="number of requests")
    demo.add_argument("--input-len", type=int, default=128, help="prompt tokens per request")
    demo.add_argument("--output-len", type=int, default=128, help="output tokens per request")

    add_kv_memory_parser(sub)
    add_explain_parser(sub)
    sub.add_parser("models", help="list the built-in model shapes")
    sub.add_parser("profiles", help="list the built-in hardware profiles")

    plans = sub.add_parser("plans", help="feasible (tp, pp, ep, dp) plans and their predicted "
                                         "throughput and latency on N GPUs",
                           description="Every parallel plan using --num-gpus GPUs whose shapes "
                                       "divide and whose weights fit, each simulated "
                                       "(timing-only) on a default workload.")
    plans.add_argument("--model", default=DEFAULT_MODEL, help="model name or local folder")
    plans.add_argument("--hardware", default=DEFAULT_HARDWARE, help="GPU profile name or .toml")
    plans.add_argument("--num-gpus", type=int, required=True, help="GPUs every plan uses")
    plans.add_argument("--num-prompts", type=int, default=200, help="requests per simulation")
    plans.add_argument("--input-len", type=int, default=512, help="prompt tokens per request")
    plans.add_argument("--output-len", type=int, default=128, help="output tokens per request")
    plans.add_argument("--request-rate", type=float, default=None,
                       help="requests/s, Poisson (default: all at once)")
    plans.add_argument("--json", action="store_true", help="print JSON instead of text")
    add_serve_parser(sub)
    return parser


def config_argv(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """`argv` with the flags of its subcommand's `--config FILE` (TOML) put in front of the
    command line's own, so the command line wins (argparse keeps an option's last value) and
    every value passes the same type and choice checks as a typed flag.

    Keys are flag names without the dashes (`max-num-seqs` or `max_num_seqs`); `true` turns a
    switch on, `false` leaves it off; a list gives a multi-value flag its values. A key that no
    flag of the subcommand has is refused by name.
    """
    if "--config" not in argv and not any(a.startswith("--config=") for a in argv):
        return argv
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if known.config is None:
        return argv
    import tomllib

    try:
        with open(known.config, "rb") as f:
            table = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"--config {known.config!r}: cannot read it ({exc.strerror}); "
                          "name an existing TOML file") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--config {known.config!r} is not valid TOML: {exc}") from exc
    command = next((a for a in argv if a in COMMANDS), None)
    sub = _subparser(parser, command)
    actions = {opt: act for act in sub._actions for opt in act.option_strings}
    tokens: list[str] = []
    for key, value in table.items():
        flag = "--" + str(key).replace("_", "-")
        action = actions.get(flag)
        if action is None or flag in ("--config", "--help"):
            known_keys = sorted(o[2:] for o in actions if o.startswith("--")
                                and o not in ("--config", "--help"))
            raise ConfigError(f"--config {known.config!r}: unknown key {key!r}; the keys are "
                              f"the flags of `infersim {command}`: {', '.join(known_keys)}")
        if isinstance(value, dict):
            raise ConfigError(f"--config {known.config!r}: key {key!r} is a table; give a "
                              "plain value (a JSON flag such as speculative-config takes a "
                              "string)")
        if action.nargs == 0:  # a switch
            if not isinstance(value, bool):
                raise ConfigError(f"--config {known.config!r}: {key!r} is a switch; give true "
                                  f"or false, got {value!r}")
            if value:
                tokens.append(flag)
            continue
        values = value if isinstance(value, list) else [value]
        tokens.append(flag)
        tokens.extend(str(v).lower() if isinstance(v, bool) else str(v) for v in values)
    where = argv.index(command) + 1 if command is not None else 0
    return [*argv[:where], *tokens, *argv[where:]]


def _subparser(parser: argparse.ArgumentParser, command: str | None) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            found: argparse.ArgumentParser = action.choices[command]
            return found
    raise ConfigError("--config goes after a subcommand, e.g. `infersim simulate --config "
                      "run.toml`")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        args = config_argv(parser, args)
    except InfersimError as exc:
        print(f"infersim: error: {exc}", file=sys.stderr)
        return 2
    ns = parser.parse_args(args)
    try:
        return COMMANDS[ns.command](ns)
    except InfersimError as exc:  # bad input: one line naming it, exit 2 (argparse's code)
        message = " ".join(str(exc).split())  # one line, even for a message with newlines
        print(f"infersim: error: {message}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`infersim models | head`): not an error
        # of the input; point stdout at /dev/null so the interpreter's final flush is quiet
        # (the Python docs' recipe for SIGPIPE)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def cmd_simulate(ns: argparse.Namespace) -> int:
    from sim.cli.simulate import run_simulate

    return run_simulate(ns)


def cmd_demo(ns: argparse.Namespace) -> int:
    from sim.cli.demo import run_demo

    print(run_demo(ns.model, ns.hardware, ns.num_prompts, ns.input_len, ns.output_len))
    return 0


def format_rows(rows: list[dict[str, Any]]) -> str:
    """A plain aligned text table of dict rows (same keys)."""
    if not rows:
        return ""
    keys = list(rows[0])
    cells = [[str(r[k]) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    line = "  ".join(k.ljust(w) for k, w in zip(keys, widths, strict=True))
    body = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join([line, "  ".join("-" * w for w in widths), *body])


def cmd_models(ns: argparse.Namespace) -> int:
    from sim.model.zoo import ALIASES, BUILTIN_HF_CONFIGS, resolve_model

    rows = []
    for name in BUILTIN_HF_CONFIGS:
        c = resolve_model(name)
        rows.append({
            "model": name,
            "params": f"{c.num_params() / 1e9:.2f}B",
            "active": f"{c.num_params(active_only=True) / 1e9:.2f}B",
            "layers": c.n_layer, "heads/kv": f"{c.n_head}/{c.n_kv_head}", "d_head": c.d_head,
            "kv/token (fp16)": f"{c.kv_bytes_per_token('float16') / 1024:.0f} KiB",
            "max_len": c.max_position_embeddings,
            "notes": _model_notes(c),
        })
    print(format_rows(rows))
    print("\naliases: " + ", ".join(f"{a} -> {b}" for a, b in ALIASES.items()))
    print("A local folder with config.json (+ *.safetensors) works anywhere a name does.")
    return 0


def _model_notes(c: Any) -> str:
    notes = []
    if c.is_moe:
        notes.append(f"MoE {c.n_expert}x top-{c.n_expert_per_tok}")
    if c.shared_expert_n_inner:
        notes.append("shared expert")
    if c.sliding_window:
        notes.append(f"window {c.sliding_window}")
    if c.qkv_bias:
        notes.append("qkv bias")
    if not c.is_llama_like:
        notes.append("shape only (Llama-style proxy)")
    return ", ".join(notes)


def cmd_profiles(ns: argparse.Namespace) -> int:
    from sim.timing.hardware import list_profiles, load_profile, summary_row

    print(format_rows([summary_row(load_profile(name)) for name in list_profiles()]))
    return 0


def cmd_plans(ns: argparse.Namespace) -> int:
    import math
    from dataclasses import asdict

    from sim.engine.planner import evaluate_plans, format_plans

    rate = math.inf if ns.request_rate is None else ns.request_rate
    results = evaluate_plans(ns.model, ns.hardware, ns.num_gpus, num_prompts=ns.num_prompts,
                             input_len=ns.input_len, output_len=ns.output_len,
                             request_rate=rate)
    if ns.json:
        print(json.dumps([asdict(r) for r in results], indent=2, default=str))
        return 0
    print(f"plans for {ns.model} on {ns.num_gpus} x {ns.hardware}; workload: {ns.num_prompts} "
          f"requests, {ns.input_len} in / {ns.output_len} out tokens, "
          f"{'all at once' if ns.request_rate is None else f'{rate:g} req/s'} (timing-only)")
    print(format_plans(results))
    print("comm: share of communication in a 64-sequence decode step; bubble: idle share of "
          "pipeline stages")
    return 0


COMMANDS = {
    "simulate": cmd_simulate,
    "demo": cmd_demo,
    "kv-memory": run_kv_memory,
    "explain": run_explain,
    "models": cmd_models,
    "profiles": cmd_profiles,
    "plans": cmd_plans,
    "serve": run_serve,
}


if __name__ == "__main__":
    raise SystemExit(main())
