"""What a run measures: per-request latencies, streaming quantiles, summaries, step series, plots."""
