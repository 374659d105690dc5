"""Fuzz: every input either runs correctly or is refused in one line (issue 16).

Hypothesis draws argument vectors for every `infersim` subcommand (`simulate`, `demo`, `plans`,
`kv-memory`, `models`, `profiles`), `EngineArgs` keyword arguments, and mutated trace CSVs
(truncation, byte flips, deleted fields, a BOM, huge numbers, swapped and repeated rows). Each
case runs in a subprocess under a wall-clock timeout and an address-space cap
(`resource.setrlimit(RLIMIT_AS)` in `preexec_fn`), and must either

- exit 0 with a right result (a simulate JSON whose completed + rejected + aborted requests are
  the requests asked for; demo's identical tokens; a plans table; a kv-memory report), or
- exit 2 with its error on one line (`infersim: error: ...`, or argparse's usage and
  `infersim CMD: error: ...`), and no "Traceback" in stderr;

never hang, never allocate past the cap. Values mix plausible settings with hostile ones
(negative, zero, 1e12, NaN, inf, strings, bools, floats where counts go); plausible sizes stay
small, so a case that runs does so in about a second.

Profiles: the CI profile is seeded (`derandomize`) with a few examples per strategy (about 50
subprocesses, under a minute); a long local run sets the examples per strategy, e.g.
`INFERSIM_FUZZ_EXAMPLES=2000 pytest -s tests/test_fuzz.py` (`-s` prints the outcome counts;
`INFERSIM_FUZZ_SEED` varies the seed instead of the fixed derandomised sequence).

Method after Zalewski's AFL (mutations of valid inputs) and property-based testing with
Hypothesis (MacIver et al. 2019); the harness is the subprocess-per-case one of issue 16's
report (631 cases, each in a subprocess with a timeout).
"""

from __future__ import annotations

import collections
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
CONV_TRACE = ROOT.parent / "shared" / "traces" / "azure_llm_2023_conv.csv"
LONG = int(os.environ.get("INFERSIM_FUZZ_EXAMPLES", "0"))
FUZZ_SEED = os.environ.get("INFERSIM_FUZZ_SEED")
#: per-case limits: a plausible case runs in ~1 s; the cap is ~3x what a run uses
TIMEOUT_S = 90.0
MEM_CAP_BYTES = 3 * 2**30
#: what each case ended as, per strategy (printed at the end with `-s`)
COUNTS: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)

TINY = "JackFram/llama-68m"
MODELS = ("meta-llama/Llama-2-7b-hf", TINY, "mistralai/Mixtral-8x7B-v0.1", "Qwen/Qwen2-0.5B",
          "facebook/opt-13b", "no/such-model")
HARDWARE = ("a100-sxm4-80gb", "h100-sxm", "mi300x", "l4", "rtx-4090", "no-such-gpu")
#: values that must be refused (or, for " 7", read as 7): typed as a careless user would
HOSTILE = ("-1", "0", "1e12", "1000000000000", "100000000000000000000000", "nan", "inf",
           "-inf", "abc", "", "2.5", "0x10", " 7", "9" * 30, "-0")
ERROR_LINE = re.compile(r"^infersim( [\w-]+)?: error: \S")


def settings_for(ci_examples: int) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Seeded, bounded settings: `ci_examples` in CI, `INFERSIM_FUZZ_EXAMPLES` when set."""
    configured = settings(max_examples=LONG or ci_examples, deadline=None, database=None,
                          derandomize=FUZZ_SEED is None,
                          suppress_health_check=[HealthCheck.too_slow,
                                                 HealthCheck.data_too_large,
                                                 HealthCheck.function_scoped_fixture])

    def wrap(test: Callable[..., None]) -> Callable[..., None]:
        test = configured(test)
        return seed(int(FUZZ_SEED))(test) if FUZZ_SEED is not None else test

    return wrap


@pytest.fixture(scope="module", autouse=True)
def report_counts() -> Iterator[None]:
    yield
    for kind, counter in sorted(COUNTS.items()):
        print(f"\nfuzz {kind}: {sum(counter.values())} cases: {dict(counter)}")


# ----------------------------------------------------------------------------- the harness
@dataclass(frozen=True)
class Outcome:
    argv: tuple[str, ...]
    returncode: int | None  # None: timed out
    stdout: str
    stderr: str


def _cap_memory() -> None:  # runs in the child before exec
    resource.setrlimit(resource.RLIMIT_AS, (MEM_CAP_BYTES, MEM_CAP_BYTES))


def run_subprocess(argv: list[str], cwd: Path) -> Outcome:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OPENBLAS_NUM_THREADS": "1",
           "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    try:
        done = subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True,
                              text=True, errors="replace", timeout=TIMEOUT_S,
                              preexec_fn=_cap_memory, check=False)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else ""
        return Outcome(tuple(argv), None, out, "")
    return Outcome(tuple(argv), done.returncode, done.stdout, done.stderr)


def run_cli(args: list[str], cwd: Path) -> Outcome:
    return run_subprocess(["-m", "sim.cli.main", *args], cwd)


def check_outcome(kind: str, outcome: Outcome, right: Callable[[Outcome], None]) -> None:
    """The property: exit 0 with a right result, or exit 2 with a one-line error."""
    shown = " ".join(repr(a) if not a or " " in a else a for a in outcome.argv)
    assert outcome.returncode is not None, f"hang (> {TIMEOUT_S:g} s): {shown}"
    assert "Traceback" not in outcome.stderr, f"{shown}\n{outcome.stderr[-3000:]}"
    assert outcome.returncode in (0, 2), (
        f"exit {outcome.returncode}: {shown}\n{outcome.stderr[-3000:]}")
    if outcome.returncode == 2:
        lines = [line for line in outcome.stderr.splitlines() if line.strip()]
        errors = [line for line in lines if ERROR_LINE.match(line)]
        assert len(errors) == 1 and lines[-1] == errors[0], f"{shown}\n{outcome.stderr}"
        reason = errors[0].split("error: ", 1)[1]
        COUNTS[kind]["refused: " + ("argparse" if reason.startswith(("argument ", "unrecognized",
                                                                     "the following"))
                                    else "infersim")] += 1
        return
    right(outcome)
    COUNTS[kind]["ran"] += 1


# ----------------------------------------------------------------------------- CLI vectors
def _value(valid: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """Mostly a plausible value, sometimes a hostile one."""
    return st.one_of(valid, valid, valid, st.sampled_from(HOSTILE))


def _ints(low: int, high: int) -> st.SearchStrategy[str]:
    return st.integers(low, high).map(str)


def _pick(*values: str) -> st.SearchStrategy[str]:
    return st.sampled_from(values)


FLAG = None  # a flag without a value (store_true)
ENGINE_FLAGS: dict[str, st.SearchStrategy[str] | None] = {
    "--hardware": _pick(*HARDWARE),
    "--dtype": _pick("auto", "float16", "bfloat16", "float64", "int3"),
    "--seed": _value(_ints(0, 5)),
    "--kv-cache": _pick("paged", "contiguous", "none", "pagd"),
    "--block-size": _value(_pick("1", "4", "16", "32", "17")),
    "--enable-prefix-caching": FLAG,
    "--contiguous-reservation": _pick("max_len", "pow2", "oracle"),
    "--preemption-mode": _pick("recompute", "swap"),
    "--swap-space": _value(_pick("0", "0.01", "4")),
    "--num-gpu-blocks-override": _value(_pick("4", "16", "64", "512")),
    "--kv-eviction": _pick("sliding_window", "streaming_llm", "h2o"),
    "--kv-eviction-window": _value(_pick("8", "64")),
    "--kv-cache-dtype": _pick("auto", "fp8", "int8"),
    "--scheduler": _pick("continuous", "static", "dynamic"),
    "--max-wait-s": _value(_pick("0", "0.01")),
    "--preferred-batch-sizes": _value(_pick("2", "4")),
    "--enable-chunked-prefill": FLAG,
    "--long-prefill-token-threshold": _value(_pick("0", "16")),
    "--max-num-partial-prefills": _value(_pick("1", "2")),
    "--scheduling-policy": _pick("fcfs", "priority", "shortest_prompt_first"),
    "--kv-watermark": _value(_pick("0", "0.01", "0.5")),
    "--admission-max-waiting": _value(_pick("0", "2")),
    "--admission-rate-per-s": _value(_pick("1", "100")),
    "--admission-ttft-slo-s": _value(_pick("0.001", "1")),
    "--max-model-len": _value(_pick("32", "128", "512", "2048")),
    "--max-num-seqs": _value(_ints(1, 16)),
    "--max-num-batched-tokens": _value(_pick("16", "256", "4096")),
    "--gpu-memory-utilization": _value(_pick("0.5", "0.9", "1")),
    "--tensor-parallel-size": _value(_pick("1", "2", "4")),
    "--pipeline-parallel-size": _value(_pick("1", "2")),
    "--data-parallel-size": _value(_pick("1", "2", "8")),
    "--enable-expert-parallel": FLAG,
    "--quantization": _pick("int8", "int4", "fp8", "w8a8"),
    "--speculative-config": _pick(
        '{"method": "ngram", "num_speculative_tokens": 2}',
        '{"method": "draft_model", "model": "JackFram/llama-68m", "num_speculative_tokens": 2}',
        '{"method": "draft_model", "model": "JackFram/llama-68m", "num_speculative_tokens": 3,'
        ' "tree": [50, 50, 50]}',
        '{"method": "ngram"', "[]", '{"method": "ngram", "num_speculative_tokens": 1e12}'),
}
SIMULATE_FLAGS: dict[str, st.SearchStrategy[str] | None] = {
    **ENGINE_FLAGS,
    "--request-rate": _value(_pick("1", "50", "inf")),
    "--burstiness": _value(_pick("0.5", "1", "4")),
    "--input-len": _value(_ints(1, 64)),
    "--output-len": _value(_ints(1, 16)),
    "--shared-prefix-len": _value(_pick("0", "8", "32")),
    "--num-system-prompts": _value(_pick("1", "3")),
    "--slo-ttft-ms": _value(_pick("10", "1000")),
    "--slo-tpot-ms": _value(_pick("1", "100")),
}


@st.composite
def flag_vector(draw: st.DrawFn, flags: dict[str, st.SearchStrategy[str] | None],
                max_flags: int) -> list[str]:
    names = draw(st.lists(st.sampled_from(sorted(flags)), max_size=max_flags, unique=True))
    argv: list[str] = []
    for name in names:
        value = flags[name]
        argv += [name] if value is None else [name, draw(value)]
    return argv


@st.composite
def cli_vectors(draw: st.DrawFn) -> list[str]:
    """One argument vector of any subcommand (plausible sizes small, so runs are short)."""
    command = draw(st.sampled_from(("simulate", "simulate", "simulate", "demo", "plans",
                                    "kv-memory", "models", "profiles")))
    if command == "simulate":
        mode = draw(st.sampled_from(("timing", "timing", "functional")))
        model = TINY if mode == "functional" else draw(st.sampled_from(MODELS))
        argv = ["simulate", "--mode", mode, "--model", model, "--no-progress",
                "--result-json", "-", "--num-prompts", draw(_value(_ints(1, 6)))]
        if mode == "timing" and draw(st.booleans()) and CONV_TRACE.exists():
            argv += ["--dataset-path", str(CONV_TRACE)]
        flags = draw(flag_vector(SIMULATE_FLAGS, 4))
        count = argv[-1].strip()
        if "--request-rate" in flags and not (count.isdigit() and len(count) <= 2):
            # a finite rate streams any number of requests: a huge count is then a long run,
            # not a bad input, so hostile counts are drawn with the all-at-once default only
            i = flags.index("--request-rate")
            del flags[i: i + 2]
        return argv + flags
    if command == "demo":
        return ["demo", "--model", TINY, "--num-prompts", draw(_value(_ints(1, 3))),
                "--input-len", draw(_value(_ints(1, 32))),
                "--output-len", draw(_value(_ints(1, 8))),
                *draw(flag_vector({"--hardware": _pick(*HARDWARE)}, 1))]
    if command == "plans":
        return ["plans", "--model", draw(st.sampled_from(MODELS)),
                "--num-gpus", draw(_value(_pick("1", "2", "4", "8"))),
                "--num-prompts", draw(_value(_ints(1, 8))),
                *draw(flag_vector({"--input-len": _value(_ints(1, 64)),
                                   "--output-len": _value(_ints(1, 16)),
                                   "--request-rate": _value(_pick("10", "inf")),
                                   "--hardware": _pick(*HARDWARE), "--json": FLAG}, 3))]
    if command == "kv-memory":
        return ["kv-memory", "--model", draw(st.sampled_from(MODELS)),
                "--seq-len", draw(_value(_ints(1, 8192))),
                *draw(flag_vector({"--batch-size": _value(_ints(1, 64)),
                                   "--dtype": _pick("float16", "fp8", "int4", "float7"),
                                   "--hardware": _pick(*HARDWARE),
                                   "--block-size": _value(_pick("16", "32")),
                                   "--kv-cache-dtype": _pick("fp8", "int8"),
                                   "--gpu-memory-utilization": _value(_pick("0.9")),
                                   "--json": FLAG}, 4))]
    extra = draw(st.lists(st.sampled_from(("--json", "-x", "extra")), max_size=1))
    return [command, *extra]


def _flag(argv: tuple[str, ...], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def right_cli_result(outcome: Outcome) -> None:
    argv = outcome.argv[2:]  # after "-m sim.cli.main"
    command = argv[0]
    if command == "simulate":
        result = json.loads(outcome.stdout)
        asked = int(_flag(argv, "--num-prompts") or 100)
        accounted = result["completed"] + result["num_rejected"] + result["num_aborted"]
        assert accounted == asked, (argv, result)
        assert result["total_output_tokens"] >= result["completed"]
    elif command == "demo":
        assert "identical output tokens with and without the KV cache: yes" in outcome.stdout
    elif command == "plans":
        if "--json" in argv:
            assert all("fits" in row for row in json.loads(outcome.stdout))
        else:
            assert outcome.stdout.startswith("plans for ")
    elif command == "kv-memory":
        if "--json" in argv:
            assert json.loads(outcome.stdout)["kv_bytes_per_token"] > 0
        else:
            assert "KV" in outcome.stdout
    else:
        assert outcome.stdout.strip()


@settings_for(24)
@given(cli_vectors())
def test_cli_vectors(tmp_path_factory: pytest.TempPathFactory, argv: list[str]) -> None:
    cwd = tmp_path_factory.mktemp("cli")
    check_outcome("cli", run_cli(argv, cwd), right_cli_result)


# ----------------------------------------------------------------------------- EngineArgs
ENGINE_DRIVER = """
import json, math, sys
from sim.core.errors import InfersimError
from sim.engine.args import EngineArgs
from sim.engine.engine import Engine
from sim.workload.specs import make_workload

kwargs = json.loads(sys.argv[1])
for key in ("preferred_batch_sizes",):
    if isinstance(kwargs.get(key), list):
        kwargs[key] = tuple(kwargs[key])
try:
    engine = Engine(EngineArgs.from_kwargs(**kwargs))
    result = engine.run(make_workload(3, math.inf, 12, 4, seed=1))
except InfersimError as exc:
    print(f"infersim: error: {exc}", file=sys.stderr)
    raise SystemExit(2)
statuses = sorted(str(r.status) for r in result.requests)
print(json.dumps({"num": len(result.requests), "statuses": statuses,
                  "tokens": sum(r.num_output_tokens for r in result.requests)}))
"""


def _hostile_value() -> st.SearchStrategy[object]:
    return st.one_of(st.sampled_from([-1, 0, 10**12, 2**63, -0.0, 0.5, 2.5, float("nan"),
                                      float("inf"), -float("inf"), 1e300, True, False, None,
                                      "16", "abc", "", [], [1, "2"], {"a": 1}]),
                     st.integers(-(10**20), 10**20), st.floats(allow_nan=True))


ENGINE_KWARGS: dict[str, st.SearchStrategy[object]] = {
    "block_size": st.sampled_from([1, 4, 16, 32]),
    "max_num_seqs": st.integers(1, 16),
    "max_model_len": st.sampled_from([32, 64, 512]),
    "max_num_batched_tokens": st.sampled_from([16, 64, 2048]),
    "gpu_memory_utilization": st.sampled_from([0.3, 0.9, 1.0]),
    "num_gpu_blocks_override": st.sampled_from([4, 8, 64]),
    "swap_space": st.sampled_from([0.0, 0.01, 4.0]),
    "seed": st.integers(0, 2**32),
    "kv_cache": st.sampled_from(["paged", "contiguous", "none"]),
    "scheduler": st.sampled_from(["continuous", "static", "dynamic"]),
    "preemption_mode": st.sampled_from(["recompute", "swap"]),
    "enable_prefix_caching": st.booleans(),
    "enable_chunked_prefill": st.booleans(),
    "long_prefill_token_threshold": st.sampled_from([0, 8]),
    "max_num_partial_prefills": st.sampled_from([1, 2]),
    "kv_watermark": st.sampled_from([0.0, 0.01, 0.5]),
    "tensor_parallel_size": st.sampled_from([1, 2]),
    "pipeline_parallel_size": st.sampled_from([1, 2]),
    "data_parallel_size": st.sampled_from([1, 2, 4]),
    "preferred_batch_sizes": st.sampled_from([[], [2], [1, 4]]),
    "max_wait_s": st.sampled_from([0.0, 0.01]),
    "admission_max_waiting": st.sampled_from([None, 0, 2]),
    "admission_rate_per_s": st.sampled_from([None, 1.0]),
    "kv_eviction": st.sampled_from([None, "sliding_window", "streaming_llm"]),
    "kv_eviction_window": st.sampled_from([8, 1024]),
    "quantization": st.sampled_from([None, "int8", "fp8"]),
    "kv_cache_dtype": st.sampled_from(["auto", "fp8"]),
    "no_such_argument": st.just(1),
}


@st.composite
def engine_kwargs(draw: st.DrawFn) -> dict[str, object]:
    names = draw(st.lists(st.sampled_from(sorted(ENGINE_KWARGS)), max_size=5, unique=True))
    kwargs: dict[str, object] = {"mode": "timing", "model": draw(st.sampled_from(MODELS[:4]))}
    if draw(st.integers(0, 4)) == 0:
        kwargs.update(mode="functional", model=TINY)
    for name in names:
        hostile = draw(st.integers(0, 3)) == 0
        kwargs[name] = draw(_hostile_value() if hostile else ENGINE_KWARGS[name])
    return kwargs


def right_engine_result(outcome: Outcome) -> None:
    result = json.loads(outcome.stdout)
    assert result["num"] == 3, result  # every request accounted for: finished or rejected
    assert all(s.split(".")[-1] in ("FINISHED", "REJECTED", "ABORTED")
               for s in result["statuses"]), result


@settings_for(12)
@given(engine_kwargs())
def test_engine_args_kwargs(tmp_path_factory: pytest.TempPathFactory,
                            kwargs: dict[str, object]) -> None:
    cwd = tmp_path_factory.mktemp("args")
    outcome = run_subprocess(["-c", ENGINE_DRIVER, json.dumps(kwargs)], cwd)
    check_outcome("engine_args", outcome, right_engine_result)


# ----------------------------------------------------------------------------- trace files
SYNTHETIC_TRACE = "TIMESTAMP,ContextTokens,GeneratedTokens\n" + "".join(
    f"2023-11-16 18:15:{i:02d}.{i * 37 % 10_000_000:07d},{100 + 13 * i},{5 + i % 7}\n"
    for i in range(20))


def _base_trace() -> bytes:
    if CONV_TRACE.exists():
        with CONV_TRACE.open("rb") as f:
            return b"".join(f.readline() for _ in range(21))
    return SYNTHETIC_TRACE.encode()


@st.composite
def trace_mutations(draw: st.DrawFn) -> tuple[bytes, list[str]]:
    """A real trace's head with 1-3 mutations; returns the bytes and the names applied."""
    data = bytearray(_base_trace())
    applied = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(("truncate", "flip", "delete_field", "bom", "huge",
                                     "swap_rows", "repeat_row", "blank_line", "negative",
                                     "far_date", "crlf")))
        applied.append(kind)
        lines = bytes(data).split(b"\n")
        row = draw(st.integers(1, max(1, len(lines) - 2)))
        if kind == "truncate":
            data = data[: draw(st.integers(0, len(data)))]
        elif kind == "flip" and data:
            for _ in range(draw(st.integers(1, 4))):
                data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        elif kind in ("delete_field", "huge", "negative") and row < len(lines):
            fields = lines[row].split(b",")
            i = draw(st.integers(0, max(0, len(fields) - 1)))
            if kind == "delete_field":
                del fields[i]
            elif kind == "huge":
                fields[i] = draw(st.sampled_from((b"1" + b"0" * 23, b"1e23", b"9" * 19,
                                                  b"4294967296")))
            else:
                fields[i] = b"-" + fields[i]
            lines[row] = b",".join(fields)
            data = bytearray(b"\n".join(lines))
        elif kind == "bom":
            data = bytearray(b"\xef\xbb\xbf") + data
        elif kind == "swap_rows" and row + 1 < len(lines) - 1:
            lines[row], lines[row + 1] = lines[row + 1], lines[row]
            data = bytearray(b"\n".join(lines))
        elif kind == "repeat_row" and row < len(lines):
            lines.insert(row, lines[row] if draw(st.booleans()) else lines[0])
            data = bytearray(b"\n".join(lines))
        elif kind == "blank_line":
            lines.insert(row, b"")
            data = bytearray(b"\n".join(lines))
        elif kind == "far_date" and row < len(lines):
            year = draw(st.sampled_from((b"2900", b"1500", b"1700", b"9999", b"0000")))
            lines[row] = year + lines[row][4:]
            data = bytearray(b"\n".join(lines))
        elif kind == "crlf":
            data = bytearray(bytes(data).replace(b"\n", b"\r\n"))
    return bytes(data), applied


@settings_for(12)
@given(trace_mutations(), st.sampled_from(("3", "20", "1000")))
def test_trace_mutations(tmp_path_factory: pytest.TempPathFactory,
                         mutated: tuple[bytes, list[str]], num_prompts: str) -> None:
    data, _ = mutated
    cwd = tmp_path_factory.mktemp("trace")
    path = cwd / "trace.csv"
    path.write_bytes(data)
    argv = ["simulate", "--mode", "timing", "--dataset-path", str(path), "--num-prompts",
            num_prompts, "--no-progress", "--result-json", "-"]

    def right(outcome: Outcome) -> None:
        text = data.decode("utf-8-sig")
        rows = [line for line in text.splitlines()[1:] if line.strip()]
        result = json.loads(outcome.stdout)
        accounted = result["completed"] + result["num_rejected"] + result["num_aborted"]
        # a trace shorter than --num-prompts is refused by the workload, so a run serves
        # exactly --num-prompts rows
        assert accounted == int(num_prompts) <= len(rows), (accounted, len(rows))

    check_outcome("trace", run_cli(argv, cwd), right)


def test_harness_catches_hangs_tracebacks_and_memory() -> None:
    """The property can fail: a traceback, a hang and an allocation past the cap are caught."""
    with tempfile.TemporaryDirectory() as folder:
        cwd = Path(folder)
        crash = run_subprocess(["-c", "raise RuntimeError('boom')"], cwd)
        with pytest.raises(AssertionError, match="boom"):
            check_outcome("harness", crash, lambda _: None)
        big = run_subprocess(["-c", "b = bytearray(4 * 2**30)"], cwd)
        assert big.returncode == 1 and "MemoryError" in big.stderr
        two_lines = Outcome(("x",), 2, "", "infersim: error: a\ninfersim: error: b\n")
        with pytest.raises(AssertionError):
            check_outcome("harness", two_lines, lambda _: None)
        hang = Outcome(("x",), None, "", "")
        with pytest.raises(AssertionError, match="hang"):
            check_outcome("harness", hang, lambda _: None)
    COUNTS.pop("harness", None)
