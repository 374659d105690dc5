"""`infersim explain TOPIC`: the four interview questions of the course, each walked through with
a live measurement.

Every topic runs small timing-only simulations (seconds), prints the numbers step by step, and
ends in a one-paragraph answer a learner could give in an interview, built from the numbers just
measured (change `--model` / `--hardware` and the answer changes with them). The questions are
the ones `notebooks/README.md` maps to the notebooks, restated:

- kv-memory (Q1): how much GPU memory does the KV cache of a 70B model take, and how many users
  fit? The formula, the per-GPU plan under tensor parallelism, and an engine run that fills the
  pool (Pope et al. 2022; Kwon et al. 2023).
- batching (Q2): why do PagedAttention and continuous batching raise throughput over static
  batching? Static (FasterTransformer-style request-level batches) against continuous
  (iteration-level, Orca, Yu et al. 2022), and contiguous max-length KV reservations against
  paged blocks (vLLM, Kwon et al. 2023).
- speculative (Q3): when does speculative decoding pay off, and when does it slow you down?
  A draft model at two acceptance rates, at batch 1 and at batch 64 (Leviathan et al. 2023;
  Chen et al. 2023).
- latency-throughput (Q4): how do you balance latency against throughput? A request-rate sweep
  with goodput at an SLO (DistServe, Zhong et al. 2024), and the batch cap `max_num_seqs`
  moving the knee.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from sim.core.errors import ConfigError, DoesNotFitError, UnknownNameError

TOPIC_HELP: dict[str, str] = {
    "kv-memory": "Q1: KV bytes per token of a 70B model, the per-GPU memory plan with tensor "
                 "parallelism, and how many users fit (checked by filling the pool in a run)",
    "batching": "Q2: static vs continuous batching at varied output lengths, and contiguous "
                "max-length KV vs paged blocks: throughput and requests resident at once",
    "speculative": "Q3: a draft model at high and low acceptance, at batch 1 and batch 64: "
                   "where TPOT drops and where it rises",
    "latency-throughput": "Q4: a request-rate sweep with goodput at a TTFT/TPOT SLO, and "
                          "max_num_seqs trading TPOT for throughput",
}
TOPICS = (*TOPIC_HELP, "list")
MAX_LIVE_REQUESTS = 1500  # the kv-memory live run's burst, at most


@dataclass
class Explanation:
    """One topic's walkthrough: the question, the measured steps, the numbers, the answer."""

    topic: str
    question: str
    steps: list[str] = field(default_factory=list)
    #: every number the answer quotes, by name (units in the name)
    numbers: dict[str, float] = field(default_factory=dict)
    answer: str = ""

    def format(self) -> str:
        lines = [f"Q: {self.question}", ""]
        lines += [f"{i}. {step}" for i, step in enumerate(self.steps, 1)]
        lines += ["", "Your answer:", _wrap(self.answer)]
        return "\n".join(lines)


def _wrap(text: str, width: int = 96) -> str:
    import textwrap

    return textwrap.fill(text, width=width, initial_indent="  ", subsequent_indent="  ",
                         break_on_hyphens=False)


def add_explain_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The `explain` subcommand: TOPIC (one of `TOPICS`); `--help` explains each topic."""
    import textwrap

    topics_text = "\n".join(
        textwrap.fill(text, width=94, initial_indent=f"  {name:<19} ",
                      subsequent_indent=" " * 22) for name, text in TOPIC_HELP.items())
    p = sub.add_parser(
        "explain", help="walk through an interview question with a live measurement",
        description="Walks you through one of the course's four interview questions with a "
                    "live timing-only measurement (seconds), printing the numbers step by step "
                    "and ending in a one-paragraph answer that quotes them.",
        epilog=f"topics:\n{topics_text}\n  {'list':<19} list the topics",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("topic", metavar="TOPIC", help=f"one of: {', '.join(TOPICS)}")
    p.add_argument("--model", default=None,
                   help="model to measure (default: Llama-2-70B for kv-memory, Llama-2-7B "
                        "otherwise)")
    p.add_argument("--hardware", default="a100-sxm4-80gb", help="GPU profile name or .toml")


def run_explain(ns: argparse.Namespace) -> int:
    """Print the walkthrough of `ns.topic`; an unknown topic is refused naming the choices."""
    if ns.topic == "list":
        for name, text in TOPIC_HELP.items():
            print(f"{name:<19} {text}")
        return 0
    builder = EXPLAINERS.get(ns.topic)
    if builder is None:
        raise UnknownNameError(f"unknown explain topic {ns.topic!r}; choose one of: "
                               f"{', '.join(TOPICS)} (e.g. `infersim explain kv-memory`)")
    print(builder(ns.model, ns.hardware).format())
    return 0


def _gib(num_bytes: float) -> float:
    return num_bytes / 2**30


def explain_kv_memory(model: str | None, hardware: str) -> Explanation:
    """Q1: the formula, the per-GPU plan at each TP degree of 1, 2, 4, 8 that the heads allow,
    fp8 KV, and a run at the largest that fills the pool (paged blocks are handed out as
    requests grow, so more start than fit at full length, and the excess is preempted)."""
    from sim.engine.args import EngineArgs
    from sim.engine.engine import Engine
    from sim.timing.kv_memory import KVMemoryDoesNotFitError, kv_memory_report
    from sim.workload.specs import make_workload

    model = model or "meta-llama/Llama-2-70b-hf"
    seq_len = 4096
    ex = Explanation("kv-memory", "How much GPU memory does the KV cache of a 70B model take, "
                                  "and how many users fit?")
    r = kv_memory_report(model, seq_len, 1, "float16")
    per_token_kib = r["kv_bytes_per_token"] / 2**10
    per_request_gib = _gib(r["kv_bytes_per_request"])
    ex.steps.append(
        f"KV per token = 2 (K, V) x {r['n_layer']} layers x {r['n_kv_head']} KV heads x "
        f"{r['d_head']} head dim x 2 B (fp16) = {per_token_kib:,.0f} KiB; one {seq_len}-token "
        f"request holds {per_request_gib:.2f} GiB"
        + (f" (GQA: {r['n_kv_head']} KV heads for {r['n_head']} query heads, "
           f"{r['n_head'] // r['n_kv_head']}x less than MHA)" if r["n_kv_head"] != r["n_head"]
           else ""))
    ex.numbers.update(kv_kib_per_token=per_token_kib, kv_gib_per_request=per_request_gib)
    users_by_tp: dict[int, int] = {}
    fit = None
    for tp in (1, 2, 4, 8):
        try:
            report = kv_memory_report(model, seq_len, 1, "float16", hardware=hardware,
                                      tensor_parallel_size=tp)
        except KVMemoryDoesNotFitError as exc:
            miss = exc.report
            ex.steps.append(
                f"TP={tp}: {_gib(miss['weight_bytes_per_gpu']):.1f} GiB of fp16 weights per "
                f"GPU against a {_gib(miss['budget_bytes']):.1f} GiB budget "
                f"({miss['gpu_memory_utilization']:g} x {_gib(miss['capacity_bytes']):.0f} GiB): "
                f"no room for KV")
            continue
        except ConfigError:  # a TP degree the head counts do not split: try the next
            continue
        fit = report
        users_by_tp[tp] = report["max_concurrent_requests"]
        ex.steps.append(
            f"TP={tp}: per GPU {_gib(report['weight_bytes_per_gpu']):.1f} GiB of weights, "
            f"{_gib(report['activation_peak_bytes']):.2f} GiB of activations, "
            f"{_gib(report['kv_pool_bytes_per_gpu']):.1f} GiB left for KV; each GPU keeps "
            f"{report['kv_heads_per_gpu']:g} of the {report['n_kv_head']} KV heads, so the {tp} "
            f"GPUs hold {report['num_kv_tokens']:,} tokens = {users_by_tp[tp]} users of "
            f"{seq_len} tokens")
    if fit is None:
        raise DoesNotFitError(f"{model} does not fit on 8 x {hardware} in fp16; pick a bigger "
                              "--hardware or a smaller --model")
    tp, min_tp = fit["tensor_parallel_size"], min(users_by_tp)
    users = users_by_tp[tp]
    pool_gib = _gib(fit["kv_pool_bytes_per_gpu"])
    fp8 = kv_memory_report(model, seq_len, 1, "float16", hardware=hardware,
                           tensor_parallel_size=tp, kv_cache_dtype="fp8")
    users_fp8 = fp8["max_concurrent_requests"]
    ex.steps.append(f"TP={tp} with an fp8 KV cache (1 B per element): {users_fp8} users, "
                    f"{users_fp8 / max(users, 1):.2f}x")
    ex.numbers.update(tensor_parallel_size=tp, kv_pool_gib_per_gpu=pool_gib, users=users,
                      users_fp8_kv=users_fp8, min_tensor_parallel_size=min_tp)
    for degree, count in users_by_tp.items():
        ex.numbers[f"users_tp{degree}"] = count
    # Live: a burst of 1.5x that many half-prompt/half-output requests, KV the only limit
    # (capped so that a small model's thousands of users still run in seconds)
    num_requests = min(MAX_LIVE_REQUESTS, max(4, math.ceil(1.5 * users)))
    args = EngineArgs(model=model, hardware=hardware, mode="timing", tensor_parallel_size=tp,
                      dtype="float16", max_num_seqs=max(256, 2 * num_requests))
    result = Engine(args).run(make_workload(num_requests, math.inf, seq_len // 2, seq_len // 2,
                                            seed=0), keep_requests=False, record_steps=True)
    assert result.steps is not None  # record_steps=True
    steps = result.steps.summary()
    peak_running = steps["max_batch_size"]
    kv_peak_share = steps["max_kv_used_tokens"] / fit["num_kv_tokens"]
    preemptions = result.stats.num_preemptions
    ex.steps.append(
        f"live run (timing-only, TP={tp}): {num_requests} requests of {seq_len // 2} + "
        f"{seq_len // 2} tokens at once: up to {peak_running} ran together while short, the "
        f"KV pool peaked at {kv_peak_share:.0%} full, and {preemptions} preemptions made room "
        f"as they grew to {seq_len} tokens; {result.summary.output_throughput:,.0f} output "
        f"tokens/s")
    ex.numbers.update(live_peak_running=peak_running, live_kv_peak_share=kv_peak_share,
                      live_preemptions=preemptions)
    gpus = "GPU" if min_tp == 1 else "GPUs"
    grew_faster = tp > min_tp and users / max(users_by_tp[min_tp], 1) > tp / min_tp
    scaling = ": the weights are paid once, so users grew faster than GPUs" if grew_faster else ""
    if preemptions:
        live = (f"Paged allocation admits more while requests are short ({peak_running} ran at "
                f"once in my run) and preempts when they grow ({preemptions} preemptions), so the "
                f"number that matters is tokens resident, not requests.")
    else:
        live = (f"In my run a burst of {num_requests} requests filled the pool to "
                f"{kv_peak_share:.0%} with no preemption, so memory was not the limit there.")
    ex.answer = (
        f"Per token the KV cache is 2 x layers x KV heads x head dim x bytes: for {model} in "
        f"fp16 that is {per_token_kib:,.0f} KiB, so a {seq_len}-token user holds "
        f"{per_request_gib:.2f} GiB. "
        + (f"The fp16 weights alone do not fit one {_gib(fit['capacity_bytes']):.0f} GiB GPU; "
           f"the smallest TP that fits is {min_tp} {gpus}" if min_tp > 1
           else f"One {_gib(fit['capacity_bytes']):.0f} GiB GPU already holds the fp16 weights")
        + f", with room for {users_by_tp[min_tp]} users. With tensor parallelism over {tp} GPUs "
        f"each keeps 1/{tp} of the weights and of the KV heads and has {pool_gib:.1f} GiB left, "
        f"which holds {users} users at {seq_len} tokens ({users_fp8} with an fp8 KV "
        f"cache){scaling}. {live}")
    return ex


def explain_batching(model: str | None, hardware: str) -> Explanation:
    """Q2: continuous vs (fair) static batching at fixed and varied output lengths, and paged vs
    contiguous max-length KV with continuous batching."""
    from sim.engine.args import EngineArgs
    from sim.engine.engine import Engine
    from sim.workload.specs import LognormalLength, make_workload

    model = model or "meta-llama/Llama-2-7b-hf"
    ex = Explanation("batching", "Why do PagedAttention and continuous batching raise "
                                 "throughput over static batching?")
    seats = 64

    def run(output: int | LognormalLength, **kw: str) -> tuple[float, float]:
        """Output tokens/s and the mean requests per step of a burst of 256 requests."""
        args = EngineArgs(model=model, hardware=hardware, mode="timing", max_num_seqs=seats,
                          **kw)  # type: ignore[arg-type]
        result = Engine(args).run(make_workload(256, math.inf, 512, output, seed=0),
                                  keep_requests=False, record_steps=True)
        assert result.steps is not None  # record_steps=True
        return result.summary.output_throughput, result.steps.summary()["mean_batch_size"]

    gains = {}
    for label, output in (("equal (128)", 128),
                          ("log-normal (median 128, sigma 1)", LognormalLength(128, 1.0, 1024))):
        static_tok_s, _ = run(output, scheduler="static")
        cont_tok_s, _ = run(output, scheduler="continuous")
        gains[label] = cont_tok_s / static_tok_s
        ex.steps.append(f"256 requests of 512 prompt tokens, output lengths {label}, {seats} "
                        f"seats: static {static_tok_s:,.0f} tok/s, continuous {cont_tok_s:,.0f} "
                        f"tok/s = {gains[label]:.2f}x")
    equal_gain, varied_gain = gains.values()
    lognormal = LognormalLength(128, 1.0, 1024)
    seats = 256
    contiguous_tok_s, contiguous_batch = run(lognormal, kv_cache="contiguous",
                                             contiguous_reservation="max_len")
    paged_tok_s, paged_batch = run(lognormal, kv_cache="paged")
    paged_gain = paged_tok_s / contiguous_tok_s
    ex.steps.append(
        f"continuous, up to {seats} seats, varied lengths: contiguous KV reserving max_model_len "
        f"per request ran {contiguous_batch:.0f} requests on average ({contiguous_tok_s:,.0f} "
        f"tok/s); paged 16-token blocks ran {paged_batch:.0f} ({paged_tok_s:,.0f} tok/s) = "
        f"{paged_gain:.2f}x")
    ex.numbers.update(continuous_gain_equal=equal_gain, continuous_gain_varied=varied_gain,
                      contiguous_mean_batch=contiguous_batch, paged_mean_batch=paged_batch,
                      paged_gain=paged_gain)
    ex.answer = (
        f"Decode is memory-bound, so throughput grows with the number of requests sharing each "
        f"weight read. Static batching holds every seat until the batch's longest request "
        f"ends: with equal output lengths nothing idles and continuous batching gained "
        f"{equal_gain:.2f}x in my run, with log-normal lengths seats idle behind the longest "
        f"member and refilling a seat every iteration (Orca) gained {varied_gain:.2f}x. "
        f"PagedAttention "
        f"attacks the other cap, memory: reserving max_model_len per request let only "
        f"{contiguous_batch:.0f} requests run at once on average, 16-token blocks allocated as "
        f"requests grow let {paged_batch:.0f} run, {paged_gain:.2f}x the throughput. The gain "
        f"comes from variance and reservation waste, so it depends on the workload.")
    return ex


def explain_speculative(model: str | None, hardware: str) -> Explanation:
    """Q3: TPOT with a draft model (k=4) at acceptance 0.8 and 0.4, at batch 1 and batch 64,
    against the same run without speculation."""
    from sim.engine.args import EngineArgs
    from sim.engine.engine import Engine
    from sim.workload.specs import make_workload

    model = model or "meta-llama/Llama-2-7b-hf"
    draft = "JackFram/llama-68m"
    ex = Explanation("speculative", "When does speculative decoding pay off, and when does it "
                                    "slow you down?")

    def tpot_ms(batch: int, acceptance: float | None) -> float:
        spec = None if acceptance is None else {
            "method": "draft_model", "model": draft, "num_speculative_tokens": 4,
            "acceptance_rate": acceptance}
        args = EngineArgs(model=model, hardware=hardware, mode="timing", max_num_seqs=batch,
                          speculative_config=spec)
        result = Engine(args).run(make_workload(2 * batch, math.inf, 256, 256, seed=0),
                                  keep_requests=False)
        return result.summary.tpot.mean_s * 1e3

    speedups: dict[tuple[int, float], float] = {}
    for batch in (1, 64):
        base = tpot_ms(batch, None)
        cells = []
        for acceptance in (0.8, 0.4):
            tpot = tpot_ms(batch, acceptance)
            speedups[batch, acceptance] = base / tpot
            cells.append(f"acceptance {acceptance:g}: {tpot:.1f} ms "
                         f"({speedups[batch, acceptance]:.2f}x)")
        ex.steps.append(f"batch {batch}: TPOT {base:.1f} ms without speculation; with the draft "
                        f"{draft}, k=4: " + "; ".join(cells))
        ex.numbers[f"tpot_ms_batch{batch}"] = base
    for (batch, acceptance), value in speedups.items():
        ex.numbers[f"speedup_batch{batch}_acc{acceptance:g}"] = value
    ex.answer = (
        f"Speculation trades spare compute for fewer sequential target passes: the draft "
        f"proposes 4 tokens and the target checks them in one forward. At batch 1 decode is "
        f"memory-bound, the check costs about one normal step, and with 80% acceptance TPOT "
        f"fell {speedups[1, 0.8]:.2f}x in my run ({speedups[1, 0.4]:.2f}x at 40%). At batch "
        f"64 the GPU is busier and verifying 5 tokens per sequence is no longer free: the gain "
        f"{'shrank' if speedups[64, 0.8] < speedups[1, 0.8] else 'went'} to "
        f"{speedups[64, 0.8]:.2f}x at 80% and {speedups[64, 0.4]:.2f}x at 40%"
        + (" - a slowdown" if speedups[64, 0.4] < 1 else "")
        + ". So it pays at low load with a draft that agrees often, and it hurts when "
          "acceptance is low or the batch is already large; adaptive k or turning it off "
          "under load is the fix.")
    return ex


def explain_latency_throughput(model: str | None, hardware: str) -> Explanation:
    """Q4: a rate sweep with goodput at an SLO (the knee), then max_num_seqs trading TPOT for
    throughput at one overload rate."""
    from sim.engine.args import EngineArgs
    from sim.engine.engine import Engine
    from sim.workload.specs import LognormalLength, RequestSpec, make_workload

    model = model or "meta-llama/Llama-2-7b-hf"
    ex = Explanation("latency-throughput", "How do you balance latency against throughput?")
    slo_ttft_s, slo_tpot_s = 1.0, 0.05

    def workload(rate: float) -> list[RequestSpec]:
        return list(make_workload(300, rate, LognormalLength(256, 0.9, 1024),
                                  LognormalLength(192, 0.8, 1024), seed=0))

    rates = (2.0, 4.0, 8.0, 16.0, 32.0)
    best_rate, best_goodput, rows = rates[0], -1.0, []
    for rate in rates:
        result = Engine(EngineArgs(model=model, hardware=hardware, mode="timing")).run(
            workload(rate), keep_requests=False)
        s = result.metrics.summary(slo_ttft_s=slo_ttft_s, slo_tpot_s=slo_tpot_s)
        goodput = s.request_goodput or 0.0
        rows.append(f"{rate:g} req/s: {s.request_throughput:.1f} done/s, p99 TTFT "
                    f"{s.ttft.p99_s * 1e3:,.0f} ms, mean TPOT {s.tpot.mean_s * 1e3:.0f} ms, "
                    f"goodput {goodput:.1f} req/s")
        if goodput > best_goodput:
            best_rate, best_goodput = rate, goodput
        ex.numbers[f"goodput_at_{rate:g}"] = goodput
    ex.steps.append(f"rate sweep (300 ShareGPT-like requests, SLO TTFT <= {slo_ttft_s:g} s and "
                    f"TPOT <= {slo_tpot_s * 1e3:.0f} ms): " + "; ".join(rows))
    ex.numbers.update(knee_rate=best_rate, knee_goodput=best_goodput)
    top = rates[-1]
    caps = {}
    for seqs in (8, 256):
        result = Engine(EngineArgs(model=model, hardware=hardware, mode="timing",
                                   max_num_seqs=seqs)).run(workload(top), keep_requests=False)
        caps[seqs] = (result.summary.output_throughput, result.summary.tpot.mean_s * 1e3)
    ex.steps.append(f"at {top:g} req/s, max_num_seqs 8: {caps[8][0]:,.0f} tok/s at TPOT "
                    f"{caps[8][1]:.0f} ms; max_num_seqs 256: {caps[256][0]:,.0f} tok/s at TPOT "
                    f"{caps[256][1]:.0f} ms")
    ex.numbers.update(tok_s_seqs8=caps[8][0], tpot_ms_seqs8=caps[8][1],
                      tok_s_seqs256=caps[256][0], tpot_ms_seqs256=caps[256][1])
    last = ex.numbers[f"goodput_at_{top:g}"]
    ex.answer = (
        f"Throughput rises with load only until queueing takes over: in my sweep goodput (requests "
        f"per second meeting TTFT <= {slo_ttft_s:g} s and TPOT <= {slo_tpot_s * 1e3:.0f} ms) "
        f"peaked at {best_goodput:.1f} req/s at {best_rate:g} req/s offered and was "
        f"{last:.1f} at {top:g} req/s, though the GPU was busier. So I would size the fleet for "
        f"goodput at the SLO, not peak throughput, and move the knee with the batch cap: "
        f"max_num_seqs 8 kept TPOT at {caps[8][1]:.0f} ms but gave {caps[8][0]:,.0f} tok/s, "
        f"256 gave {caps[256][0]:,.0f} tok/s at {caps[256][1]:.0f} ms TPOT. Chunked prefill, "
        f"admission control and routing are the other levers on the same trade-off.")
    return ex


EXPLAINERS: dict[str, Callable[[str | None, str], Explanation]] = {
    "kv-memory": explain_kv_memory,
    "batching": explain_batching,
    "speculative": explain_speculative,
    "latency-throughput": explain_latency_throughput,
}
