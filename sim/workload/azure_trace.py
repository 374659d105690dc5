"""Loader for the Azure LLM inference traces (2023): arrival times and token counts per request.

A trace CSV has one request per row with columns `TIMESTAMP` (e.g. `2023-11-16 18:15:46.6805900`,
seven fractional digits = 100 ns resolution), `ContextTokens` (prompt length) and
`GeneratedTokens` (output length). Arrivals are returned in float64 seconds relative to the first
row. Parsing is vectorised (NumPy's ISO-8601 datetime64[ns] parser and string-to-int casts); only
when a column fails to parse is it rescanned row by row to name the bad row. The file is read
line by line, so a `limit` of rows reads only those rows.

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


#: token counts above this are past any model's context (the longest are ~10M tokens): a
#: trace with 1e23 prompt tokens is corrupt, refused naming the row and column
MAX_TRACE_TOKENS = 2**31 - 1
#: datetime64[ns] holds 1677-09-21 .. 2262-04-11; a timestamp outside wraps around silently, so
#: every timestamp is first parsed in seconds and checked to lie in these years
MIN_YEAR, MAX_YEAR = 1678, 2261
#: the longest span handled: offsets from the first row stay exact int64 nanoseconds up to
#: 292 years; a trace spanning more is refused (the Azure traces span an hour)
MAX_SPAN_S = 200 * 365 * 86400


def _bad_row(path: Path, row: int, msg: str) -> ConfigError:
    # row is 0-based among data rows; line numbers count the header as line 1.
    return ConfigError(f"{path}: data row {row + 1} (line {row + 2}): {msg}")


def _parse_counts(path: Path, column: list[str], name: str) -> np.ndarray:
    try:
        counts = np.array(column).astype(np.int64)  # [num]
    except (ValueError, OverflowError):
        counts = None
    if counts is None:
        for row, text in enumerate(column):
            try:
                value = int(text)
            except ValueError:
                raise _bad_row(
                    path, row, f"{name} must be an integer token count, got {text!r}"
                ) from None
            if not 1 <= value <= MAX_TRACE_TOKENS:
                raise _bad_row(path, row, f"{name} = {text.strip()} is not a token count in "
                               f"1..{MAX_TRACE_TOKENS:,} (past any model's context)")
        raise ConfigError(f"{path}: column {name} could not be parsed as integers")
    if counts.size and counts.min() < 1:
        row = int(np.argmax(counts < 1))
        raise _bad_row(path, row, f"{name} must be >= 1 token, got {counts[row]}")
    if counts.size and counts.max() > MAX_TRACE_TOKENS:
        row = int(np.argmax(counts > MAX_TRACE_TOKENS))
        raise _bad_row(path, row, f"{name} = {counts[row]:,} is more than {MAX_TRACE_TOKENS:,} "
                       "tokens, past any model's context; the trace is corrupt")
    return counts


def _bad_stamp(path: Path, row: int, text: str) -> ConfigError:
    return _bad_row(path, row, f"bad {TIMESTAMP_COLUMN} {text!r}; expected e.g. "
                    "'2023-11-16 18:15:46.6805900'")


def _parse_timestamps(path: Path, column: list[str]) -> np.ndarray:
    try:
        seconds = np.array(column, dtype="datetime64[s]")  # [num] whole seconds: wide range
    except ValueError:
        seconds = None
    if seconds is None:
        for row, text in enumerate(column):
            try:
                np.datetime64(text, "s")
            except ValueError:
                raise _bad_stamp(path, row, text) from None
        raise ConfigError(f"{path}: column {TIMESTAMP_COLUMN} could not be parsed")
    if np.any(np.isnat(seconds)):
        row = int(np.argmax(np.isnat(seconds)))
        raise _bad_row(path, row, f"missing {TIMESTAMP_COLUMN}")
    years = seconds.astype("datetime64[Y]").astype(np.int64) + 1970  # [num]
    outside = (years < MIN_YEAR) | (years > MAX_YEAR)  # [num]
    if np.any(outside):
        row = int(np.argmax(outside))
        raise _bad_row(path, row, f"{TIMESTAMP_COLUMN} {column[row]!r} is outside the years "
                       f"{MIN_YEAR}..{MAX_YEAR} a nanosecond clock holds; fix the date")
    span_s = np.abs(seconds.astype(np.int64) - seconds[0].astype(np.int64))  # [num]
    if np.any(span_s > MAX_SPAN_S):
        row = int(np.argmax(span_s > MAX_SPAN_S))
        raise _bad_row(path, row, f"{TIMESTAMP_COLUMN} {column[row]!r} is more than 200 years "
                       f"from the first row's {column[0]!r}; the trace's dates are corrupt")
    try:
        stamps = np.array(column, dtype="datetime64[ns]")  # [num] exact to 1 ns
    except ValueError:  # e.g. more than 9 fractional digits
        for row, text in enumerate(column):
            try:
                np.datetime64(text, "ns")
            except ValueError:
                raise _bad_stamp(path, row, text) from None
        raise ConfigError(f"{path}: column {TIMESTAMP_COLUMN} could not be parsed") from None
    offsets_ns = (stamps - stamps[0]).astype(np.int64)  # [num] exact integer nanoseconds
    steps_ns = np.diff(offsets_ns)  # [num - 1]
    if np.any(steps_ns < 0):
        row = int(np.argmax(steps_ns < 0)) + 1
        raise _bad_row(
            path, row, f"{TIMESTAMP_COLUMN} {column[row]!r} is earlier than the previous row's "
            f"{column[row - 1]!r}; the trace must be sorted by arrival time"
        )
    return offsets_ns.astype(np.float64) * 1e-9  # [num] seconds


def _read_rows(path: Path, limit: int | None) -> tuple[str, list[str]]:
    """The header line and the first `limit` data lines (all without a limit), read line by
    line so that `limit` rows of a large file cost `limit` rows. A UTF-8 byte-order mark (what
    Excel writes) is dropped; trailing blank lines are tolerated, blank lines between rows are
    not (they are refused as rows with the wrong number of fields)."""
    try:
        with path.open(encoding="utf-8-sig") as f:
            header = f.readline()
            if not header.strip("\r\n"):
                raise ConfigError(
                    f"{path}: empty file; expected a header row {TIMESTAMP_COLUMN},...")
            body: list[str] = []
            num_blank = 0  # blank lines after the last row read
            for line in f:
                line = line.rstrip("\r\n")
                if not line.strip():
                    num_blank += 1
                    continue
                if num_blank:  # a row after blank lines: the first blank one is the bad row
                    body.append("")
                    break
                if limit is not None and len(body) >= limit:
                    break
                body.append(line)
    except FileNotFoundError:
        raise ConfigError(
            f"trace file {path} not found; the Azure traces live in ../shared/traces/ "
            "relative to the project root"
        ) from None
    except IsADirectoryError:
        raise ConfigError(f"trace file {path} is a directory; give the CSV file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read trace file {path}: {exc}") from None
    return header.rstrip("\r\n"), body


def load_azure_trace(path: str | Path, limit: int | None = None) -> AzureTrace:
    """Read an Azure LLM inference trace CSV (optionally only its first `limit` rows, read as a
    stream: the rest of the file is not read).

    Raises `ConfigError` naming the file and row for a missing or repeated column, a wrong
    number of fields, a non-integer, < 1 or larger-than-any-model token count, or a bad,
    out-of-range or out-of-order timestamp.
    """
    path = Path(path)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"limit must be None or an integer >= 1, got {limit!r}")
    header_line, body = _read_rows(path, limit)
    header = [name.strip() for name in header_line.split(",")]
    wanted = (TIMESTAMP_COLUMN, PROMPT_COLUMN, OUTPUT_COLUMN)
    missing = [name for name in wanted if name not in header]
    if missing:
        raise ConfigError(
            f"{path}: missing column(s) {', '.join(missing)} in header {header_line[:200]!r}; "
            f"expected {', '.join(wanted)}"
        )
    repeated = [name for name in wanted if header.count(name) > 1]
    if repeated:
        raise ConfigError(f"{path}: column(s) {', '.join(repeated)} appear more than once in "
                          f"the header {header_line[:200]!r}; keep one of each")
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
