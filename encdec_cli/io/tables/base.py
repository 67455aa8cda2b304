"""What every table module shares: the row type, the error type, the reserved column names and
the conversions of a value to JSON, text or Arrow. The lowest module of ``encdec_cli.io.tables``:
it imports none of its siblings, so they can all import it without a loop."""

from __future__ import annotations

import datetime as dt
import decimal
import json
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

ERROR_COLUMN = "error"  # output column: null when the row is fine, else the message
ROW_ID = "__encdec_row_id"  # row id column inside part files; never in the output
CSV_BLOCK_BYTES = 1 << 20  # pyarrow CSV reader block (one batch per block): input, and a finished CSV output


class TableError(ValueError):
    """A table cannot be read or written; the message says what to do."""


@dataclass(slots=True)
class Row:
    """One input row."""

    row_id: int  # 0-based position among the input's data rows
    text: str | None  # the text column, None when `error` is set
    record: dict[str, Any] | None  # all input columns; None when the row could not be parsed
    error: str | None  # why the row cannot be processed, None when it can


def json_default(value: Any) -> Any:
    """``json.dumps``'s fallback for the values of Arrow columns that JSON has no type for: dates and
    times as ISO text, durations in seconds, decimals as text, bytes as UTF-8 (bad bytes escaped)."""
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", "backslashreplace")
    return str(value)


def to_text(value: Any) -> str | None:
    """A value as text for a column whose parts disagree on its type."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", "backslashreplace")
    return json.dumps(value, ensure_ascii=False, default=json_default)


def infer_array(values: list[Any]) -> pa.Array:
    """``values`` as an Arrow array of the type Arrow infers, or as text when they share no type."""
    try:
        return pa.array(values)
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        return pa.array([to_text(v) for v in values], pa.string())
