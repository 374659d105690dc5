"""Data types by name and their size in bytes.

Names follow PyTorch / vLLM spelling (`float16`, `bfloat16`, ...) with the usual short aliases
(`fp16`, `bf16`, `half`, ...). `fp8` is e4m3 by default, as in vLLM's `kv_cache_dtype="fp8"`.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from sim.core.errors import suggest

#: K/V, activations and logits at the joints (the functional model runs in float32 or float64;
#: 16-bit where a store keeps half-precision contents)
FloatArray = npt.NDArray[np.float16 | np.float32 | np.float64]
IntArray = npt.NDArray[np.int64 | np.int32]

BYTES_PER_ELEMENT: dict[str, float] = {
    "float64": 8.0,
    "float32": 4.0,
    "float16": 2.0,
    "bfloat16": 2.0,
    "fp8_e4m3": 1.0,
    "fp8_e5m2": 1.0,
    "int8": 1.0,
    "int4": 0.5,
}

ALIASES: dict[str, str] = {
    "fp64": "float64",
    "double": "float64",
    "fp32": "float32",
    "float": "float32",
    "fp16": "float16",
    "half": "float16",
    "bf16": "bfloat16",
    "fp8": "fp8_e4m3",
    "float8_e4m3fn": "fp8_e4m3",
    "float8_e5m2": "fp8_e5m2",
}


def canonical_dtype(name: str) -> str:
    """The canonical spelling of a dtype name; raises `UnknownNameError` with suggestions."""
    key = str(name).lower().removeprefix("torch.")
    key = ALIASES.get(key, key)
    if key not in BYTES_PER_ELEMENT:
        raise suggest(str(name), sorted([*BYTES_PER_ELEMENT, *ALIASES]), "dtype")
    return key


def dtype_bytes(name: str) -> float:
    """Bytes per element of dtype `name` (0.5 for int4)."""
    return BYTES_PER_ELEMENT[canonical_dtype(name)]
