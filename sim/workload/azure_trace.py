"""Loader for the Azure LLM inference traces (2023): arrival times and token counts per request.

A trace CSV has one request per row with columns `TIMESTAMP` (e.g. `2023-11-16 18:15:46.6805900`,
seven fractional digits = 100 ns resolution), `ContextTokens` (prompt length) and
`GeneratedTokens` (output length). Arrivals are returned in float64 seconds relative to the first
row. Parsing is vectorised (NumPy's ISO-8601 datetime64[ns] parser and string-to-int casts); only
when a column fails to parse is it rescanned row by row to name the bad row.

References:
    Patel et al., "Splitwise: Efficient generative LLM inference using phase splitting",
    ISCA 2024; the Azure Public Dataset AzureLLMInferenceDataset2023 (CC-BY 4.0).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sim.core.errors import ConfigError

TIMESTAMP_COLUMN = "TIMESTAMP"
PROMPT_COLUMN = "ContextTokens"
OUTPUT_COLUMN = "GeneratedTokens"


@dataclass(frozen=True, eq=False)
class AzureTrace:
    """One trace: arrays of equal length, one entry per request, in file order."""

    arrival_s: np.ndarray = field(repr=False)  # [num] float64 seconds from the first row
    prompt_len: np.ndarray = field(repr=False)  # [num] int64 tokens
    output_len: np.ndarray = field(repr=False)  # [num] int64 tokens
    path: str = ""

    def __len__(self) -> int:
        return int(self.arrival_s.size)

    @property
    def span_s(self) -> float:
        """Seconds from the first to the last arrival."""
        return float(self.arrival_s[-1] - self.arrival_s[0]) if len(self) else 0.0


def _bad_row(path: Path, row: int, msg: str) -> ConfigError:
    # row is 0-based among data rows; line numbers count the header as line 1.
    return ConfigError(f"{path}: data row {row + 1} (line {row + 2}): {msg}")


def _parse_counts(path: Path, column: list[str], name: str) -> np.ndarray:
    try:
        counts = np.array(column).astype(np.int64)  # [num]
    except ValueError:
        counts = None
    if counts is None:
        for row, text in enumerate(column):
            try:
                int(text)
            except ValueError:
                raise _bad_row(
                    path, row, f"{name} must be an integer token count, got {text!r}"
                ) from None
        raise ConfigError(f"{path}: column {name} could not be parsed as integers")
    if counts.size and counts.min() < 1:
        row = int(np.argmax(counts < 1))
        raise _bad_row(path, row, f"{name} must be >= 1 token, got {counts[row]}")
    return counts


def _parse_timestamps(path: Path, column: list[str]) -> np.ndarray:
    try:
        stamps = np.array(column, dtype="datetime64[ns]")  # [num]
    except ValueError:
        stamps = None
    if stamps is None:
        for row, text in enumerate(column):
            try:
                np.datetime64(text, "ns")
            except ValueError:
                raise _bad_row(
                    path, row, f"bad {TIMESTAMP_COLUMN} {text!r}; expected e.g. "
                    "'2023-11-16 18:15:46.6805900'"
                ) from None
        raise ConfigError(f"{path}: column {TIMESTAMP_COLUMN} could not be parsed")
    if np.any(np.isnat(stamps)):
        row = int(np.argmax(np.isnat(stamps)))
        raise _bad_row(path, row, f"missing {TIMESTAMP_COLUMN}")
    offsets_ns = (stamps - stamps[0]).astype(np.int64)  # [num] exact integer nanoseconds
    steps_ns = np.diff(offsets_ns)  # [num - 1]
    if np.any(steps_ns < 0):
        row = int(np.argmax(steps_ns < 0)) + 1
        raise _bad_row(
            path, row, f"{TIMESTAMP_COLUMN} {column[row]!r} is earlier than the previous row's "
            f"{column[row - 1]!r}; the trace must be sorted by arrival time"
        )
    return offsets_ns.astype(np.float64) * 1e-9  # [num] seconds


def load_azure_trace(path: str | Path, limit: int | None = None) -> AzureTrace:
    """Read an Azure LLM inference trace CSV (optionally only its first `limit` rows).

    Raises `ConfigError` naming the file and row for a missing column, a wrong number of
    fields, a non-integer or < 1 token count, or a bad or out-of-order timestamp.
    """
    path = Path(path)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"limit must be None or an integer >= 1, got {limit!r}")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"trace file {path} not found; the Azure traces live in ../shared/traces/ "
            "relative to the project root"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read trace file {path}: {exc}") from None
    lines = text.splitlines()
    if not lines:
        raise ConfigError(f"{path}: empty file; expected a header row {TIMESTAMP_COLUMN},...")
    header = [name.strip() for name in lines[0].split(",")]
    wanted = (TIMESTAMP_COLUMN, PROMPT_COLUMN, OUTPUT_COLUMN)
    missing = [name for name in wanted if name not in header]
    if missing:
        raise ConfigError(
            f"{path}: missing column(s) {', '.join(missing)} in header {lines[0]!r}; "
            f"expected {', '.join(wanted)}"
        )
    while lines and not lines[-1].strip():  # tolerate trailing blank lines only
        lines.pop()
    body = lines[1:]
    if limit is not None:
        body = body[:limit]
    if not body:
        raise ConfigError(f"{path}: the trace has a header but no request rows")
    rows = [line.split(",") for line in body]
    num_fields = len(header)
    for row, fields in enumerate(rows):
        if len(fields) != num_fields:
            raise _bad_row(path, row, f"expected {num_fields} fields, found {len(fields)}")
    columns = list(zip(*rows, strict=True))
    arrival_s = _parse_timestamps(path, [s.strip() for s in columns[header.index(wanted[0])]])
    prompt_len = _parse_counts(path, list(columns[header.index(wanted[1])]), wanted[1])
    output_len = _parse_counts(path, list(columns[header.index(wanted[2])]), wanted[2])
    return AzureTrace(arrival_s, prompt_len, output_len, path=str(path))
