"""The timing side: hardware profiles, the roofline cost model, the memory plan, KV-memory reports
and calibration against measured kernel times. It prices shapes, never token values."""
