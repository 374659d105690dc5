"""Plots people would rather look at than read: batch composition over time, which request holds
which slot (a Gantt chart), and latency against throughput.

Every function draws on a matplotlib `Axes` (a new figure when none is given) and returns it;
nothing here runs the engine.

References: Orca (Yu et al., OSDI'22) Fig. 3 (request- vs iteration-level scheduling timelines);
Sarathi-Serve (Agrawal et al., OSDI'24) latency-throughput curves.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from sim.core.request import Request, Status
from sim.metrics.step_series import StepSeries


def _axes(ax: Any, figsize: tuple[float, float] = (9, 3.5)) -> Any:
    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    return ax


def plot_step_series(steps: StepSeries, axes: Any = None) -> Any:
    """Two stacked panels over simulated time: running and waiting requests per step (top), and
    KV tokens holding real tokens vs held by reservations (bottom). Returns the two axes."""
    if axes is None:
        _, axes = plt.subplots(2, 1, figsize=(9, 5), sharex=True)
    top, bottom = axes
    cols = steps.columns()
    t_s = cols["start_s"]  # [n_steps]
    top.step(t_s, cols["num_seqs"], where="post", label="running sequences")
    top.step(t_s, cols["num_waiting"], where="post", label="waiting requests", alpha=0.8)
    top.set(ylabel="requests")
    top.legend(loc="upper right", fontsize=8)
    bottom.step(t_s, cols["kv_reserved_tokens"], where="post", color="tab:red", alpha=0.6,
                label="KV tokens reserved")
    bottom.step(t_s, cols["kv_used_tokens"], where="post", color="tab:green",
                label="KV tokens holding real tokens")
    bottom.set(xlabel="simulated time (s)", ylabel="KV tokens")
    bottom.legend(loc="upper right", fontsize=8)
    return axes


def assign_slots(requests: Sequence[Request]) -> dict[str, int]:
    """Give each request that ran the lowest slot free when it was first scheduled."""
    ran = sorted((r for r in requests if r.status is Status.FINISHED),
                 key=lambda r: (r.first_scheduled_s, r.index))
    slot_free_at_s: list[float] = []
    slots: dict[str, int] = {}
    for req in ran:
        free = [i for i, free_s in enumerate(slot_free_at_s) if free_s <= req.first_scheduled_s]
        slot = free[0] if free else len(slot_free_at_s)
        if not free:
            slot_free_at_s.append(0.0)
        slot_free_at_s[slot] = req.finished_s
        slots[req.request_id] = slot
    return slots


def plot_gantt(requests: Sequence[Request], ax: Any = None, title: str = "") -> Any:
    """One row per batch slot: each request's bar from first scheduled to finished, darker until
    its first token (prefill), lighter while decoding; the queueing before it as a thin line."""
    ax = _axes(ax)
    slots = assign_slots(requests)
    colors = plt.get_cmap("tab20")(np.linspace(0, 1, 20))  # [20, 4]
    for req in requests:
        if req.request_id not in slots:
            continue
        y = slots[req.request_id]
        color = colors[req.index % 20]
        ax.barh(y, req.first_token_s - req.first_scheduled_s, left=req.first_scheduled_s,
                color=color, edgecolor="black", linewidth=0.3)
        ax.barh(y, req.finished_s - req.first_token_s, left=req.first_token_s, color=color,
                alpha=0.45, edgecolor="black", linewidth=0.3)
    ax.set(xlabel="simulated time (s)", ylabel="batch slot", title=title)
    ax.invert_yaxis()
    return ax


def plot_latency_throughput(curves: dict[str, Sequence[tuple[float, float]]], ax: Any = None,
                            ylabel: str = "p99 latency (s)", logy: bool = True) -> Any:
    """One line per policy through its (throughput, latency) points, e.g. from a rate sweep."""
    ax = _axes(ax, figsize=(6, 4))
    for label, points in curves.items():
        xs, ys = zip(*points, strict=True) if points else ((), ())
        ax.plot(xs, ys, "o-", label=label)
    ax.set(xlabel="throughput (requests/s)", ylabel=ylabel)
    if logy:
        ax.set_yscale("log")
    ax.legend()
    return ax
