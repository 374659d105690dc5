"""Collective communication by implementation: NCCL ring/tree, vLLM's custom all-reduce, and the
fixed cost of each call (eager launch or CUDA-graph replay), priced over a profile's GPU link.

Transfers are Hockney's alpha-beta model: one step moving `S` bytes costs
`latency_s + S / (bandwidth_bytes_per_s x efficiency)` (`Link.transfer_s`), with the link's
`latency_s` the per-step alpha and the profile's `gpu_link_bandwidth` the efficiency. For `n` GPUs
and a buffer of `S` bytes:

    NCCL ring all-reduce      2 (n - 1) steps of S / n     (reduce-scatter then all-gather)
    NCCL tree all-reduce      2 ceil(log2 n) steps of S     (reduce up a binary tree, broadcast down)
    custom one-shot           1 step: every GPU reads the other n - 1 buffers and sums them
    custom two-shot           2 steps: reduce-scatter, then all-gather, each reading (n-1) S / n
    all-gather                (n - 1) steps of S / n        (S = the gathered size)
    reduce-scatter            (n - 1) steps of S / n        (S = the full input size)
    all-to-all                (n - 1) steps of S / n        (pairwise exchange; S = one rank's buffer)
    send/recv                 1 step of S

The custom kernels read their peers' buffers directly (CUDA IPC), so how the n - 1 reads share
the wire depends on the link's `topology`: through an NVSwitch (`switch`) they share the GPU's
one port (n - 1 buffers of S at the per-GPU bandwidth); on a fully connected mesh (`mesh`,
AMD Infinity Fabric) each peer has its own link (one buffer of S per link, all in parallel);
over PCIe or NVLink bridges (`bus`) the GPU's one port is shared as on a switch, and only pairs
are fully connected.

Which all-reduce runs follows vLLM (`vllm/distributed/device_communicators/custom_all_reduce.py`
and `csrc/custom_all_reduce.cuh`; rules restated here, no code taken): the custom all-reduce is
used when it is enabled (`disable_custom_all_reduce` False), the group has 2, 4, 6 or 8 GPUs, the
message is under 8 MiB (its registered buffer) and the GPUs are fully connected (any 2 GPUs with
peer access, or a switch/mesh for more); then one-shot when n = 2, or n <= 4 and S < 512 KiB, or
n <= 8 and S < 256 KiB, and two-shot otherwise. Everything else is NCCL, which picks ring or tree
per size (the faster of the two here, as its tuner does).

Each call also pays a fixed cost, kept apart (`Priced.call_s`) so a step reports it as its own
term: a CUDA-graph replay (`CommMode.cuda_graphs`, vLLM's default; graphs cover steps of at most
`CUDA_GRAPH_MAX_TOKENS` tokens) pays only the kernel start and the cross-GPU handshake
(`[collectives] nccl_graph_call_s`, `custom_all_reduce_call_s`); an eager call
(`enforce_eager`, or a bigger step) pays the host launch and the skew between the GPUs' launches
on top (`nccl_eager_call_s`). The eager NCCL constants are fitted on Vidur's measurements, which
are eager NCCL (`sim.timing.calibration.fit_collectives`, `benchmarks/collectives.py`).

A group of one GPU communicates nothing (0 s). Links are per GPU and per direction, so the steps
of a ring or pairwise exchange run on every GPU at once.

References: Hockney 1994 (alpha-beta model); Thakur, Rabenseifner & Gropp 2005 ("Optimization of
Collective Communication Operations in MPICH": ring, tree, pairwise-exchange costs); Patarasuk &
Yuan 2009 (bandwidth-optimal ring all-reduce); NVIDIA NCCL (ring and tree algorithms); vLLM's
custom all-reduce (Kwon et al. 2023, vLLM; the one-shot/two-shot kernels after
FasterTransformer/TensorRT-LLM); Agrawal et al. 2024 (Vidur, the measured all-reduce times).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sim.core.errors import ConfigError
from sim.timing.hardware import CollectiveCalls, HardwareProfile, Link

__all__ = [
    "CUDA_GRAPH_MAX_TOKENS", "CUSTOM_AR_MAX_BYTES", "CUSTOM_AR_WORLD_SIZES", "Collectives",
    "CommMode", "Priced", "custom_all_reduce_algorithm", "one_shot_all_reduce_s",
    "ring_all_reduce_s", "tree_all_reduce_s", "two_shot_all_reduce_s",
]

# vLLM's CustomAllreduce: the group sizes its kernels are compiled for and its default buffer
CUSTOM_AR_WORLD_SIZES: tuple[int, ...] = (2, 4, 6, 8)
CUSTOM_AR_MAX_BYTES = 8 * 2**20
CUSTOM_AR_VENDORS: tuple[str, ...] = ("nvidia", "amd")  # its CUDA and ROCm builds
# one-shot below these sizes (csrc/custom_all_reduce.cuh), two-shot above
_ONE_SHOT_MAX_BYTES_4 = 512 * 2**10  # n <= 4
_ONE_SHOT_MAX_BYTES_8 = 256 * 2**10  # n <= 8
# vLLM V1 captures CUDA graphs for batches up to this many tokens (max_cudagraph_capture_size);
# bigger steps (long prefills) run eagerly
CUDA_GRAPH_MAX_TOKENS = 512


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


def _peer_reads_s(link: Link, bytes_per_peer: float, n: int, efficiency: float) -> float:
    """One step in which every GPU reads `bytes_per_peer` from each of its n - 1 peers at once:
    a mesh gives every peer its own link; a switch or a bus shares the GPU's one port."""
    per_link = bytes_per_peer if link.topology == "mesh" else (n - 1) * bytes_per_peer
    return link.transfer_s(per_link, efficiency)


def one_shot_all_reduce_s(link: Link, num_bytes: float, n: int, efficiency: float = 1.0) -> float:
    """vLLM's one-stage custom all-reduce: each GPU reads all n - 1 peer buffers and sums them
    (one step; (n - 1) S bytes into each GPU)."""
    _check(num_bytes, n)
    if n == 1 or num_bytes == 0:
        return 0.0
    return _peer_reads_s(link, num_bytes, n, efficiency)


def two_shot_all_reduce_s(link: Link, num_bytes: float, n: int, efficiency: float = 1.0) -> float:
    """vLLM's two-stage custom all-reduce: a reduce-scatter (each GPU sums its 1/n slice from
    every peer) then an all-gather of the slices: two steps of (n - 1) S / n bytes per GPU."""
    _check(num_bytes, n)
    if n == 1 or num_bytes == 0:
        return 0.0
    return 2 * _peer_reads_s(link, num_bytes / n, n, efficiency)


def custom_all_reduce_algorithm(num_bytes: float, n: int, topology: str) -> str | None:
    """'one_shot' or 'two_shot' where vLLM's custom all-reduce takes a message of `num_bytes`
    over `n` GPUs on a link of `topology`, else None (NCCL runs it)."""
    if n not in CUSTOM_AR_WORLD_SIZES or num_bytes >= CUSTOM_AR_MAX_BYTES:
        return None
    if n > 2 and topology not in ("switch", "mesh"):
        return None  # vLLM disables it for > 2 GPUs that are not fully connected
    if (n == 2 or (n <= 4 and num_bytes < _ONE_SHOT_MAX_BYTES_4)
            or (n <= 8 and num_bytes < _ONE_SHOT_MAX_BYTES_8)):
        return "one_shot"
    return "two_shot"


@dataclass(frozen=True)
class CommMode:
    """How the engine runs its collectives: vLLM's defaults are CUDA graphs on
    (`enforce_eager=False`) and the custom all-reduce on (`disable_custom_all_reduce=False`)."""

    cuda_graphs: bool = True
    custom_all_reduce: bool = True

    @classmethod
    def from_flags(cls, enforce_eager: bool, disable_custom_all_reduce: bool) -> CommMode:
        return cls(cuda_graphs=not enforce_eager, custom_all_reduce=not disable_custom_all_reduce)

    def graphed(self, num_tokens: int) -> bool:
        """Whether a step of `num_tokens` replays a captured graph (else it runs eagerly)."""
        return self.cuda_graphs and num_tokens <= CUDA_GRAPH_MAX_TOKENS


@dataclass(frozen=True)
class Priced:
    """One collective call: the implementation chosen, its transfer time and its fixed cost."""

    algorithm: str  # "ring", "tree", "one_shot", "two_shot", "pairwise", "p2p" or "none"
    transfer_s: float
    call_s: float  # launch (eager) or replay handshake (graphs)

    @property
    def total_s(self) -> float:
        return self.transfer_s + self.call_s


_NOTHING = Priced("none", 0.0, 0.0)
_NO_CALLS = CollectiveCalls(nccl_eager_call_s=0.0, nccl_graph_call_s=0.0,
                            custom_all_reduce_call_s=0.0, source="none (transfers only)")


@dataclass(frozen=True)
class Collectives:
    """The collectives of one GPU group over `link` at `efficiency` x its peak bandwidth, each
    call paying `calls`' fixed cost for `mode` (no fixed cost when `calls` is None)."""

    link: Link
    efficiency: float = 1.0
    calls: CollectiveCalls | None = None
    mode: CommMode = CommMode()

    def __post_init__(self) -> None:
        if not 0 < self.efficiency <= 1:
            raise ConfigError(f"link efficiency must be in (0, 1], got {self.efficiency}")

    @classmethod
    def gpu_link(cls, hardware: HardwareProfile, mode: CommMode | None = None) -> Collectives:
        """The profile's GPU-GPU link at its calibrated efficiency and per-call costs. vLLM's
        custom all-reduce exists for CUDA and ROCm only: on other vendors' devices (Gaudi) every
        collective is the vendor library's (priced as NCCL)."""
        mode = CommMode() if mode is None else mode
        if hardware.vendor not in CUSTOM_AR_VENDORS:
            mode = CommMode(cuda_graphs=mode.cuda_graphs, custom_all_reduce=False)
        return cls(hardware.gpu_link, hardware.efficiency_for("gpu_link_bandwidth"),
                   hardware.collectives, mode)

    # ---------------------------------------------------------------- per call, by implementation
    def _nccl_call_s(self, graphed: bool) -> float:
        calls = self.calls or _NO_CALLS
        return calls.nccl_graph_call_s if graphed else calls.nccl_eager_call_s

    def ring_all_reduce_s(self, num_bytes: float, n: int) -> float:
        return ring_all_reduce_s(self.link, num_bytes, n, self.efficiency)

    def tree_all_reduce_s(self, num_bytes: float, n: int) -> float:
        return tree_all_reduce_s(self.link, num_bytes, n, self.efficiency)

    def all_reduce(self, num_bytes: float, n: int, graphed: bool = True) -> Priced:
        """The all-reduce vLLM would run for this message (custom or NCCL), priced; `graphed`:
        inside a CUDA graph replay (only if `mode.cuda_graphs`)."""
        _check(num_bytes, n)
        if n == 1 or num_bytes == 0:
            return _NOTHING
        graphed = graphed and self.mode.cuda_graphs
        custom = (custom_all_reduce_algorithm(num_bytes, n, self.link.topology)
                  if self.mode.custom_all_reduce else None)
        if custom is not None:
            price = one_shot_all_reduce_s if custom == "one_shot" else two_shot_all_reduce_s
            calls = self.calls or _NO_CALLS
            # the custom kernel is one launch with no NCCL proxy; eager adds the host launch skew
            fixed = calls.custom_all_reduce_call_s + (
                0.0 if graphed else calls.nccl_eager_call_s - calls.nccl_graph_call_s)
            return Priced(custom, price(self.link, num_bytes, n, self.efficiency), max(fixed, 0.0))
        ring, tree = self.ring_all_reduce_s(num_bytes, n), self.tree_all_reduce_s(num_bytes, n)
        name, transfer = ("tree", tree) if tree < ring else ("ring", ring)
        return Priced(name, transfer, self._nccl_call_s(graphed))

    def all_reduce_s(self, num_bytes: float, n: int, graphed: bool = True) -> float:
        """Seconds of `all_reduce` (transfer and fixed cost)."""
        return self.all_reduce(num_bytes, n, graphed).total_s

    def all_gather(self, num_bytes: float, n: int, graphed: bool = True) -> Priced:
        """NCCL ring all-gather of a result of `num_bytes` in total (each GPU holds 1/n)."""
        _check(num_bytes, n)
        if n == 1 or num_bytes == 0:
            return _NOTHING
        transfer = (n - 1) * self.link.transfer_s(num_bytes / n, self.efficiency)
        return Priced("ring", transfer, self._nccl_call_s(graphed and self.mode.cuda_graphs))

    def all_gather_s(self, num_bytes: float, n: int, graphed: bool = True) -> float:
        return self.all_gather(num_bytes, n, graphed).total_s

    def reduce_scatter(self, num_bytes: float, n: int, graphed: bool = True) -> Priced:
        """NCCL ring reduce-scatter of an input of `num_bytes` (each GPU keeps 1/n of the sum)."""
        return self.all_gather(num_bytes, n, graphed)

    def reduce_scatter_s(self, num_bytes: float, n: int, graphed: bool = True) -> float:
        return self.reduce_scatter(num_bytes, n, graphed).total_s

    def all_to_all(self, num_bytes: float, n: int, graphed: bool = True) -> Priced:
        """Pairwise-exchange all-to-all: each GPU sends 1/n of its `num_bytes` buffer to every
        other GPU, one peer per step."""
        p = self.all_gather(num_bytes, n, graphed)
        return Priced("pairwise" if p.algorithm != "none" else "none", p.transfer_s, p.call_s)

    def all_to_all_s(self, num_bytes: float, n: int, graphed: bool = True) -> float:
        return self.all_to_all(num_bytes, n, graphed).total_s

    def send_recv(self, num_bytes: float) -> Priced:
        """One point-to-point transfer (a pipeline stage boundary); vLLM sends the intermediate
        tensors between stages outside the captured graphs, so always an eager NCCL call."""
        _check(num_bytes, 1)
        if num_bytes == 0:
            return _NOTHING
        return Priced("p2p", self.link.transfer_s(num_bytes, self.efficiency),
                      self._nccl_call_s(False))

    def send_recv_s(self, num_bytes: float) -> float:
        return self.send_recv(num_bytes).total_s
