"""Quantization of weights and activations: formats, methods, the quantized functional model,
and its timing (see `methods` for the method table).

References: see each module.
"""

from sim.quantization.methods import DEFAULT_GROUP_SIZE, METHODS, QuantSpec, quant_spec

__all__ = ["DEFAULT_GROUP_SIZE", "METHODS", "QuantSpec", "quant_spec"]
