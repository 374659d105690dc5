"""Static batching as FasterTransformer-style servers run it (batching/static.py): one padded
prefill pass for the whole batch (no token budget), slots held as padding until the batch ends,
latency from each request's own token times, the non-streamed return time apart, padding waste
counted."""

from __future__ import annotations

import pytest

from batching.static import StaticScheduler
from sim.core.request import SamplingParams, Status
from sim.core.step import StepResult
from sim.engine.args import EngineArgs
from sim.engine.engine import Engine
from sim.workload.specs import RequestSpec
from tests.utils import create_scheduler


def test_a_batch_of_long_prompts_takes_every_seat_in_one_prefill_pass() -> None:
    # 64 prompts of 512 tokens: 32768 padded prefill tokens, far past max_num_batched_tokens
    # (4096); the strawman seated 8 or 9 of them
    specs = [RequestSpec(f"r{i}", 0.0, 512, 8) for i in range(64)]
    engine = Engine(EngineArgs(mode="timing", scheduler="static", max_num_seqs=64))
    result = engine.run(specs, record_steps=True)
    assert {r.first_scheduled_s for r in result.requests} == {0.0}
    assert result.steps is not None
    first = result.steps.rows[0]
    assert first[2] == 64 and first[3] == 64 * 512  # one step: every member's whole prompt
    assert result.stats.num_steps == 8  # that prefill (its first token) + 7 decodes


def test_latency_comes_from_each_request_own_tokens_and_return_is_the_batch_end() -> None:
    specs = [RequestSpec("short", 0.0, 32, 2), RequestSpec("long", 0.0, 32, 40)]
    engine = Engine(EngineArgs(mode="timing", scheduler="static", max_num_seqs=2))
    result = engine.run(specs)
    reqs = {r.request_id: r for r in result.requests}
    short, long = reqs["short"], reqs["long"]
    assert short.status is Status.FINISHED and long.status is Status.FINISHED
    assert short.finished_s == short.token_times_s[-1] < long.finished_s
    assert short.returned_s == long.returned_s == long.finished_s  # returned together
    # vLLM's TPOT equals the mean ITL when both come from the same token times
    table = result.metrics.per_request()
    index = [r.request_id for r in result.requests].index("short")
    itl_mean = (short.token_times_s[-1] - short.token_times_s[0]) / 1
    assert table["tpot_s"][index] == pytest.approx(itl_mean)
    assert table["e2e_s"][index] == pytest.approx(short.token_times_s[-1] - short.arrival_s)


def test_finished_members_are_priced_as_padding_until_the_batch_ends() -> None:
    engine, _kv, scheduler = create_scheduler(scheduler="static", max_num_seqs=2)
    for rid, max_tokens in (("a", 2), ("b", 5)):
        request = engine.make_request(rid, 0, 16, SamplingParams(max_tokens=max_tokens,
                                                                 ignore_eos=True), 0.0)
        assert scheduler.add(request) is None
    now_s, widths = 0.0, []
    while scheduler.has_work():
        plan = scheduler.schedule(now_s)
        assert plan is not None
        widths.append((len(plan.seqs), plan.shape.num_new_tokens))
        now_s += 1.0
        scheduler.update(plan, StepResult(token_ids=None), now_s)
    # prefill (2 x 16), one decode with both live, then three with "a" done but still priced
    assert widths == [(2, (16, 16)), (2, (1, 1)), (1, (1, 1)), (1, (1, 1)), (1, (1, 1))]
    assert isinstance(scheduler, StaticScheduler)
    stats = scheduler.padding_stats()
    assert stats.num_padded_token_steps == 32 + 2 * 4
    assert stats.num_useful_token_steps == 32 + 2 + 3
    assert stats.waste_fraction == pytest.approx(1 - 37 / 40)


def test_equal_lengths_waste_no_decode_padding() -> None:
    engine, _kv, scheduler = create_scheduler(scheduler="static", max_num_seqs=4)
    for i in range(4):
        scheduler.add(engine.make_request(f"r{i}", i, 16, SamplingParams(max_tokens=3,
                                                                         ignore_eos=True), 0.0))
    now_s = 0.0
    while scheduler.has_work():
        plan = scheduler.schedule(now_s)
        assert plan is not None
        now_s += 1.0
        scheduler.update(plan, StepResult(token_ids=None), now_s)
    assert isinstance(scheduler, StaticScheduler)
    assert scheduler.padding_stats().waste_fraction == 0.0


def test_result_json_reports_return_latency_padding_and_kv_fragmentation(tmp_path) -> None:
    import json

    from sim.cli.main import main

    out = tmp_path / "result.json"
    code = main(["simulate", "--num-prompts", "24", "--input-len", "64", "--output-len", "32",
                 "--mode", "timing", "--scheduler", "static", "--kv-cache", "contiguous",
                 "--no-progress", "--result-json", str(out)])
    data = json.loads(out.read_text())
    assert code == 0
    # the batch returns every result at its end: no earlier than the last token (E2E)
    assert data["mean_return_latency_ms"] >= data["mean_e2el_ms"] > 0
    assert data["padded_token_steps"] >= data["useful_token_steps"] > 0
    assert 0.0 <= data["padding_waste_fraction"] < 1.0
    parts = ("used_tokens", "reserved_unused_tokens", "internal_frag_tokens",
             "external_frag_tokens", "free_tokens")
    assert all(data[f"kv_{part}"] >= 0 for part in parts)
    assert data["kv_used_tokens"] > 0
