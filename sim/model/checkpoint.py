"""Reading Hugging Face safetensors checkpoints without torch, through the `safetensors` library.

The safetensors format is an 8-byte little-endian header length N, then N bytes of JSON
(`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`), then the raw
little-endian tensor data, offsets relative to the end of the header.

`safetensors.safe_open(path, framework="numpy")` (the format's reference implementation, in Rust)
opens and validates every file: header bounds, UTF-8 JSON, known dtypes, offsets that tile the data
exactly (no gap, no overlap, nothing past the end), shape x dtype = bytes without overflow. It reads
every tensor NumPy has a dtype for. Two things stay ours:

* **BF16.** NumPy has no bfloat16; the library's NumPy backend raises `TypeError: data type
  'bfloat16' not understood` for such a tensor (it needs the `ml_dtypes` package to register one).
  Rather than a dependency for one dtype, a BF16 tensor is viewed in place (memory-mapped, at the
  offsets the library has validated) as uint16 and widened exactly to float32 by shifting its 16
  bits into the high half (`bf16_to_float32`).
* **Messages.** Before the library sees a file, its header is checked entry by entry so that a
  negative or overflowing shape, offsets past the end of the file, an unknown dtype or a missing
  field is reported naming the file, the tensor and the problem (the library's own messages do not
  always name the tensor); whatever the library refuses beyond that is re-raised as a
  `ConfigError` naming the file. No tensor is allocated before its bytes are known to be in the
  file, so a corrupt header can never ask for a huge allocation.

A checkpoint folder holds `model.safetensors`, or shards listed in
`model.safetensors.index.json` (`{"weight_map": {tensor name: shard file}}`).

References: the safetensors format specification and library (huggingface/safetensors: README,
`safe_open`); Hugging Face transformers sharded-checkpoint index (`model.safetensors.index.json`).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open

from sim.core.errors import ConfigError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

#: safetensors dtype tag -> NumPy dtype of the stored bits (BF16 is widened to float32 on read)
DTYPES: dict[str, np.dtype] = {
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
#: dtypes the format defines that this reader refuses, with the reason
_REFUSED = {
    "F8_E4M3": "FP8 checkpoints carry per-tensor scales (weight_scale) that this loader does not "
               "apply; load the bf16/fp16 checkpoint and use --quantization fp8 instead",
    "F8_E5M2": "FP8 checkpoints carry per-tensor scales (weight_scale) that this loader does not "
               "apply; load the bf16/fp16 checkpoint and use --quantization fp8 instead",
}
#: the library's own limit on the JSON header (safetensors `MAX_HEADER_SIZE`, 100 MB)
MAX_HEADER_BYTES = 100_000_000


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """Widen bfloat16 bit patterns (uint16) to float32, exactly."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class SafetensorsFile:
    """One `.safetensors` file: its header checked, then opened with `safetensors.safe_open`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.header, self._data_start = self._read_header()
        try:
            self._handle = safe_open(str(self.path), framework="numpy")
        except SafetensorError as exc:  # what the per-entry checks do not catch (gaps, overlaps)
            raise ConfigError(f"{self.path}: corrupt safetensors file: {exc}") from exc
        except OSError as exc:
            raise ConfigError(f"{self.path}: cannot read safetensors file: {exc}") from exc
        self._mmap: np.memmap | None = None  # BF16 tensors only

    def _read_header(self) -> tuple[dict[str, dict[str, Any]], int]:
        try:
            file_bytes = self.path.stat().st_size
            with self.path.open("rb") as f:
                size_bytes = f.read(8)
                if len(size_bytes) < 8:
                    raise ConfigError(f"{self.path}: truncated safetensors file ({len(size_bytes)} "
                                      "bytes; the format starts with an 8-byte header length)")
                (header_len,) = struct.unpack("<Q", size_bytes)
                if header_len > min(MAX_HEADER_BYTES, file_bytes - 8):
                    problem = ("truncated file" if header_len <= MAX_HEADER_BYTES
                               else "corrupt header")
                    raise ConfigError(f"{self.path}: {problem}: the header claims {header_len} "
                                      f"bytes but the file holds {file_bytes} (and the format "
                                      f"allows at most {MAX_HEADER_BYTES})")
                raw = f.read(header_len)
        except OSError as exc:
            raise ConfigError(f"{self.path}: cannot read safetensors file: {exc}") from exc
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{self.path}: corrupt safetensors header (not UTF-8 JSON): "
                              f"{exc}") from exc
        if not isinstance(header, dict):
            raise ConfigError(f"{self.path}: corrupt safetensors header (a JSON "
                              f"{type(header).__name__}, not an object of tensors)")
        header.pop("__metadata__", None)
        data_start = 8 + header_len
        for name, info in header.items():
            self._check_entry(name, info, file_bytes - data_start)
        return header, data_start

    def _check_entry(self, name: str, info: object, data_bytes: int) -> None:
        """Refuse one header entry, naming the tensor, unless it describes bytes in the file."""
        where = f"{self.path}: tensor {name!r}"
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise ConfigError(f"{where}: corrupt header entry {str(info)[:200]} (needs 'dtype', "
                              "'shape' and 'data_offsets')")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype in _REFUSED:
            raise ConfigError(f"{where}: dtype {dtype} is not supported: {_REFUSED[dtype]}")
        if dtype not in DTYPES:
            raise ConfigError(f"{where}: unknown or unsupported dtype {str(dtype)[:40]!r}; "
                              f"supported: {', '.join(DTYPES)}")
        if not isinstance(shape, list) or not all(_is_int(n) and n >= 0 for n in shape):
            raise ConfigError(f"{where}: corrupt shape {str(shape)[:200]} (needs a list of "
                              "non-negative integers)")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_int, offsets))
                or not 0 <= offsets[0] <= offsets[1]):
            raise ConfigError(f"{where}: corrupt data_offsets {str(offsets)[:200]} (needs "
                              "[begin, end] with 0 <= begin <= end)")
        begin, end = offsets
        if end > data_bytes:
            raise ConfigError(f"{where}: truncated file (its data ends at byte {end} of the data "
                              f"section, which holds {data_bytes} bytes)")
        num_bytes = DTYPES[dtype].itemsize
        for n in shape:  # Python ints: no overflow, and stop as soon as it exceeds the file
            num_bytes *= n
            if num_bytes > data_bytes:
                raise ConfigError(f"{where}: shape {shape} of {dtype} needs more bytes than the "
                                  f"file's {data_bytes} bytes of data (a corrupt header)")
        if end - begin != num_bytes:
            raise ConfigError(f"{where}: corrupt header (offsets {begin}..{end} hold "
                              f"{end - begin} bytes; shape {shape} of {dtype} needs {num_bytes})")

    def keys(self) -> list[str]:
        return list(self.header)

    def get(self, name: str) -> np.ndarray:
        """The tensor as stored (F16 stays float16, BF16 becomes float32); read-only."""
        info = self.header.get(name)
        if info is None:
            raise ConfigError(f"{self.path}: no tensor {name!r} in this file")
        if info["dtype"] != "BF16":
            try:
                return self._handle.get_tensor(name)  # stored shape
            except (SafetensorError, OSError) as exc:
                raise ConfigError(f"{self.path}: tensor {name!r}: cannot read: {exc}") from exc
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        begin, end = info["data_offsets"]
        raw = self._mmap[self._data_start + begin: self._data_start + end]  # [n_bytes]
        return bf16_to_float32(raw.view(DTYPES["BF16"]).reshape(info["shape"]))  # stored shape


class CheckpointReader:
    """The tensors of a Hugging Face checkpoint folder, by name, across shards."""

    config_origin = "config.json"

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
