"""parallel: tensor, pipeline, expert and data parallelism, functional and timed.

- `parallel.plan`: `ParallelPlan(tp, pp, ep, dp)`, divisibility and per-GPU memory checks;
- `parallel.collectives`: ring/tree all-reduce, all-gather, all-to-all, send/recv (alpha-beta);
- `parallel.cost`: `ParallelCostModel` (per-GPU compute + communication, pipeline stages);
- `parallel.tensor`, `parallel.pipeline`, `parallel.expert`, `parallel.sharded_kv`: the sharded
  NumPy model and its per-GPU KV stores (run by the one functional executor);
- `parallel.data`: DP routers (`ROUTERS`); `sim.engine.lanes`: lanes and the stage clock for the engine loop;
- `sim.engine.planner`: `infersim plans`.
"""

from parallel.data import ROUTERS
from parallel.plan import ParallelPlan

__all__ = ["ROUTERS", "ParallelPlan"]
