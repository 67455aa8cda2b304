"""Streaming table input and resumable, ordered table output for seq2seq jobs.

Input: :func:`open_table` reads Parquet, JSONL (``.jsonl``/``.json``), CSV, TXT or stdin
in bounded batches and yields one :class:`Row` per input row. A row whose text is
null, empty, not UTF-8 or not a string (or a line that is not JSON, a malformed CSV
row, an unreadable Parquet row group) is still yielded, with ``error`` set, so the job
can record it and go on.

Output: :func:`open_sink` accepts finished rows in any order and produces the output
in input row order. A file sink commits finished rows, whatever their order, into
numbered part files (Arrow IPC with the row ids, each committed atomically) in a hidden
``.<name>.parts/`` directory beside the output, within ``part_rows`` rows and
``flush_interval_s`` seconds (see :func:`open_sink`). :meth:`PartsSink.finalize` merges
the parts in row order into the output (committed atomically): parts that are disjoint
ranges are copied, overlapping ones (rows finished out of order, retries) merged row by
row, in rounds of at most ``MERGE_FAN_IN`` parts. It then writes ``.<name>.done.json``
beside the output and removes the directory. The parts directory and the done file are
the resume state: a re-run opens the sink, skips ``sink.done_row_ids()`` (all rows of a
finished job) and finishes.

A job (see :func:`open_sink` for the resume loop)::

    with open_table(src, "text") as source, open_sink(
        dst, result_columns=["summary"], input_schema=source.arrow_schema, job_key=key
    ) as sink:
        done = sink.done_row_ids()
        for row in source:
            if row.row_id in done:
                continue
            if row.error:
                sink.write_row(row)                  # error row, job goes on
            else:
                submit(row)                          # engine; results come back in any order
        for row, summary in results():
            sink.write_row(row, {"summary": summary})
        sink.finalize(expected_rows=source.rows_read)
"""

from __future__ import annotations

import base64
import bisect
import csv
import datetime as dt
import decimal
import heapq
import itertools
import json
import os
import re
import shutil
import sys
import threading
import time
import weakref
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from encdec_cli.io.atomic import (
    atomic_open,
    atomic_path,
    atomic_write_text,
    fsync_dir,
    remove_dir,
    remove_stale_temps,
)

try:  # advisory lock so two jobs cannot write one output; absent on Windows
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "ERROR_COLUMN",
    "PartsSink",
    "Row",
    "RowIdSet",
    "StreamSink",
    "TableError",
    "TableSink",
    "TableSource",
    "open_sink",
    "open_table",
]

ERROR_COLUMN = "error"  # output column: null when the row is fine, else the message
ROW_ID = "__encdec_row_id"  # row id column inside part files; never in the output
PART_META_KEY = b"encdec.part"  # part schema metadata: row-id intervals (ok / error)
JOB_FILE = "job.json"  # parts-directory state: which job these parts belong to
MAX_JSON_ARRAY_BYTES = 64 << 20  # a .json array is loaded whole; beyond this, ask for JSONL
ROW_GROUP_ROWS = 65_536  # Parquet output row group: at most this many rows ...
ROW_GROUP_BYTES = 8 << 20  # ... or this many bytes of Arrow data (bounds the writer's memory)
CSV_BLOCK_BYTES = 1 << 20  # pyarrow CSV reader block (one batch per block)
MAX_QUOTED_LINES = 1000  # a quoted CSV field over more lines is taken for an unclosed quote
PARQUET_READ_BUFFER = 1 << 20  # read column chunks through a buffer, not whole (bounded memory)
MAX_BUFFER_BYTES = 64 << 20  # a file sink commits buffered rows beyond about this much text/bytes
MERGE_FAN_IN = 64  # finalize merges at most this many overlapping parts at once (more: in rounds)
DONE_SUFFIX = ".done.json"  # .<output name>.done.json beside the output: the job finished (see PartsSink)

# A JSON \uD800-\uDFFF escape: json.loads turns a lone one into a str that cannot be UTF-8 encoded.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_TEXT_TYPES = (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary, pa.types.is_large_binary)


class TableError(ValueError):
    """A table cannot be read or written; the message says what to do."""


@dataclass(slots=True)
class Row:
    """One input row."""

    row_id: int  # 0-based position among the input's data rows
    text: str | None  # the text column, None when `error` is set
    record: dict[str, Any] | None  # all input columns; None when the row could not be parsed
    error: str | None  # why the row cannot be processed, None when it can


# ---------------------------------------------------------------------------------
# Row-id sets: sorted disjoint intervals, so 10M contiguous ids cost a few bytes.
# ---------------------------------------------------------------------------------
class RowIdSet:
    """A set of non-negative ints stored as sorted, disjoint, non-adjacent [start, end) runs."""

    def __init__(self, intervals: Iterable[Sequence[int]] = ()) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._len = 0
        for start, end in intervals:
            self.add_range(start, end)

    def add(self, row_id: int) -> None:
        self.add_range(row_id, row_id + 1)

    def add_range(self, start: int, end: int) -> None:
        """Add the ids ``start <= id < end``."""
        if start >= end:
            return
        starts, ends = self._starts, self._ends
        i = bisect.bisect_left(ends, start)  # first run ending at or after `start` (touching)
        j = bisect.bisect_right(starts, end)  # first run starting after `end` (not touching)
        if i < j:
            start, end = min(start, starts[i]), max(end, ends[j - 1])
            self._len -= sum(e - s for s, e in zip(starts[i:j], ends[i:j], strict=True))
        starts[i:j] = [start]
        ends[i:j] = [end]
        self._len += end - start

    def end_of(self, row_id: int) -> int | None:
        """Exclusive end of the run containing ``row_id``, or None if it is not in the set."""
        if not self._ends or row_id >= self._ends[-1]:  # fast path: ids past the last run
            return None
        k = bisect.bisect_right(self._starts, row_id) - 1
        if k >= 0 and row_id < self._ends[k]:
            return self._ends[k]
        return None

    def __contains__(self, row_id: object) -> bool:
        return isinstance(row_id, int) and self.end_of(row_id) is not None

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[int]:
        for s, e in zip(self._starts, self._ends, strict=True):
            yield from range(s, e)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RowIdSet) and self.intervals() == other.intervals()

    def __repr__(self) -> str:
        return f"RowIdSet({self.intervals()})"

    def intervals(self) -> list[tuple[int, int]]:
        return list(zip(self._starts, self._ends, strict=True))

    def update(self, other: RowIdSet) -> None:
        for s, e in other.intervals():
            self.add_range(s, e)

    def difference(self, other: RowIdSet) -> RowIdSet:
        """Ids in ``self`` but not in ``other``."""
        out = RowIdSet()
        cuts = other.intervals()
        for s, e in self.intervals():
            k = bisect.bisect_right(other._ends, s)  # first cut that ends after s
            while s < e and k < len(cuts) and cuts[k][0] < e:
                cs, ce = cuts[k]
                if cs > s:
                    out.add_range(s, cs)
                s = max(s, ce)
                k += 1
            if s < e:
                out.add_range(s, e)
        return out

    @classmethod
    def from_sorted(cls, ids: Iterable[int]) -> RowIdSet:
        out = cls()
        for s, e in _runs(ids):
            out.add_range(s, e)
        return out


def _runs(sorted_ids: Iterable[int]) -> list[tuple[int, int]]:
    """[start, end) runs of consecutive ids in an ascending sequence."""
    runs: list[tuple[int, int]] = []
    start = prev = None
    for i in sorted_ids:
        if prev is not None and i == prev + 1:
            prev = i
            continue
        if start is not None:
            runs.append((start, prev + 1))
        start = prev = i
    if start is not None:
        runs.append((start, prev + 1))
    return runs


# ---------------------------------------------------------------------------------
# Input
# ---------------------------------------------------------------------------------
def _text_or_error(value: Any, column: str) -> tuple[str | None, str | None]:
    """(text, None) if ``value`` is usable text, else (None, message)."""
    if value is None:
        return None, f"column '{column}' is null"
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            return None, f"column '{column}' is not valid UTF-8 ({_describe_decode_error(exc)})"
    if not isinstance(value, str):
        return None, f"column '{column}' is {type(value).__name__}, expected a string"
    if not value.strip():
        return None, f"column '{column}' is empty"
    bad = _lone_surrogate(value)
    if bad is not None:
        return None, f"column '{column}' is not valid Unicode (lone surrogate {bad})"
    return value, None


def _lone_surrogate(text: str) -> str | None:
    """Where ``text`` has a lone UTF-16 surrogate (from a JSON escape such as \\ud800), else None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"U+{ord(text[exc.start]):04X} at position {exc.start}"
    return None


def _fix_surrogates(value: Any) -> Any:
    """``value`` with lone surrogates in its strings (also nested) replaced by U+FFFD, so that it can
    be written as UTF-8."""
    if isinstance(value, str):
        return value if _lone_surrogate(value) is None else _SURROGATE.sub("\ufffd", value)
    if isinstance(value, list):
        return [_fix_surrogates(v) for v in value]
    if isinstance(value, dict):
        return {_fix_surrogates(k): _fix_surrogates(v) for k, v in value.items()}
    return value


def _describe_decode_error(exc: UnicodeDecodeError) -> str:
    return f"byte 0x{exc.object[exc.start]:02x} at position {exc.start}"


def _decode_lenient(value: Any) -> Any:
    """Bytes -> str for a record value, replacing invalid UTF-8; other values unchanged."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


class TableSource:
    """Rows of an input table, streamed in batches of at most ``batch_rows`` rows.

    Attributes: ``path`` (``"-"`` for stdin), ``format`` ("parquet" | "jsonl" | "csv" |
    "txt"), ``column`` (the text column), ``columns`` (input column names; for JSONL
    those of the first object), ``arrow_schema`` (input column types when the format
    has them, else None: pass it to :func:`open_sink`), ``num_rows`` (known up front
    for Parquet, else None) and ``rows_read`` (rows yielded so far).
    """

    def __init__(
        self,
        path: str,
        fmt: str,
        column: str,
        columns: list[str],
        arrow_schema: pa.Schema | None,
        batches: Callable[[], Generator[list[Row], None, None]],
        num_rows: int | None = None,
        reiterable: bool = True,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self.path = path
        self.format = fmt
        self.column = column
        self.columns = columns
        self.arrow_schema = arrow_schema
        self.num_rows = num_rows
        self.rows_read = 0
        self._batches = batches
        self._reiterable = reiterable
        self._iterated = False
        self._on_close = on_close
        self._open_batches: Generator[list[Row], None, None] | None = None

    def iter_batches(self) -> Iterator[list[Row]]:
        """Lists of consecutive rows (row ids restart at 0 on each pass over a file)."""
        if self._iterated and not self._reiterable:
            raise TableError(f"{self.path}: this input can be read only once")
        self._iterated = True
        self.rows_read = 0
        self._open_batches = batches = self._batches()
        for batch in batches:
            self.rows_read += len(batch)
            yield batch

    def __iter__(self) -> Iterator[Row]:
        for batch in self.iter_batches():
            yield from batch

    def close(self) -> None:
        """Close the file and the native reader of a pass not read to its end (now, in order: not
        left to the interpreter's exit)."""
        if self._open_batches is not None:
            self._open_batches.close()
            self._open_batches = None
        if self._on_close is not None:
            self._on_close()
            self._on_close = None

    def __enter__(self) -> TableSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_table(path_or_dash: str | os.PathLike[str], column: str, batch_rows: int = 1024) -> TableSource:
    """Open an input table for streaming; raises :class:`TableError` if it cannot be used.

    The format comes from the extension: ``.parquet``/``.pq``, ``.jsonl``/``.ndjson``/
    ``.json`` (JSON Lines; a ``.json`` holding one array is read whole up to 64 MiB),
    ``.csv``, ``.txt`` (one item per line, column ``text``). ``-`` reads stdin: JSON
    Lines if the first non-empty line is a JSON object, else one item per line.
    A missing ``column`` raises, listing the columns there are.
    """
    if batch_rows < 1:
        raise ValueError("batch_rows must be >= 1")
    if str(path_or_dash) == "-":
        return _open_stdin(column, batch_rows)
    path = Path(path_or_dash)
    if not path.is_file():
        raise TableError(f"input {path} does not exist or is not a file")
    ext = path.suffix.lower()
    if ext in (".parquet", ".pq"):
        return _open_parquet(path, column, batch_rows)
    if ext in (".jsonl", ".ndjson"):
        return _open_jsonl(path, column, batch_rows)
    if ext == ".json":
        return _open_json(path, column, batch_rows)
    if ext == ".csv":
        return _open_csv(path, column, batch_rows)
    if ext == ".txt":
        return _open_txt(path, column, batch_rows)
    raise TableError(
        f"cannot tell the format of {path} from its extension; "
        "use .parquet, .jsonl, .json, .csv or .txt (or '-' for stdin)"
    )


def _missing_column(column: str, where: str, columns: Sequence[str]) -> TableError:
    available = ", ".join(repr(c) for c in columns) or "(none)"
    return TableError(f"{where} has no column {column!r}; available columns: {available}")


# -- Parquet ------------------------------------------------------------------------
def _is_text_type(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return (
        pa.types.is_null(t)
        or any(check(t) for check in _TEXT_TYPES)
        or str(t) in ("string_view", "binary_view")
    )


def _open_parquet(path: Path, column: str, batch_rows: int) -> TableSource:
    try:
        pf = pq.ParquetFile(path, buffer_size=PARQUET_READ_BUFFER, pre_buffer=False)
        schema = pf.schema_arrow
    except (pa.ArrowException, OSError) as exc:
        raise TableError(
            f"cannot read {path} as Parquet ({exc}); is the file complete and not corrupt?"
        ) from exc
    if column not in schema.names:
        pf.close()
        raise _missing_column(column, str(path), schema.names)
    ctype = schema.field(column).type
    if not _is_text_type(ctype):
        pf.close()
        raise TableError(f"column {column!r} of {path} has type {ctype}; expected a text (string) column")

    def batches() -> Iterator[list[Row]]:
        next_id = 0
        for rg in range(pf.num_row_groups):
            rg_rows = pf.metadata.row_group(rg).num_rows
            done = 0
            try:
                for batch in pf.iter_batches(batch_size=batch_rows, row_groups=[rg], use_threads=False):
                    rows = _arrow_batch_rows(batch, column, next_id)
                    next_id += len(rows)
                    done += len(rows)
                    yield rows
            except (pa.ArrowException, OSError) as exc:
                # The rest of this row group cannot be read: one error row per lost row.
                msg = f"unreadable Parquet data in row group {rg} of {path}: {exc}"
                for start in range(done, rg_rows, batch_rows):
                    n = min(batch_rows, rg_rows - start)
                    yield [Row(next_id + i, None, None, msg) for i in range(n)]
                    next_id += n

    return TableSource(
        str(path),
        "parquet",
        column,
        list(schema.names),
        schema.remove_metadata(),
        batches,
        num_rows=pf.metadata.num_rows,
        on_close=pf.close,
    )


def _arrow_batch_rows(batch: pa.RecordBatch, column: str, first_id: int) -> list[Row]:
    names = batch.schema.names
    values: list[list[Any]] = []
    text_values: list[Any] = []
    for name, arr in zip(names, batch.columns, strict=True):
        try:
            col = arr.to_pylist()
            raw = col
        except (UnicodeDecodeError, pa.ArrowException):  # invalid UTF-8 in a string column
            raw = arr.cast(pa.binary() if not pa.types.is_large_string(arr.type) else pa.large_binary())
            raw = raw.to_pylist()
            col = [_decode_lenient(v) for v in raw]
        values.append(col)
        if name == column:
            text_values = raw
    rows = []
    for i, vals in enumerate(zip(*values, strict=True)):
        text, error = _text_or_error(text_values[i], column)
        rows.append(Row(first_id + i, text, dict(zip(names, vals, strict=True)), error))
    return rows


# -- CSV ------------------------------------------------------------------------------
def _open_csv(path: Path, column: str, batch_rows: int) -> TableSource:
    try:  # the header only, parsed on its own: no data row can make this fail
        header = pacsv.read_csv(
            pa.BufferReader(_scan_csv(path)),
            read_options=pacsv.ReadOptions(use_threads=False),
            parse_options=pacsv.ParseOptions(newlines_in_values=True),
            convert_options=pacsv.ConvertOptions(check_utf8=False),
        )
        names = header.column_names
    except (pa.ArrowException, OSError) as exc:
        raise TableError(f"cannot read {path} as CSV ({exc})") from exc
    if column not in names:
        raise _missing_column(column, str(path), names)
    if len(set(names)) != len(names):
        raise TableError(f"{path} has duplicate column names in its header: {names}")

    def batches() -> Iterator[list[Row]]:
        bad: list[Any] = []

        def on_invalid(row: Any) -> str:
            bad.append(row)
            return "skip"

        reader = pacsv.open_csv(
            path,
            read_options=pacsv.ReadOptions(use_threads=False, block_size=CSV_BLOCK_BYTES),
            parse_options=pacsv.ParseOptions(newlines_in_values=True, invalid_row_handler=on_invalid),
            # Every column as raw bytes: no type guessing that a later block could break,
            # and invalid UTF-8 becomes a row error instead of a failed read.
            convert_options=pacsv.ConvertOptions(column_types={n: pa.binary() for n in names}),
        )
        next_id = 0
        with reader:
            for batch in reader:
                for start in range(0, batch.num_rows, batch_rows):
                    rows = _csv_rows(batch.slice(start, batch_rows), names, column, next_id)
                    next_id += len(rows)
                    yield rows
                if bad:  # malformed rows of this block follow its good rows
                    rows = []
                    for b in bad:
                        line = f"line {b.number}" if b.number is not None else "a row"
                        msg = (
                            f"CSV {line} has {b.actual_columns} fields, expected {b.expected_columns}: "
                            f"{b.text[:80]!r}"
                        )
                        rows.append(Row(next_id, None, None, msg))
                        next_id += 1
                    bad.clear()
                    yield rows

    schema = pa.schema([(n, pa.string()) for n in names])
    return TableSource(str(path), "csv", column, names, schema, batches)


def _scan_csv(path: Path) -> bytes:
    """The header record of a CSV file, after checking that every quoted field of the file closes
    within MAX_QUOTED_LINES lines: an unclosed quote would silently make the rows after it one
    field's text. Raises :class:`TableError` naming the line where such a quote opens."""
    header: list[bytes] = []  # the lines of the first record
    header_done = False
    inside = False  # in a quoted field at the end of the line
    opened = 0  # the line where that field opened
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if lineno == 1:
                line = line.removeprefix(b"\xef\xbb\xbf")  # UTF-8 byte order mark
            if inside or b'"' in line:
                was_inside, inside = inside, _quote_open_after(line, inside)
                if inside and not was_inside:
                    opened = lineno
                if inside and lineno - opened + 1 >= MAX_QUOTED_LINES:  # still open after them
                    raise TableError(
                        f"{path} line {opened}: a quoted field opens there and runs over more than "
                        f'{MAX_QUOTED_LINES} lines; is its closing quote (") missing?'
                    )
            if not header_done and (header or line.strip()):  # blank lines before it are no record
                header.append(line)
                header_done = not inside
    if inside:
        raise TableError(
            f'{path} line {opened}: a quoted field opens there and is never closed; add its closing quote (")'
        )
    if not header:
        raise TableError(f"{path} is empty; a CSV file starts with a header line naming its columns")
    return b"".join(header)


def _quote_open_after(line: bytes, inside: bool) -> bool:
    """Whether a quoted field is open at the end of ``line`` (``inside``: open at its start). As
    pyarrow parses: a quote opens a field only at the field's start, "" inside is a quote."""
    i = 0
    while True:
        if inside:
            j = line.find(b'"', i)
            if j < 0:
                return True
            if line.startswith(b'"', j + 1):
                i = j + 2
                continue
            inside, i = False, j + 1
        elif line.startswith(b'"', i):
            inside, i = True, i + 1
            continue
        j = line.find(b",", i)  # the rest of this field is plain text
        if j < 0:
            return False
        i = j + 1


def _csv_rows(batch: pa.RecordBatch, names: list[str], column: str, first_id: int) -> list[Row]:
    raw_cols = [arr.to_pylist() for arr in batch.columns]
    text_col = raw_cols[names.index(column)]
    rows = []
    for i, vals in enumerate(zip(*raw_cols, strict=True)):
        text, error = _text_or_error(text_col[i], column)
        record = {n: _decode_lenient(v) for n, v in zip(names, vals, strict=True)}
        rows.append(Row(first_id + i, text, record, error))
    return rows


# -- line-based: JSONL, TXT, stdin ------------------------------------------------------
def _strip_eol(raw: bytes) -> bytes:
    if raw.endswith(b"\n"):
        raw = raw[:-1]
    if raw.endswith(b"\r"):
        raw = raw[:-1]
    return raw


def _jsonl_row(row_id: int, lineno: int, raw: bytes, column: str) -> Row:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Row(row_id, None, None, f"line {lineno} is not valid UTF-8 ({_describe_decode_error(exc)})")
    try:
        obj = json.loads(line)
    except ValueError as exc:
        return Row(row_id, None, None, f"line {lineno} is not valid JSON ({exc})")
    return _object_row(row_id, f"line {lineno}", obj, column, _SURROGATE_ESCAPE.search(raw) is not None)


def _object_row(row_id: int, where: str, obj: Any, column: str, surrogates: bool = True) -> Row:
    """A row from one JSON value; ``surrogates``: its text may hold lone surrogates to replace."""
    if not isinstance(obj, dict):
        return Row(row_id, None, None, f"{where} is a JSON {type(obj).__name__}, expected an object")
    if column not in obj:
        keys = ", ".join(repr(k) for k in obj) or "(none)"
        return Row(
            row_id,
            None,
            _fix_surrogates(obj) if surrogates else obj,
            f"{where} has no column {column!r} (it has {keys})",
        )
    text, error = _text_or_error(obj[column], column)
    return Row(row_id, text, _fix_surrogates(obj) if surrogates else obj, error)


def _text_row(row_id: int, lineno: int, raw: bytes, column: str) -> Row:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        msg = f"line {lineno} is not valid UTF-8 ({_describe_decode_error(exc)})"
        return Row(row_id, None, {column: None}, msg)
    if not line.strip():
        return Row(row_id, None, {column: line}, f"line {lineno} is empty")
    return Row(row_id, line, {column: line}, None)


def _line_batches(
    lines: Callable[[], Iterable[bytes]],
    parse: Callable[[int, int, bytes, str], Row],
    column: str,
    batch_rows: int,
    skip_blank: bool,
) -> Callable[[], Iterator[list[Row]]]:
    """Rows from lines. Blank lines are skipped (JSONL) or, for plain text, are error
    rows -- except blank lines at the end of the input, which are not items."""

    def batches() -> Iterator[list[Row]]:
        rows: list[Row] = []
        blank: list[tuple[int, bytes]] = []  # plain text: blank lines not yet known to be inner
        row_id = 0
        for lineno, raw in enumerate(lines(), 1):
            raw = _strip_eol(raw)
            if lineno == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")  # UTF-8 byte order mark
            if not raw.strip():
                if not skip_blank:
                    blank.append((lineno, raw))
                continue
            for blank_lineno, blank_raw in blank:
                rows.append(parse(row_id, blank_lineno, blank_raw, column))
                row_id += 1
            blank.clear()
            rows.append(parse(row_id, lineno, raw, column))
            row_id += 1
            if len(rows) >= batch_rows:
                yield rows
                rows = []
        if rows:
            yield rows

    return batches


def _file_lines(path: Path) -> Callable[[], Iterator[bytes]]:
    def lines() -> Iterator[bytes]:
        with open(path, "rb") as f:
            yield from f

    return lines


def _first_object_keys(lines: Iterable[bytes]) -> list[str] | None:
    """Keys of the first line that is a JSON object, or None if there is none."""
    for raw in lines:
        raw = _strip_eol(raw).removeprefix(b"\xef\xbb\xbf")
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw.decode("utf-8"))
        except ValueError:
            continue
        if isinstance(obj, dict):
            return list(obj)
    return None


def _open_jsonl(path: Path, column: str, batch_rows: int) -> TableSource:
    lines = _file_lines(path)
    it = lines()
    try:
        keys = _first_object_keys(it)
    finally:
        it.close()  # type: ignore[attr-defined]
    if keys is not None and column not in keys:
        raise _missing_column(column, f"{path} (first JSON object)", keys)
    batches = _line_batches(lines, _jsonl_row, column, batch_rows, skip_blank=True)
    return TableSource(str(path), "jsonl", column, keys or [], None, batches)


def _open_json(path: Path, column: str, batch_rows: int) -> TableSource:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if not head.startswith(b"["):
        return _open_jsonl(path, column, batch_rows)
    size = path.stat().st_size
    if size > MAX_JSON_ARRAY_BYTES:
        raise TableError(
            f"{path} is one JSON array of {size >> 20} MiB, too big to load at once; convert it to "
            f"JSON Lines (one object per line), e.g. jq -c '.[]' {path} > {path.with_suffix('.jsonl')}"
        )
    try:
        items = json.loads(path.read_bytes().decode("utf-8-sig"))
    except ValueError as exc:
        raise TableError(f"cannot read {path} as JSON ({exc})") from exc
    keys = next((list(o) for o in items if isinstance(o, dict)), None)
    if keys is not None and column not in keys:
        raise _missing_column(column, f"{path} (first JSON object)", keys)

    def batches() -> Iterator[list[Row]]:
        for start in range(0, len(items), batch_rows):
            chunk = items[start : start + batch_rows]
            yield [_object_row(i, f"item {i}", obj, column) for i, obj in enumerate(chunk, start)]

    return TableSource(str(path), "jsonl", column, keys or [], None, batches)


def _open_txt(path: Path, column: str, batch_rows: int) -> TableSource:
    if column != "text":
        raise _missing_column(column, f"{path} (plain text, one item per line)", ["text"])
    batches = _line_batches(_file_lines(path), _text_row, column, batch_rows, skip_blank=False)
    schema = pa.schema([("text", pa.string())])
    return TableSource(str(path), "txt", column, ["text"], schema, batches)


def _stdin_lines() -> Iterator[bytes]:
    stream = sys.stdin
    buffer = getattr(stream, "buffer", None)
    if buffer is not None:
        yield from buffer
    else:  # a text stream without a byte buffer (e.g. io.StringIO in tests)
        for line in stream:
            yield line.encode("utf-8", "surrogateescape")


def _open_stdin(column: str, batch_rows: int) -> TableSource:
    source = _stdin_lines()
    peeked: list[bytes] = []
    first: bytes | None = None
    for raw in source:
        peeked.append(raw)
        if _strip_eol(raw).strip():
            first = _strip_eol(raw).removeprefix(b"\xef\xbb\xbf")
            break
    try:
        obj = json.loads(first.decode("utf-8")) if first is not None else None
    except ValueError:
        obj = None
    is_jsonl = isinstance(obj, dict)

    def lines() -> Iterator[bytes]:
        yield from peeked
        yield from source

    if is_jsonl:
        keys = list(obj)
        if column not in keys:
            raise _missing_column(column, "stdin (first JSON object)", keys)
        batches = _line_batches(lines, _jsonl_row, column, batch_rows, skip_blank=True)
        return TableSource("-", "jsonl", column, keys, None, batches, reiterable=False)
    if column != "text":
        raise _missing_column(column, "stdin (plain text, one item per line)", ["text"])
    batches = _line_batches(lines, _text_row, column, batch_rows, skip_blank=False)
    schema = pa.schema([("text", pa.string())])
    return TableSource("-", "txt", column, ["text"], schema, batches, reiterable=False)


# ---------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------
def _json_default(value: Any) -> Any:
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", "backslashreplace")
    return str(value)


def _to_text(value: Any) -> str | None:
    """A value as text for a column whose parts disagree on its type."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", "backslashreplace")
    return json.dumps(value, ensure_ascii=False, default=_json_default)


def _infer_array(values: list[Any]) -> pa.Array:
    try:
        return pa.array(values)
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        return pa.array([_to_text(v) for v in values], pa.string())


class TableSink:
    """Takes finished rows in any order; writes the output in input row order.

    Each output row has the input columns, then ``result_columns`` (null for error
    rows), then ``error`` (null when the row is fine). Result columns and ``error``
    replace input columns of the same name.
    """

    def __init__(self, result_columns: Sequence[str]) -> None:
        result_columns = list(result_columns)
        if not result_columns:
            raise ValueError("result_columns must name at least one column")
        for name in result_columns:
            if not name or name in (ERROR_COLUMN, ROW_ID):
                raise ValueError(f"result column name {name!r} is reserved or empty")
        if len(set(result_columns)) != len(result_columns):
            raise ValueError(f"duplicate result column names: {result_columns}")
        self.result_columns = result_columns
        self.duplicates = 0  # writes ignored because the row was already written
        self.finished = False  # an earlier run of this job wrote its whole output (file sinks)
        self._reserved = (*result_columns, ERROR_COLUMN, ROW_ID)
        self._result_set = frozenset(result_columns)
        self._closed = False

    def _make_row(
        self,
        row_id: int,
        record: Mapping[str, Any] | None,
        results: Mapping[str, Any] | None,
        error: str | None,
    ) -> dict[str, Any]:
        if self._closed:
            raise ValueError("write to a closed or finalized sink")
        if not isinstance(row_id, int) or row_id < 0:
            raise ValueError(f"row_id must be a non-negative int, not {row_id!r}")
        row = dict(record) if record else {}
        for name in self._reserved:  # re-added below, at the end
            row.pop(name, None)
        results = results or {}
        if not self._result_set.issuperset(results):
            unknown = sorted(set(results) - self._result_set)
            raise ValueError(f"unknown result columns {unknown}; expected {self.result_columns}")
        for name in self.result_columns:
            row[name] = results.get(name)
        row[ERROR_COLUMN] = error
        row[ROW_ID] = row_id
        return row

    def write(
        self,
        row_id: int,
        record: Mapping[str, Any] | None,
        results: Mapping[str, Any] | None = None,
        error: str | None = None,
    ) -> None:
        """Add one finished row (``error`` set and ``results`` empty for a failed row)."""
        raise NotImplementedError

    def write_row(self, row: Row, results: Mapping[str, Any] | None = None, error: str | None = None) -> None:
        """:meth:`write` for a source :class:`Row`; ``error`` defaults to ``row.error``."""
        self.write(row.row_id, row.record, results, error if error is not None else row.error)

    def done_row_ids(self) -> RowIdSet:
        """Rows already written by an earlier run (ok or failed): the job skips them."""
        return RowIdSet()

    def failed_row_ids(self) -> RowIdSet:
        """Rows an earlier run wrote as failed; writing them again replaces the error."""
        return RowIdSet()

    def flush(self) -> None:
        """Commit every buffered row (called by :meth:`close`)."""

    def finalize(self, expected_rows: int | None = None) -> Path | None:
        """Write the complete output in row order and clean up; returns the output path."""
        raise NotImplementedError

    def close(self) -> None:
        """Save what is buffered without finalizing (a re-run resumes from here)."""
        if not self._closed:
            self.flush()
            self._closed = True

    def __enter__(self) -> TableSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_sink(
    path_or_dash: str | os.PathLike[str],
    fmt: str | None = None,
    *,
    result_columns: Sequence[str],
    input_schema: pa.Schema | None = None,
    result_types: Mapping[str, pa.DataType] | None = None,
    job_key: str | None = None,
    resume: bool = True,
    part_rows: int = 4096,
    max_buffer_bytes: int = MAX_BUFFER_BYTES,
    flush_interval_s: float = 30.0,
) -> TableSink:
    """Open the output of a table job.

    ``fmt`` is "parquet", "jsonl" or "csv" (default: from the extension); ``-`` writes
    JSON Lines to stdout as soon as each prefix of rows is complete (no resume).
    ``input_schema`` (``TableSource.arrow_schema``) keeps input column types; without
    it, types are inferred from the values. ``result_types`` gives result columns a type
    other than string (e.g. a list of strings). ``job_key`` identifies the job (input +
    options): parts left by a job with another key raise :class:`TableError` instead of
    being mixed in; the output of a finished run of the same job counts as done (its
    rows are skipped, its failed rows can be retried). ``resume=False`` discards both.
    Temp files of the output left by a killed earlier run are deleted.

    A file sink commits the rows written to it, in whatever order they come, as a part
    when it holds ``part_rows`` rows or about ``max_buffer_bytes`` of their strings and
    bytes, and at the latest ``flush_interval_s`` after the oldest of them was written
    (a thread commits them then even if nothing else is written). What a crash, even
    SIGKILL, can lose is thus at most ``part_rows`` rows and the rows of the last
    ``flush_interval_s`` seconds.
    """
    if str(path_or_dash) == "-":
        if fmt not in (None, "jsonl", "json"):
            raise TableError(f"stdout output is JSON Lines only, not {fmt!r}")
        return StreamSink(sys.stdout, result_columns)
    path = Path(path_or_dash)
    fmt = (fmt or _format_from_extension(path)).lower()
    if fmt == "json":
        fmt = "jsonl"
    if fmt not in ("parquet", "jsonl", "csv"):
        raise TableError(f"unknown output format {fmt!r}; choose parquet, jsonl or csv")
    return PartsSink(
        path,
        fmt,
        result_columns,
        input_schema=input_schema,
        result_types=result_types,
        job_key=job_key,
        resume=resume,
        part_rows=part_rows,
        max_buffer_bytes=max_buffer_bytes,
        flush_interval_s=flush_interval_s,
    )


def _format_from_extension(path: Path) -> str:
    ext = path.suffix.lower()
    fmt = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl"}
    fmt[".csv"] = "csv"
    if ext not in fmt:
        raise TableError(
            f"cannot tell the output format of {path}; use .parquet, .jsonl or .csv, or pass a format"
        )
    return fmt[ext]


# -- stdout -----------------------------------------------------------------------------
class StreamSink(TableSink):
    """JSON Lines to a text stream, in row order, each line as soon as all before it are in."""

    def __init__(self, stream: IO[str], result_columns: Sequence[str]) -> None:
        super().__init__(result_columns)
        self._stream = stream
        self._pending: dict[int, dict[str, Any]] = {}
        self._next = 0
        self.rows_written = 0

    def write(
        self,
        row_id: int,
        record: Mapping[str, Any] | None,
        results: Mapping[str, Any] | None = None,
        error: str | None = None,
    ) -> None:
        row = self._make_row(row_id, record, results, error)
        if row_id < self._next or row_id in self._pending:
            self.duplicates += 1
            return
        self._pending[row_id] = row
        wrote = False
        while self._next in self._pending:
            self._emit(self._pending.pop(self._next))
            self._next += 1
            wrote = True
        if wrote:
            self._stream.flush()

    def _emit(self, row: dict[str, Any]) -> None:
        row.pop(ROW_ID)
        self._stream.write(json.dumps(row, ensure_ascii=False, default=_json_default) + "\n")
        self.rows_written += 1

    def finalize(self, expected_rows: int | None = None) -> None:
        """Write any rows still waiting for a gap (in order), then check the count."""
        if self._closed:
            raise ValueError("sink already finalized or closed")
        missing = [i for i in range(self._next, max(self._pending, default=-1) + 1) if i not in self._pending]
        for row_id in sorted(self._pending):
            self._emit(self._pending.pop(row_id))
        self._stream.flush()
        self._closed = True
        if missing:
            raise TableError(f"rows {missing[:10]} never got a result; the output has gaps")
        if expected_rows is not None and self.rows_written != expected_rows:
            raise TableError(f"wrote {self.rows_written} rows, expected {expected_rows}")
        return None


# -- files: parts + merge ------------------------------------------------------------------
@dataclass
class _Part:
    seq: int  # write order; for a row in several parts, the highest seq wins
    path: Path
    first: int  # smallest row id
    last: int  # largest row id
    ok: RowIdSet
    err: RowIdSet
    schema: pa.Schema
    fmt: str | None = None  # None: an Arrow IPC part file; else the format of a finished job's output


def _read_part_info(path: Path) -> _Part:
    with pa.OSFile(str(path)) as source:
        schema = pa.ipc.open_file(source).schema
    meta = json.loads((schema.metadata or {})[PART_META_KEY])
    return _Part(
        seq=int(path.stem.split("-")[1]),
        path=path,
        first=int(meta["first"]),
        last=int(meta["last"]),
        ok=RowIdSet(meta["ok"]),
        err=RowIdSet(meta["err"]),
        schema=schema.remove_metadata(),
    )


def _stamp(path: Path) -> list[int] | None:
    """Size and mtime of a file (None if it is missing): tells whether it changed since."""
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


class PartsSink(TableSink):
    """File output via a resumable parts directory; see the module docstring."""

    def __init__(
        self,
        path: Path,
        fmt: str,
        result_columns: Sequence[str],
        *,
        input_schema: pa.Schema | None = None,
        result_types: Mapping[str, pa.DataType] | None = None,
        job_key: str | None = None,
        resume: bool = True,
        part_rows: int = 4096,
        max_buffer_bytes: int = MAX_BUFFER_BYTES,
        flush_interval_s: float = 30.0,
    ) -> None:
        super().__init__(result_columns)
        result_types = dict(result_types or {})
        if part_rows < 1:
            raise ValueError("part_rows must be >= 1")
        self.path = path
        self.format = fmt
        self.parts_dir = path.with_name(f".{path.name}.parts")
        self.done_file = path.with_name(f".{path.name}{DONE_SUFFIX}")
        self.part_rows = part_rows
        self.max_buffer_bytes = max_buffer_bytes
        self.flush_interval_s = flush_interval_s
        self.warnings: list[str] = []
        self._input_names: list[str] = []
        self._part_schema: pa.Schema | None = None
        if input_schema is not None:
            fields = [f for f in input_schema.remove_metadata() if f.name not in self._reserved]
            self._input_names = [f.name for f in fields]
            fields += [pa.field(n, result_types.get(n, pa.string())) for n in self.result_columns]
            fields += [pa.field(ERROR_COLUMN, pa.string()), pa.field(ROW_ID, pa.int64())]
            self._part_schema = pa.schema(fields)
        self._buffer: dict[int, dict[str, Any]] = {}  # written rows not yet in a part, any order
        self._buffer_bytes = 0  # approximate size of the rows in _buffer
        self._buffered_since = 0.0  # when the oldest row in _buffer was written (monotonic)
        self._redone = RowIdSet()  # rows an earlier run failed, written again in this run
        self._mutex = threading.Condition()  # guards the buffer and the parts against the flush thread
        self._flush_error: Exception | None = None  # a commit of the flush thread failed
        self._stopping = False
        self._lock_file: IO[bytes] | None = None
        self._parts: list[_Part] = []
        self._state = {"version": 1, "job_key": job_key, "format": fmt, "result_columns": self.result_columns}
        self._open_parts_dir(resume)
        remove_stale_temps(path.parent, path.name)  # an output commit a killed run never finished
        remove_stale_temps(path.parent, self.parts_dir.name)  # a parts folder it was removing
        self._committed = RowIdSet()  # ids in any part
        prev_ok, prev_err = RowIdSet(), RowIdSet()
        for part in self._parts:
            prev_ok.update(part.ok)
            prev_err.update(part.err)
        self._committed.update(prev_ok)
        self._committed.update(prev_err)
        self._prev_done = RowIdSet(self._committed.intervals())
        self._prev_failed = prev_err.difference(prev_ok)
        self._next_seq = max((p.seq for p in self._parts), default=-1) + 1
        self._flusher = threading.Thread(
            target=_flush_when_due, args=(weakref.ref(self), self._mutex), name="encdec-sink", daemon=True
        )
        self._flusher.start()

    # -- state directory -------------------------------------------------------------
    def _open_parts_dir(self, resume: bool) -> None:
        job_file = self.parts_dir / JOB_FILE
        self._lock()  # before touching anything: another job may be using this directory
        if not resume:
            self.done_file.unlink(missing_ok=True)
            for p in self.parts_dir.iterdir():
                if p.name != ".lock":
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
        has_parts = any(p.name.startswith("part-") for p in self.parts_dir.iterdir())
        if job_file.exists() and has_parts:
            try:
                old = json.loads(job_file.read_text("utf-8"))
            except ValueError:
                old = None
            if old != self._state:
                self._unlock()
                raise TableError(
                    f"{self.parts_dir} holds partial results of a different job (input, options or "
                    "output format changed). Re-run with the original settings to finish it, or "
                    "delete that directory (or run without resume) to start over."
                )
        else:  # a new job (or one that crashed before its first part)
            atomic_write_text(job_file, json.dumps(self._state))
        for p in self.parts_dir.iterdir():
            if p.name.startswith(".") and p.name.endswith(".tmp") or p.name.startswith("merged-"):
                p.unlink()  # from a crash mid-commit or mid-merge
            elif p.name.startswith("part-") and p.suffix == ".arrow":
                try:
                    self._parts.append(_read_part_info(p))
                except (pa.ArrowException, OSError, KeyError, ValueError, IndexError) as exc:
                    self.warnings.append(f"ignored unreadable part {p.name} ({exc}); its rows run again")
                    p.rename(p.with_name(p.name + ".bad"))
        self._parts.sort(key=lambda p: p.seq)
        if resume:
            self._open_finished_output()

    def _open_finished_output(self) -> None:
        """If an earlier run of this job finished (its done file matches this job and the output is
        as it left it), take that output as the first part: its rows are done, its failed rows known."""
        try:
            done = json.loads(self.done_file.read_text("utf-8"))
            valid = {k: done[k] for k in self._state} == self._state and done["output"] == _stamp(self.path)
            rows, failed = int(done["rows"]), RowIdSet(done["failed"])
            schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(done["schema"])))
        except (OSError, ValueError, KeyError, TypeError, pa.ArrowException):
            valid = False
        if not valid:  # none, another job's, or the output changed since: the job runs again
            self.done_file.unlink(missing_ok=True)
            return
        self.finished = True
        if rows:
            ok = RowIdSet([(0, rows)]).difference(failed)
            self._parts.insert(0, _Part(-1, self.path, 0, rows - 1, ok, failed, schema, self.format))

    def _write_done_file(self, schema: pa.Schema) -> None:
        """Record that the output is complete, with its failed rows, so that a re-run skips the job."""
        ok, err = RowIdSet(), RowIdSet()
        for part in self._parts:
            ok.update(part.ok)
            err.update(part.err)
        if self.format == "csv":  # read back as text
            schema = pa.schema([(name, pa.string()) for name in schema.names])
        done = {
            **self._state,
            "rows": len(self._committed),
            "failed": err.difference(ok).intervals(),
            "output": _stamp(self.path),
            "schema": base64.b64encode(schema.serialize().to_pybytes()).decode("ascii"),
        }
        atomic_write_text(self.done_file, json.dumps(done))

    def _lock(self) -> None:
        """Create the parts directory and take its lock. A job finishing meanwhile removes the
        directory it locked (with the lock file), so a lock file is used only if it is still there."""
        lock_path = self.parts_dir / ".lock"
        for _ in range(100):
            try:
                self.parts_dir.mkdir(parents=True, exist_ok=True)
                self._lock_file = open(lock_path, "ab")  # noqa: SIM115 - closed by _unlock
            except (FileNotFoundError, FileExistsError):  # removed between the two calls, or by them
                continue
            if fcntl is None:
                return
            try:
                fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
            except OSError:
                locked = False
            try:
                current = os.stat(lock_path)
            except FileNotFoundError:
                current = None
            opened = os.fstat(self._lock_file.fileno())
            if current is not None and (current.st_dev, current.st_ino) == (opened.st_dev, opened.st_ino):
                if locked:
                    return
                self._unlock()
                raise TableError(f"another encdec job is writing {self.path} right now")
            self._unlock()  # a finished job removed this lock file: take the new one
        raise TableError(f"cannot create and lock {self.parts_dir}")

    def _unlock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()  # closing releases the flock
            self._lock_file = None

    # -- public state ----------------------------------------------------------------
    def done_row_ids(self) -> RowIdSet:
        return RowIdSet(self._prev_done.intervals())

    def failed_row_ids(self) -> RowIdSet:
        return RowIdSet(self._prev_failed.intervals())

    @property
    def rows_committed(self) -> int:
        """Rows saved in parts (this run and earlier ones)."""
        return len(self._committed)

    # -- writing -----------------------------------------------------------------------
    def write(
        self,
        row_id: int,
        record: Mapping[str, Any] | None,
        results: Mapping[str, Any] | None = None,
        error: str | None = None,
    ) -> None:
        """Buffer a finished row. The buffer is committed as a part when it holds ``part_rows``
        rows or ``max_buffer_bytes``, and by the flush thread within ``flush_interval_s``."""
        row = self._make_row(row_id, record, results, error)
        with self._mutex:
            if self._flush_error is not None:
                raise self._flush_error
            if row_id in self._buffer or (
                row_id in self._committed and (row_id not in self._prev_failed or row_id in self._redone)
            ):
                self.duplicates += 1
                return
            if row_id in self._committed:  # a retry of a row an earlier run failed
                self._redone.add(row_id)
            if not self._buffer:
                self._buffered_since = time.monotonic()
                self._mutex.notify_all()  # the flush thread: a row to save in time
            self._buffer[row_id] = row
            self._buffer_bytes += _approx_bytes(row)
            if (
                len(self._buffer) >= self.part_rows
                or self._buffer_bytes > self.max_buffer_bytes
                or time.monotonic() >= self._flush_due()
            ):
                self._flush_locked()

    def _flush_due(self) -> float:
        """When the buffered rows are committed: half the flush interval after the oldest one was
        written, so that the commit is done well within the interval."""
        return self._buffered_since + self.flush_interval_s / 2

    def flush(self) -> None:
        with self._mutex:
            self._flush_locked()

    def _flush_locked(self) -> None:
        if self._buffer:
            self._write_part([self._buffer[i] for i in sorted(self._buffer)])
            self._buffer.clear()
            self._buffer_bytes = 0

    def _stop_flusher(self) -> None:
        with self._mutex:
            self._stopping = True
            self._mutex.notify_all()
        if self._flusher is not threading.current_thread():
            self._flusher.join()

    def _rows_to_table(self, rows: list[dict[str, Any]]) -> pa.Table:
        if self._part_schema is not None:
            try:
                return pa.Table.from_pylist(rows, schema=self._part_schema)
            except (pa.ArrowException, TypeError, ValueError, OverflowError):
                pass  # values that do not fit the input types: infer instead
        names = dict.fromkeys(self._input_names)
        for row in rows:
            names.update(dict.fromkeys(row))
        for name in self._reserved:  # results, then error, then the row id, at the end
            names.pop(name, None)
        ordered = [*names, *self.result_columns, ERROR_COLUMN]
        arrays = [_infer_array([r.get(n) for r in rows]) for n in ordered]
        arrays.append(pa.array([r[ROW_ID] for r in rows], pa.int64()))
        return pa.Table.from_arrays(arrays, names=[*ordered, ROW_ID])

    def _write_part(self, rows: list[dict[str, Any]]) -> None:
        """Commit ``rows`` (sorted by row id) as the next part file."""
        ids = [r[ROW_ID] for r in rows]
        ok = _runs(r[ROW_ID] for r in rows if r[ERROR_COLUMN] is None)
        err = _runs(r[ROW_ID] for r in rows if r[ERROR_COLUMN] is not None)
        meta = {"first": ids[0], "last": ids[-1], "rows": len(ids), "ok": ok, "err": err}
        table = self._rows_to_table(rows)
        table = table.replace_schema_metadata({PART_META_KEY: json.dumps(meta)})
        seq = self._next_seq
        path = self.parts_dir / f"part-{seq:08d}.arrow"
        _write_ipc(path, table.schema, table.to_batches(max_chunksize=1024))
        self._next_seq += 1
        schema = table.schema.remove_metadata()
        self._parts.append(_Part(seq, path, ids[0], ids[-1], RowIdSet(ok), RowIdSet(err), schema))
        for s, e in _runs(ids):
            self._committed.add_range(s, e)

    # -- finalize ------------------------------------------------------------------------
    def finalize(self, expected_rows: int | None = None) -> Path:
        """Merge all parts into the output in row order (atomically), record the job as done
        (a re-run then skips it) and delete the parts. A finished job with nothing new keeps its
        output as it is.

        With ``expected_rows``, raises :class:`TableError` (keeping the parts) unless the
        rows written are exactly ids ``0 .. expected_rows - 1``.
        """
        if self._closed:
            raise ValueError("sink already finalized or closed")
        self._stop_flusher()
        self.flush()
        if expected_rows is not None and self._committed != RowIdSet([(0, expected_rows)]):
            have = len(self._committed)
            missing = RowIdSet([(0, expected_rows)]).difference(self._committed)
            raise TableError(
                f"{have} of {expected_rows} rows have a result (missing e.g. {list(missing)[:5]}); "
                f"partial results are kept in {self.parts_dir}: re-run the job to finish"
            )
        if not self.finished or any(p.fmt is None for p in self._parts):
            schema = self._unified_schema()
            out_schema = pa.schema([f for f in schema if f.name != ROW_ID])
            batches = (_select(b, out_schema) for b in self._merged_batches(schema))
            if self.format == "parquet":
                _write_parquet(self.path, out_schema, batches)
            elif self.format == "jsonl":
                _write_jsonl(self.path, batches)
            else:
                _write_csv(self.path, out_schema, batches)
            if self._committed == RowIdSet([(0, len(self._committed))]):  # row ids are positions
                self._write_done_file(out_schema)
        remove_dir(self.parts_dir)  # still locked: a job starting now waits for a new directory
        self._closed = True
        self._unlock()
        fsync_dir(self.path.parent)
        return self.path

    def close(self) -> None:
        if not self._closed:
            self._stop_flusher()
            try:
                self.flush()
            finally:
                self._closed = True
                self._unlock()

    def _unified_schema(self) -> pa.Schema:
        """One schema for all parts: types unified, conflicting types fall back to text."""
        types: dict[str, list[pa.DataType]] = {}
        if self._part_schema is not None:
            for f in self._part_schema:
                types[f.name] = []
        for part in self._parts:
            for f in part.schema:
                types.setdefault(f.name, []).append(f.type)
        for name in (*self.result_columns, ERROR_COLUMN, ROW_ID):  # always present, at the end
            types[name] = types.pop(name, [])
        fields = []
        for name, seen in types.items():
            if name == ROW_ID:
                fields.append(pa.field(name, pa.int64()))
                continue
            known = [t for t in dict.fromkeys(seen) if not pa.types.is_null(t)]
            if not known:
                if self._part_schema is not None and name in self._part_schema.names:
                    t = self._part_schema.field(name).type
                else:
                    t = pa.string() if name in self._reserved or not seen else pa.null()
            elif len(known) == 1:
                t = known[0]
            else:
                try:
                    t = (
                        pa.unify_schemas(
                            [pa.schema([(name, k)]) for k in known], promote_options="permissive"
                        )
                        .field(name)
                        .type
                    )
                except (pa.ArrowException, TypeError):
                    t = pa.string()
            fields.append(pa.field(name, t))
        return pa.schema(fields)

    def _merged_batches(self, schema: pa.Schema) -> Iterator[pa.RecordBatch]:
        """All part rows in row-id order, conformed to ``schema``, in bounded memory."""
        parts = sorted(self._parts, key=lambda p: (p.first, p.seq))
        i = 0
        while i < len(parts):  # clusters of parts whose id ranges overlap
            j, last = i + 1, parts[i].last
            while j < len(parts) and parts[j].first <= last:
                last = max(last, parts[j].last)
                j += 1
            if j == i + 1:  # the usual case: a contiguous run, copied batch by batch
                yield from _part_batches(parts[i], schema)
            else:
                yield from _merge_rows(self._compacted(parts[i:j], schema), schema)
            i = j

    def _compacted(self, parts: list[_Part], schema: pa.Schema) -> list[_Part]:
        """Overlapping ``parts`` merged in groups of consecutive writes until at most MERGE_FAN_IN
        are left, so that the final merge holds few files open and few rows in memory however many
        parts a long job wrote out of order. A merged part takes the newest seq of its group."""
        while len(parts) > MERGE_FAN_IN:
            by_seq = sorted(parts, key=lambda p: p.seq)
            parts = []
            for k in range(0, len(by_seq), MERGE_FAN_IN):
                group = sorted(by_seq[k : k + MERGE_FAN_IN], key=lambda p: p.first)
                seq = max(p.seq for p in group)
                path = self.parts_dir / f"merged-{seq:08d}-{len(group)}.arrow"
                _write_ipc(path, schema, _merge_rows(group, schema))
                first, last = min(p.first for p in group), max(p.last for p in group)
                parts.append(_Part(seq, path, first, last, RowIdSet(), RowIdSet(), schema))
            parts.sort(key=lambda p: p.first)
        return parts


def _flush_when_due(ref: weakref.ref[PartsSink], mutex: threading.Condition) -> None:
    """A PartsSink's flush thread: commits its buffered rows when due (see ``PartsSink._flush_due``)
    however long the job goes without writing. Ends when the sink stops or is gone."""
    with mutex:
        while True:
            sink = ref()
            if sink is None or sink._stopping or sink._flush_error is not None:
                return
            due = sink._flush_due() if sink._buffer else None
            if due is not None and due <= time.monotonic():
                try:
                    sink._flush_locked()
                except Exception as exc:  # e.g. a full disk: the job's next write raises it
                    sink._flush_error = exc
                continue
            del sink
            if ref() is None:  # dropped just now, in this thread
                return
            mutex.wait(None if due is None else due - time.monotonic())


def _approx_bytes(value: Any) -> int:
    """Rough memory of a buffered row (or value): its strings and bytes, plus 16 per other value."""
    if isinstance(value, (str, bytes, bytearray)):
        return 49 + len(value)
    if isinstance(value, Mapping):
        return 64 + sum(_approx_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return 56 + sum(_approx_bytes(v) for v in value)
    return 16


def _write_ipc(path: Path, schema: pa.Schema, batches: Iterable[pa.RecordBatch]) -> None:
    options = pa.ipc.IpcWriteOptions(compression="lz4" if pa.Codec.is_available("lz4_frame") else None)
    with atomic_path(path) as tmp:
        with pa.OSFile(str(tmp), "wb") as f, pa.ipc.new_file(f, schema, options=options) as w:
            for batch in batches:
                w.write_batch(batch)


def _part_batches(part: _Part, schema: pa.Schema) -> Iterator[pa.RecordBatch]:
    batches = _ipc_batches(part.path) if part.fmt is None else _output_batches(part)
    for batch in batches:
        yield _conform(batch, schema)


def _ipc_batches(path: Path) -> Iterator[pa.RecordBatch]:
    with pa.OSFile(str(path)) as source:
        reader = pa.ipc.open_file(source)
        for k in range(reader.num_record_batches):
            yield reader.get_batch(k)


def _output_batches(part: _Part) -> Iterator[pa.RecordBatch]:
    """The rows of a finished job's output with their row ids (its row order), read as ``part.schema``
    where the format keeps types (CSV is read as text, JSON values that do not fit as they come)."""
    next_id = 0
    for batch in _read_output(part):
        ids = pa.array(range(next_id, next_id + batch.num_rows), pa.int64())
        next_id += batch.num_rows
        yield pa.RecordBatch.from_arrays([*batch.columns, ids], names=[*batch.schema.names, ROW_ID])


def _read_output(part: _Part) -> Iterator[pa.RecordBatch]:
    if part.fmt == "parquet":
        with pq.ParquetFile(part.path) as f:
            yield from f.iter_batches(batch_size=1024)
    elif part.fmt == "csv":
        with pacsv.open_csv(
            part.path,
            read_options=pacsv.ReadOptions(use_threads=False, block_size=CSV_BLOCK_BYTES),
            parse_options=pacsv.ParseOptions(newlines_in_values=True),
            convert_options=pacsv.ConvertOptions(column_types=part.schema),
        ) as reader:
            yield from reader
    else:
        with open(part.path, "rb") as f:
            while lines := list(itertools.islice(f, 1024)):
                rows = [json.loads(line) for line in lines]
                try:
                    yield pa.RecordBatch.from_pylist(rows, schema=part.schema)
                except (pa.ArrowException, TypeError, ValueError, OverflowError):
                    arrays = [_infer_array([r.get(n) for r in rows]) for n in part.schema.names]
                    yield pa.RecordBatch.from_arrays(arrays, names=part.schema.names)


def _merge_rows(parts: list[_Part], schema: pa.Schema, chunk: int = 1024) -> Iterator[pa.RecordBatch]:
    """k-way merge of overlapping parts; a part is opened when its first row is due.

    For an id in several parts the newest part (highest seq) wins.
    """

    def rows(part: _Part) -> Iterator[dict[str, Any]]:
        for batch in _part_batches(part, schema):
            yield from batch.to_pylist()

    heap: list[tuple[int, int, dict[str, Any], Iterator[dict[str, Any]]]] = []
    pending = list(parts)  # sorted by first id
    out: list[dict[str, Any]] = []
    last_id = -1
    while heap or pending:
        while pending and (not heap or pending[0].first <= heap[0][0]):
            part = pending.pop(0)
            it = rows(part)
            first = next(it, None)
            if first is not None:
                heapq.heappush(heap, (first[ROW_ID], -part.seq, first, it))
        if not heap:
            continue
        row_id, neg_seq, row, it = heapq.heappop(heap)
        if row_id != last_id:
            out.append(row)
            last_id = row_id
            if len(out) >= chunk:
                yield pa.RecordBatch.from_pylist(out, schema=schema)
                out = []
        nxt = next(it, None)
        if nxt is not None:
            heapq.heappush(heap, (nxt[ROW_ID], neg_seq, nxt, it))
    if out:
        yield pa.RecordBatch.from_pylist(out, schema=schema)


def _conform(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """``batch`` with exactly ``schema``'s columns and types (missing columns are null)."""
    if batch.schema.remove_metadata() == schema:
        return pa.RecordBatch.from_arrays(batch.columns, schema=schema)
    arrays = []
    for field in schema:
        idx = batch.schema.get_field_index(field.name)
        if idx < 0:
            arrays.append(pa.nulls(batch.num_rows, field.type))
            continue
        arr = batch.column(idx)
        if arr.type != field.type:
            try:
                if pa.types.is_string(field.type) and (
                    pa.types.is_nested(arr.type) or pa.types.is_binary(arr.type)
                ):
                    raise pa.ArrowNotImplementedError("as JSON text")
                arr = arr.cast(field.type)
            except (pa.ArrowException, TypeError):
                if not pa.types.is_string(field.type):
                    raise
                arr = pa.array([_to_text(v) for v in arr.to_pylist()], pa.string())
        arrays.append(arr)
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def _select(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays([batch.column(f.name) for f in schema], schema=schema)


def _write_parquet(path: Path, schema: pa.Schema, batches: Iterable[pa.RecordBatch]) -> None:
    with atomic_path(path) as tmp:
        writer = pq.ParquetWriter(str(tmp), schema)
        try:
            group: list[pa.RecordBatch] = []
            rows = nbytes = 0
            for batch in batches:
                group.append(batch)
                rows += batch.num_rows
                nbytes += batch.nbytes
                if rows >= ROW_GROUP_ROWS or nbytes >= ROW_GROUP_BYTES:
                    writer.write_table(pa.Table.from_batches(group, schema), row_group_size=rows)
                    group, rows, nbytes = [], 0, 0
            if group:
                writer.write_table(pa.Table.from_batches(group, schema), row_group_size=rows)
        finally:
            writer.close()


def _write_jsonl(path: Path, batches: Iterable[pa.RecordBatch]) -> None:
    with atomic_open(path, "w", encoding="utf-8", newline="\n") as f:
        for batch in batches:
            f.writelines(
                json.dumps(row, ensure_ascii=False, default=_json_default) + "\n" for row in batch.to_pylist()
            )


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        return value
    return _to_text(value)


def _write_csv(path: Path, schema: pa.Schema, batches: Iterable[pa.RecordBatch]) -> None:
    with atomic_open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(schema.names)
        for batch in batches:
            cols = [[_csv_value(v) for v in col.to_pylist()] for col in batch.columns]
            writer.writerows(zip(*cols, strict=True))
