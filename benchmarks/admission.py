"""SLO-aware admission: the lone-prefill lower bound (before) vs the scheduler look-ahead (after).

The conv trace at 8 req/s (the issue's case) and above, a 1 s TTFT SLO, a 7B model on the
default GPU in timing mode. Per row: admitted fraction, p50/p99 TTFT of the admitted requests,
and SLO attainment (share of admitted requests whose TTFT meets the SLO). Writes
results/admission.json.

References: SLO-aware admission as in "Andes" (Liu et al. 2024) and Llumnix (Sun et al. 2024);
the look-ahead replays vLLM's continuous scheduler (`batching.continuous`) on the cost model.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from common import print_table, trace_path, write_json

from sim.core.request import Status
from sim.engine.args import EngineArgs
from sim.engine.engine import Engine
from sim.workload.specs import load_azure_trace, workload_from_trace

NUM_REQUESTS = 400
SLO_S = 1.0
RATES = (8.0, 12.0)


def run(rate: float, predictor: str) -> dict[str, Any]:
    trace = load_azure_trace(trace_path("conv"), limit=NUM_REQUESTS)
    specs = list(workload_from_trace(trace, num_requests=NUM_REQUESTS, request_rate=rate,
                                     seed=0))
    engine = Engine(EngineArgs(mode="timing", admission_ttft_slo_s=SLO_S))
    if predictor == "lower_bound":  # before: the lone-prefill sum (no look-ahead)
        control = engine.admission_control()
        control.step_s = None
        engine.admission_control = lambda: control  # type: ignore[method-assign]
    result = engine.run(specs)
    done = [r for r in result.requests if r.status is Status.FINISHED]
    ttft_s = np.array([r.first_token_s - r.arrival_s for r in done])  # [num_admitted]
    return {"rate": rate, "predictor": predictor,
            "admitted": round(len(done) / len(specs), 3),
            "p50_ttft_s": round(float(np.percentile(ttft_s, 50)), 3) if done else None,
            "p99_ttft_s": round(float(np.percentile(ttft_s, 99)), 3) if done else None,
            "slo_attainment": round(float((ttft_s <= SLO_S).mean()), 3) if done else None}


def main() -> None:
    rows = [run(rate, p) for rate in RATES for p in ("lower_bound", "look_ahead")]
    print_table(f"SLO-aware admission, conv trace, TTFT SLO {SLO_S:.1f} s", rows)
    write_json("admission", {"slo_s": SLO_S, "num_requests": NUM_REQUESTS, "rows": rows})


if __name__ == "__main__":
    main()
