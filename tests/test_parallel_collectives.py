"""Collectives: textbook alpha-beta costs, and the all-reduce stays within Vidur's measured error."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from parallel.collectives import Collectives, CommMode
from sim.core.errors import ConfigError
from sim.timing.calibration import default_data_dir, fit_all_reduce
from sim.timing.hardware import Link, load_profile

A100 = load_profile("a100-sxm4-80gb")
L40S = load_profile("l40s")
LINK = Link("test", bandwidth_bytes_per_s=100e9, latency_s=5e-6)
DATA = default_data_dir() / "network" / "a100_dgx" / "all_reduce.csv"


def test_ring_all_reduce_is_2_n_minus_1_steps_of_size_over_n():
    c = Collectives(LINK)
    n, size = 8, 64e6
    assert c.ring_all_reduce_s(size, n) == pytest.approx(2 * 7 * (5e-6 + size / 8 / 100e9))
    assert c.tree_all_reduce_s(size, n) == pytest.approx(2 * 3 * (5e-6 + size / 100e9))
    assert c.all_gather_s(size, n) == pytest.approx(7 * (5e-6 + size / 8 / 100e9))
    assert c.send_recv_s(size) == pytest.approx(5e-6 + size / 100e9)


def test_one_gpu_or_no_bytes_costs_nothing():
    c = Collectives.gpu_link(A100)
    assert c.all_reduce_s(1e6, 1) == c.all_gather_s(1e6, 1) == c.all_to_all_s(1e6, 1) == 0.0
    assert c.all_reduce_s(0.0, 8) == 0.0


def test_tree_wins_small_messages_and_ring_large_ones():
    c = Collectives.gpu_link(A100, CommMode(custom_all_reduce=False))
    small, large = c.all_reduce(4096, 8), c.all_reduce(64e6, 8)
    assert small.algorithm == "tree" and small.transfer_s == c.tree_all_reduce_s(4096, 8)
    assert c.tree_all_reduce_s(4096, 8) < c.ring_all_reduce_s(4096, 8)
    assert large.algorithm == "ring" and large.transfer_s == c.ring_all_reduce_s(64e6, 8)
    assert c.ring_all_reduce_s(64e6, 8) < c.tree_all_reduce_s(64e6, 8)


def test_pcie_collectives_are_slower_than_nvlink():
    size = 16 * 4096 * 2 * 256
    assert (Collectives.gpu_link(L40S).all_reduce_s(size, 4)
            > 5 * Collectives.gpu_link(A100).all_reduce_s(size, 4))


@given(st.floats(1.0, 1e9), st.integers(1, 16), st.floats(1.0, 1e9))
def test_collectives_are_monotone_in_bytes(a, n, b):
    c = Collectives.gpu_link(A100)
    lo, hi = sorted((a, b))
    for f in (c.all_reduce_s, c.all_gather_s, c.all_to_all_s):
        assert 0.0 <= f(lo, n) <= f(hi, n)


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ConfigError, match="group size"):
        Collectives(LINK).all_reduce_s(1.0, 0)
    with pytest.raises(ConfigError, match="efficiency"):
        Collectives(LINK, efficiency=1.5)


@pytest.mark.skipif(not DATA.is_file(), reason=f"Vidur's network data not at {DATA}")
def test_all_reduce_prices_stay_within_the_measured_fit_error():
    """The parallel module's all-reduce (min of ring and tree over the profile's calibrated
    link) is no worse than `sim.timing.calibration.fit_all_reduce`'s ring fit on Vidur's 8x A100 DGX
    measurements (2-8 GPUs, 2 KB-64 MB)."""
    fit = fit_all_reduce()
    c = Collectives.gpu_link(A100, CommMode(cuda_graphs=False, custom_all_reduce=False))
    with DATA.open(newline="") as f:
        rows = [r for r in csv.DictReader(f)
                if r["rank"] == "0" and r["num_workers"] == r["devices_per_node"]]
    err = np.array([abs(c.all_reduce_s(float(r["size"]), int(r["num_workers"]))
                        / (float(r["time_stats.all_reduce.median"]) * 1e-3) - 1) for r in rows])
    assert np.median(err) <= fit["median_err"] + 0.01
    assert np.quantile(err, 0.9) <= fit["p90_err"] + 0.01
    big = [i for i, r in enumerate(rows) if float(r["size"]) >= 16e6]
    assert np.median(err[big]) < 0.25 and not math.isnan(float(np.median(err)))
