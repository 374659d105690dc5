"""Per-step observability: a time series of what every engine step did.

For each step: when it started and ended, how many sequences ran, how many prefill and decode
tokens it computed, how many requests were still waiting, how many tokens of real KV the step's
sequences hold after it, and how much KV capacity all requests hold (reserved, including
reserved-but-unused), and the lane that ran it. Recording is opt-in
(`Engine.run(..., record_steps=True)`) so that long timing-only runs keep flat memory.

With data or pipeline parallelism every lane's steps are recorded, in dispatch order, and the
`lane` column says whose (`replica * pipeline_parallel_size + virtual engine`; 0 with one
lane); steps of different lanes overlap in time, and `num_waiting` and the KV columns are the
lane's own. `for_lane(i)` is one lane's series.

The KV events of a step (preemptions made while planning it, blocks swapped out and in,
copy-on-write copies) are rare, so they are kept sparsely beside the rows (`kv_events`, keyed by
lane and start time: a lane runs one step at a time), read by the trace export
(`sim.metrics.trace_export`).

References: vLLM's per-iteration scheduler stats (`vllm/v1/metrics/stats.py`); Orca (OSDI'22)
Fig. 8-style batch composition over time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

COLUMNS = ("start_s", "end_s", "num_seqs", "num_prefill_tokens", "num_decode_tokens",
           "num_waiting", "kv_used_tokens", "kv_reserved_tokens", "lane")


@dataclass
class StepSeries:
    """Columns of equal length, one row per engine step."""

    rows: list[tuple[float, float, int, int, int, int, int, int, int]] = field(
        default_factory=list)
    #: (lane, start_s) -> (num_preemptions, num_swapped_out_blocks, num_swapped_in_blocks,
    #: num_copied_blocks) of the steps that had any (see the module doc)
    kv_events: dict[tuple[int, float], tuple[int, int, int, int]] = field(default_factory=dict)
    #: each lane's scheduler preemption count at its last recorded step
    preemptions_seen: dict[int, int] = field(default_factory=dict)

    def add(self, start_s: float, end_s: float, num_seqs: int, num_prefill_tokens: int,
            num_decode_tokens: int, num_waiting: int, kv_used_tokens: int,
            kv_reserved_tokens: int, lane: int = 0) -> None:
        self.rows.append((start_s, end_s, num_seqs, num_prefill_tokens, num_decode_tokens,
                          num_waiting, kv_used_tokens, kv_reserved_tokens, lane))

    def add_kv_events(self, lane: int, start_s: float, num_preemptions_total: int,
                      num_swapped_out_blocks: int, num_swapped_in_blocks: int,
                      num_copied_blocks: int) -> None:
        """Note the KV events of `lane`'s step starting at `start_s` (`num_preemptions_total`:
        the lane's scheduler's running count; the step's are those since its last step)."""
        preempted = num_preemptions_total - self.preemptions_seen.get(lane, 0)
        self.preemptions_seen[lane] = num_preemptions_total
        if preempted or num_swapped_out_blocks or num_swapped_in_blocks or num_copied_blocks:
            self.kv_events[(lane, start_s)] = (preempted, num_swapped_out_blocks,
                                               num_swapped_in_blocks, num_copied_blocks)

    def for_lane(self, lane: int) -> StepSeries:
        """The steps one lane ran (data or pipeline parallelism), in order."""
        return StepSeries([row for row in self.rows if row[-1] == lane],
                          {k: v for k, v in self.kv_events.items() if k[0] == lane})

    def __len__(self) -> int:
        return len(self.rows)

    def columns(self) -> dict[str, np.ndarray]:
        """Each column as a NumPy array [num_steps]."""
        table = np.array(self.rows, dtype=np.float64).reshape(-1, len(COLUMNS))  # [n, n_col]
        return {name: table[:, i] for i, name in enumerate(COLUMNS)}

    def summary(self) -> dict[str, Any]:
        cols = self.columns()
        if not len(self):
            return {"num_steps": 0}
        tokens = cols["num_prefill_tokens"] + cols["num_decode_tokens"]  # [n]
        return {
            "num_steps": len(self),
            "mean_batch_size": float(cols["num_seqs"].mean()),
            "max_batch_size": int(cols["num_seqs"].max()),
            "mean_tokens_per_step": float(tokens.mean()),
            "prefill_token_fraction": float(cols["num_prefill_tokens"].sum() / max(tokens.sum(), 1)),
            "max_num_waiting": int(cols["num_waiting"].max()),
            "max_kv_used_tokens": int(cols["kv_used_tokens"].max()),
            "max_kv_reserved_tokens": int(cols["kv_reserved_tokens"].max()),
        }
