"""Workloads: request specs, arrival processes, length distributions, the Azure traces, shared-prefix
workloads."""
