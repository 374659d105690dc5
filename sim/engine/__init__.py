"""The engine: arguments, how its parts are built, the event loop and its lanes, run records, the
vLLM-style `LLM` front door and the parallel-plan search."""
