"""Reading Hugging Face safetensors checkpoints without torch.

The safetensors format is an 8-byte little-endian header length N, then N bytes of JSON
(`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`), then the raw
little-endian tensor data, offsets relative to the end of the header. This reader memory-maps
the file and views tensors in place, so a checkpoint is read lazily. `BF16` (which NumPy lacks) is
widened exactly to float32 by shifting its 16 bits into the high half of a float32.

A checkpoint folder holds `model.safetensors`, or shards listed in
`model.safetensors.index.json` (`{"weight_map": {tensor name: shard file}}`). Every malformed
input raises `ConfigError` naming the file and, where it applies, the tensor.

References: the safetensors format specification (huggingface/safetensors README); Hugging Face
transformers sharded-checkpoint index (`model.safetensors.index.json`).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np

from sim.core.errors import ConfigError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# safetensors dtype tag -> NumPy dtype of the stored bits (BF16 is widened separately)
_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_MAX_HEADER_BYTES = 100 * 1024 * 1024


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """Widen bfloat16 bit patterns (uint16) to float32, exactly."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


class SafetensorsFile:
    """One `.safetensors` file: its header parsed, its data memory-mapped on first use."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.header, self._data_start = self._read_header()
        self._mmap: np.memmap | None = None

    def _read_header(self) -> tuple[dict[str, dict[str, Any]], int]:
        try:
            with self.path.open("rb") as f:
                size_bytes = f.read(8)
                if len(size_bytes) < 8:
                    raise ConfigError(f"{self.path}: truncated safetensors file (no 8-byte "
                                      "header length)")
                (header_len,) = struct.unpack("<Q", size_bytes)
                if header_len > _MAX_HEADER_BYTES:
                    raise ConfigError(f"{self.path}: corrupt safetensors header (claims "
                                      f"{header_len} bytes of header)")
                raw = f.read(header_len)
        except OSError as exc:
            raise ConfigError(f"{self.path}: cannot read safetensors file: {exc}") from exc
        if len(raw) < header_len:
            raise ConfigError(f"{self.path}: truncated safetensors file (header cut short)")
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{self.path}: corrupt safetensors header (not JSON): {exc}") from exc
        if not isinstance(header, dict):
            raise ConfigError(f"{self.path}: corrupt safetensors header (not a JSON object)")
        header.pop("__metadata__", None)
        data_start = 8 + header_len
        data_len = self.path.stat().st_size - data_start
        for name, info in header.items():
            self._check_entry(name, info, data_len)
        return header, data_start

    def _check_entry(self, name: str, info: Any, data_len: int) -> None:
        where = f"{self.path}: tensor {name!r}"
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            num = int(np.prod(shape, dtype=np.int64))
        except (TypeError, KeyError, ValueError) as exc:
            raise ConfigError(f"{where}: corrupt header entry {info!r}") from exc
        if dtype not in _DTYPES:
            raise ConfigError(f"{where}: unsupported dtype {dtype!r}; supported: "
                              f"{', '.join(_DTYPES)}")
        if end - begin != num * _DTYPES[dtype].itemsize or begin < 0:
            raise ConfigError(f"{where}: corrupt header (offsets {begin}..{end} do not hold "
                              f"shape {shape} of {dtype})")
        if end > data_len:
            raise ConfigError(f"{where}: truncated file (data ends at byte {end} but the file "
                              f"holds {data_len} bytes of data)")

    def keys(self) -> list[str]:
        return list(self.header)

    def get(self, name: str) -> np.ndarray:
        """The tensor as stored (F16 stays float16, BF16 becomes float32); read-only."""
        info = self.header.get(name)
        if info is None:
            raise ConfigError(f"{self.path}: no tensor {name!r} in this file")
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        begin, end = info["data_offsets"]
        raw = self._mmap[self._data_start + begin: self._data_start + end]  # [n_bytes]
        arr = raw.view(_DTYPES[info["dtype"]]).reshape(info["shape"])  # stored shape
        if info["dtype"] == "BF16":
            return bf16_to_float32(arr)
        return arr


class CheckpointReader:
    """The tensors of a Hugging Face checkpoint folder, by name, across shards."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, str] = {}  # tensor name -> file name
        index = self.folder / INDEX_FILE
        if index.is_file():
            for name, filename in self._read_index(index).items():
                self._where[name] = filename
            for filename in sorted(set(self._where.values())):
                shard = self._open(filename, listed_in=index)
                missing = [n for n, f in self._where.items() if f == filename
                           and n not in shard.header]
                if missing:
                    raise ConfigError(f"{shard.path}: tensor {missing[0]!r} is listed in "
                                      f"{INDEX_FILE} but missing from this shard")
        elif (self.folder / SINGLE_FILE).is_file():
            for name in self._open(SINGLE_FILE).header:
                self._where[name] = SINGLE_FILE
        else:
            raise ConfigError(f"{self.folder}: no {SINGLE_FILE} or {INDEX_FILE}; a checkpoint "
                              "folder needs safetensors weights (no download is attempted)")

    @staticmethod
    def has_weights(folder: str | Path) -> bool:
        folder = Path(folder)
        return (folder / SINGLE_FILE).is_file() or (folder / INDEX_FILE).is_file()

    def _read_index(self, index: Path) -> dict[str, str]:
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
            weight_map = data["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ConfigError(f"{index}: not a valid safetensors index (needs a JSON object "
                              f"with a 'weight_map'): {exc}") from exc
        if not isinstance(weight_map, dict) or not all(
                isinstance(v, str) for v in weight_map.values()):
            raise ConfigError(f"{index}: 'weight_map' must map tensor names to file names")
        return dict(weight_map)

    def _open(self, filename: str, listed_in: Path | None = None) -> SafetensorsFile:
        if filename not in self._files:
            path = self.folder / filename
            if not path.is_file():
                source = f" (listed in {listed_in.name})" if listed_in else ""
                raise ConfigError(f"{path}: checkpoint shard not found{source}")
            self._files[filename] = SafetensorsFile(path)
        return self._files[filename]

    def names(self) -> list[str]:
        return list(self._where)

    def has(self, name: str) -> bool:
        return name in self._where

    def where(self, name: str | None = None) -> str:
        """The file holding `name` (or the folder), for error messages."""
        if name is not None and name in self._where:
            return str(self.folder / self._where[name])
        return str(self.folder)

    def get(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise ConfigError(f"{self.folder}: checkpoint has no tensor {name!r}")
        return self._open(self._where[name]).get(name)
