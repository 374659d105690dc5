"""`infersim serve`: the simulated engine behind an OpenAI-compatible HTTP server.

Every engine flag of `simulate` applies (`add_engine_flags`); the server's own flags are the
address (`--host`, `--port`; loopback by default, as nothing authenticates a client), the name
it serves (`--served-model-name`, default `--model`), the pacing of simulated time
(`--time-scale`: wall seconds per simulated second) and `--trace-json FILE`, written when the
server stops. Needs the `infersim[serve]` extra; without it the command says how to install it.

References: `vllm serve` (`vllm/entrypoints/openai/cli_args.py`: --host, --port,
--served-model-name).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import sys
from pathlib import Path

from sim.core.errors import ConfigError


def add_trace_json_flag(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """`--trace-json FILE` (of `simulate` and `serve`): a Chrome/Perfetto trace of the run."""
    p.add_argument("--trace-json", default=None, metavar="FILE",
                   help="write a Chrome / Perfetto trace of the run (a track per lane with "
                        "every step's batch composition, a track per request with its queued, "
                        "prefill and decode spans); open it in ui.perfetto.dev")


def add_serve_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The `serve` subcommand and its flags."""
    from sim.cli.main import EXIT_CODES, add_engine_flags

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server over the simulated engine",
                       description="Serve /v1/models, /v1/completions, /v1/chat/completions "
                                   "(SSE streaming), /health and /metrics (vLLM's metric names) "
                                   "from a simulated engine: real tokens in functional mode, "
                                   "placeholders in timing mode, each released to its client "
                                   "when simulated time reaches it (see --time-scale).",
                       epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_flags(p)
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default loopback: the server authenticates nobody)")
    s.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port)")
    s.add_argument("--served-model-name", default=None,
                   help="the model name clients send and /v1/models lists (default: --model)")
    s.add_argument("--time-scale", type=float, default=1.0,
                   help="wall seconds per simulated second: 1 = real time (a client-side "
                        "benchmark measures the simulated latencies), 2 = half speed, 0 = as "
                        "fast as the engine computes")
    add_trace_json_flag(s)  # (written when the server stops)
    s.add_argument("--log-level", default="info",
                   choices=("critical", "error", "warning", "info", "debug"),
                   help="uvicorn's log level")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="TOML file of these same flags, as `simulate --config`")


def run_serve(ns: argparse.Namespace) -> int:
    """Build the engine from the flags and serve it until interrupted."""
    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"infersim serve needs {' and '.join(missing)}; install the extra: "
                          "pip install 'infersim[serve]'")
    if not 0 <= ns.port <= 65535:
        raise ConfigError(f"--port {ns.port} is not a TCP port; give one in 0..65535")
    trace_path = None if ns.trace_json is None else Path(ns.trace_json)
    if trace_path is not None:
        from sim.cli.simulate import check_result_path

        check_result_path(trace_path, "--trace-json")
    import uvicorn

    from sim.cli.main import engine_args_from
    from sim.engine.engine import Engine
    from sim.engine.records import SimulationResult, request_times
    from sim.metrics.trace_export import write_trace
    from sim.serve.app import build_app
    from sim.serve.driver import EngineDriver

    engine = Engine(engine_args_from(ns))

    def on_result(result: SimulationResult) -> None:
        if trace_path is not None:  # every request the server saw, in the order they ended
            write_trace(trace_path, result.steps, [request_times(r) for r in result.requests],
                        engine.plan.pp, result.description)
            print(f"wrote {trace_path} (open it in ui.perfetto.dev)", file=sys.stderr)

    driver = EngineDriver(engine, ns.time_scale, record=trace_path is not None,
                          on_result=on_result)
    name = ns.served_model_name or ns.model
    print(f"infersim serve: {engine.description}", file=sys.stderr)
    print(f"serving {name!r} on http://{ns.host}:{ns.port} (time scale {ns.time_scale:g})",
          file=sys.stderr)
    # (uvicorn re-raises Ctrl-C after its graceful shutdown, which wrote the trace)
    with contextlib.suppress(KeyboardInterrupt):
        uvicorn.run(build_app(driver, name), host=ns.host, port=ns.port, log_level=ns.log_level)
    return 0
