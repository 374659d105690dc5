"""Pipeline parallelism, functionally: contiguous layer stages and the activations sent between.

A model of `n_layer` layers is cut into `pp` stages of contiguous layers (`parallel.plan.
stage_layers`, vLLM's partition); the GPUs of stage s hold only those layers' weights and KV
cache, the first stage also the embedding and the last the final norm and LM head. At every
stage boundary the micro-batch's hidden state is sent to the next stage: here a real copy into
the next stage's buffer, counted by `StageLink` (transfers and bytes), which the timing side
prices as a send/recv over the GPU link (`ParallelCostModel.send_recv_s`). Several micro-batches
in flight, and the bubble they leave, are the engine loop's business (`sim.engine.lanes.StageClock`).

References: Huang et al. 2019 (GPipe); Narayanan et al. 2019/2021 (PipeDream, PTD-P); vLLM
`vllm/distributed/parallel_state.py` (pipeline send/recv of IntermediateTensors).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from parallel.plan import stage_layers

__all__ = ["StageLink", "stage_layers", "stage_of_layer"]


def stage_of_layer(n_layer: int, pp: int) -> list[int]:
    """`[n_layer]` -> the stage each layer runs on."""
    owner = [0] * n_layer
    for s, layers in enumerate(stage_layers(n_layer, pp)):
        for i in layers:
            owner[i] = s
    return owner


@dataclass
class StageLink:
    """Counts what crosses the stage boundaries (point-to-point sends)."""

    num_sends: int = 0
    num_bytes: int = 0

    def send(self, x: np.ndarray) -> np.ndarray:
        """Hand `x` to the next stage: a copy in the receiver's memory."""
        self.num_sends += 1
        self.num_bytes += x.nbytes
        return x.copy()  # same shape as x
