"""Collective communication priced alpha-beta over a hardware profile's GPU link.

Every primitive is a sequence of point-to-point steps, each priced by the profile's
`Link.transfer_s(bytes, efficiency)` = `latency_s + bytes / (bandwidth_bytes_per_s x efficiency)`
(Hockney's alpha-beta model), with the efficiency the profile's `gpu_link_bandwidth` (fitted for
A100 NVLink against Vidur's measured all-reduce times, see `sim.timing.calibration.fit_all_reduce`).
For `n` GPUs and a buffer of `S` bytes:

    ring all-reduce      2 (n - 1) steps of S / n     (reduce-scatter then all-gather)
    tree all-reduce      2 ceil(log2 n) steps of S     (reduce up a binary tree, broadcast down)
    all-reduce           the faster of the two (NCCL picks by size: trees for small messages)
    all-gather           (n - 1) steps of S / n        (S = the gathered size)
    reduce-scatter       (n - 1) steps of S / n        (S = the full input size)
    all-to-all           (n - 1) steps of S / n        (pairwise exchange; S = one rank's buffer)
    send/recv            1 step of S

A group of one GPU communicates nothing (0 s). Links are per GPU and per direction, so the steps
of a ring or pairwise exchange run on every GPU at once.

References: Hockney 1994 (alpha-beta model); Thakur, Rabenseifner & Gropp 2005 ("Optimization of
Collective Communication Operations in MPICH": ring, tree, pairwise-exchange costs); Patarasuk &
Yuan 2009 (bandwidth-optimal ring all-reduce); NVIDIA NCCL (ring and tree algorithms).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sim.core.errors import ConfigError
from sim.timing.hardware import HardwareProfile, Link

__all__ = ["Collectives", "ring_all_reduce_s", "tree_all_reduce_s"]


def _check(num_bytes: float, n: int) -> None:
    if n < 1 or int(n) != n:
        raise ConfigError(f"a collective needs a positive integer group size, got {n}")
    if num_bytes < 0:
        raise ConfigError(f"a collective moves a non-negative number of bytes, got {num_bytes}")


def ring_all_reduce_s(link: Link, num_bytes: float, n: int, efficiency: float = 1.0) -> float:
    """Seconds of a ring all-reduce of `num_bytes` over `n` GPUs: 2(n-1) steps of bytes/n."""
    _check(num_bytes, n)
    if n == 1 or num_bytes == 0:
        return 0.0
    return 2 * (n - 1) * link.transfer_s(num_bytes / n, efficiency)


def tree_all_reduce_s(link: Link, num_bytes: float, n: int, efficiency: float = 1.0) -> float:
    """Seconds of a binary-tree all-reduce: reduce up and broadcast down, ceil(log2 n) steps
    each, every step moving the whole buffer (latency-optimal, bandwidth 2x worse than a ring)."""
    _check(num_bytes, n)
    if n == 1 or num_bytes == 0:
        return 0.0
    return 2 * math.ceil(math.log2(n)) * link.transfer_s(num_bytes, efficiency)


@dataclass(frozen=True)
class Collectives:
    """The collectives of one GPU group over `link` at `efficiency` x its peak bandwidth."""

    link: Link
    efficiency: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.efficiency <= 1:
            raise ConfigError(f"link efficiency must be in (0, 1], got {self.efficiency}")

    @classmethod
    def gpu_link(cls, hardware: HardwareProfile) -> Collectives:
        """The profile's GPU-GPU link at its calibrated collective efficiency."""
        return cls(hardware.gpu_link, hardware.efficiency_for("gpu_link_bandwidth"))

    def ring_all_reduce_s(self, num_bytes: float, n: int) -> float:
        return ring_all_reduce_s(self.link, num_bytes, n, self.efficiency)

    def tree_all_reduce_s(self, num_bytes: float, n: int) -> float:
        return tree_all_reduce_s(self.link, num_bytes, n, self.efficiency)

    def all_reduce_s(self, num_bytes: float, n: int) -> float:
        """The faster of ring and tree (as NCCL's tuner chooses per message size)."""
        return min(self.ring_all_reduce_s(num_bytes, n), self.tree_all_reduce_s(num_bytes, n))

    def all_gather_s(self, num_bytes: float, n: int) -> float:
        """Ring all-gather of a result of `num_bytes` in total (each GPU holds 1/n of it)."""
        _check(num_bytes, n)
        if n == 1 or num_bytes == 0:
            return 0.0
        return (n - 1) * self.link.transfer_s(num_bytes / n, self.efficiency)

    def reduce_scatter_s(self, num_bytes: float, n: int) -> float:
        """Ring reduce-scatter of an input of `num_bytes` (each GPU keeps 1/n of the sum)."""
        return self.all_gather_s(num_bytes, n)

    def all_to_all_s(self, num_bytes: float, n: int) -> float:
        """Pairwise-exchange all-to-all: each GPU sends 1/n of its `num_bytes` buffer to every
        other GPU, one peer per step."""
        return self.all_gather_s(num_bytes, n)

    def send_recv_s(self, num_bytes: float) -> float:
        """One point-to-point transfer (a pipeline stage boundary)."""
        _check(num_bytes, 1)
        return self.link.transfer_s(num_bytes, self.efficiency)
