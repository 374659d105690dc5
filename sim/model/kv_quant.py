"""Quantized KV cache (`kv_cache_dtype`): K/V stored as 8-bit codes with per-head scales.

`kv_cache_dtype="fp8"` (= `fp8_e4m3`), `"fp8_e5m2"` or `"int8"` stores every key and value
vector (one token, one KV head: `d_head` numbers) as 8-bit codes plus one float32 scale,
`scale = amax / code_max` over that vector (dynamic, per token and head), and decodes
`value = code * scale` when attention reads it. The fp8 formats are emulated bit-exactly
(`sim.model.quantization.formats`: e4m3fn max 448, e5m2 max 57344, subnormals, round to nearest
even); int8 is symmetric (codes -128..127, round half to even). The paged store keeps the codes
and scales themselves (1 byte per element: the capacity the memory plan counts); the contiguous
store keeps the decoded values, which are the same numbers, so both layouts give identical tokens.

The scale costs 4 bytes per token, head and K/V (`4 / d_head` bytes per element, 3 % at
`d_head = 128`), which the memory plan does not count. vLLM's own fp8 KV cache uses one scale per
tensor (calibrated `k_scale` / `v_scale`, 1.0 by default) instead: cheaper in memory, less
accurate on outliers.

References: Micikevicius et al. 2022 (FP8 formats); vLLM `kv_cache_dtype` ("fp8", "fp8_e4m3",
"fp8_e5m2"; docs "Quantized KV Cache"); LMDeploy's int8 KV cache (per-head, per-token scales);
Hooper et al. 2024 (KVQuant) and Liu et al. 2024 (KIVI) on the quality cost of quantized KV.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sim.core.errors import ConfigError
from sim.model.quantization.formats import FP8_FORMATS, fp8_decode, fp8_encode

#: the 8-bit formats a `KVCodec` stores
CODECS = ("fp8_e4m3", "fp8_e5m2", "int8")
#: `kv_cache_dtype=` name -> its codec: every codec by its own name, plus vLLM's alias `fp8`
_CANONICAL = {"fp8": "fp8_e4m3", **{name: name for name in CODECS}}
#: the one list of `kv_cache_dtype` choices (`EngineArgs` and the CLI take theirs from it):
#: `auto` (the model's dtype, unquantized) and every 8-bit name
KV_CACHE_DTYPES = ("auto", *_CANONICAL)


@dataclass(frozen=True)
class KVCodec:
    """Encodes K/V vectors `[..., d_head]` to 8-bit codes `[..., d_head]` and float32 scales
    `[...]`, and back."""

    name: str  # fp8_e4m3, fp8_e5m2 or int8

    def __post_init__(self) -> None:
        if self.name not in CODECS:
            raise ConfigError(f"KVCodec: unknown format {self.name!r}; use one of "
                              f"{', '.join(CODECS)}")

    @property
    def code_dtype(self) -> np.dtype:
        return np.dtype(np.int8 if self.name == "int8" else np.uint8)

    @property
    def code_max(self) -> float:
        """The largest code magnitude a scale maps `amax` onto."""
        return 127.0 if self.name == "int8" else FP8_FORMATS[self.name].max

    def encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Codes `[..., d_head]` and scales `[...]` of `x` `[..., d_head]`."""
        x = np.asarray(x, dtype=np.float64)  # [..., d_head]
        amax = np.max(np.abs(x), axis=-1)  # [...]
        scale = np.where(amax > 0, amax / self.code_max, 1.0).astype(np.float32)  # [...]
        y = x / scale.astype(np.float64)[..., None]  # [..., d_head]
        if self.name == "int8":
            return np.clip(np.rint(y), -128, 127).astype(np.int8), scale  # [..., d_head]
        return fp8_encode(y, self.name), scale  # [..., d_head] uint8

    def decode(self, codes: np.ndarray, scales: np.ndarray,
               dtype: np.dtype | type = np.float64) -> np.ndarray:
        """Values `[..., d_head]` of `codes` `[..., d_head]` with `scales` `[...]`."""
        values = (codes.astype(np.float64) if self.name == "int8"
                  else fp8_decode(codes, self.name))  # [..., d_head]
        return (values * scales.astype(np.float64)[..., None]).astype(dtype)  # [..., d_head]

    def round_trip(self, x: np.ndarray, dtype: np.dtype | type) -> np.ndarray:
        """`x` as the cache returns it after storing it (quantize, then dequantize)."""
        return self.decode(*self.encode(x), dtype=dtype)  # x.shape


def kv_codec(kv_cache_dtype: str | None) -> KVCodec | None:
    """The codec of an engine's `kv_cache_dtype` (None for `auto`: unquantized)."""
    if kv_cache_dtype in (None, "auto"):
        return None
    if kv_cache_dtype not in _CANONICAL:
        raise ConfigError(f"kv_cache_dtype={kv_cache_dtype!r} is not one of "
                          f"{', '.join(KV_CACHE_DTYPES)}")
    return KVCodec(_CANONICAL[kv_cache_dtype])
