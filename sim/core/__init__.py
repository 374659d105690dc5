"""The core layer: errors, dtypes, requests, model configs, the step types, the protocols at every
joint, KV usage snapshots and the event clock. It imports nothing else of the project."""
