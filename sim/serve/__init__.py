"""`infersim serve`: an OpenAI-compatible HTTP server over a simulated engine.

`sim.serve.app` (the FastAPI routes), `sim.serve.driver` (the engine run that requests join
while it runs, paced by `--time-scale`), `sim.serve.protocol` (OpenAI's request and response
shapes) and `sim.serve.metrics` (`/metrics` under vLLM's names). A layer above `sim.engine`,
below `sim.cli`; it needs the `infersim[serve]` extra (FastAPI, uvicorn).
"""
