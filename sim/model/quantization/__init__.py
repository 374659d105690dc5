"""Quantization of the functional model: formats, the quantized weights and activations, GPTQ
and SmoothQuant, and the measured quality cost. The method table itself (`QuantSpec`) is
`sim.core.quantization`; its timing is `sim.timing.quantization`.

References: see each module.
"""
