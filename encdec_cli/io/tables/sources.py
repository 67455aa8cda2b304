"""Table input: :class:`TableSource` (the rows of an input, streamed in bounded batches), the checks
that turn an unusable cell into an error row, and the Parquet and CSV readers. The line-based
readers (JSONL, a JSON array, TXT, stdin) are in ``line_sources``; ``open_table`` (the package's
face) picks the reader from the extension.

A row whose text is null, empty, not UTF-8 or not a string (or a malformed CSV row, an unreadable
Parquet row group) is still yielded, with ``error`` set, so that the job can record it and go on.
A source opened ``raw`` (an audio column: bytes, a path, a struct) checks no cell and gives no
text: the caller reads the value from ``Row.record`` and judges it; only rows that cannot be read
at all are error rows.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Generator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from encdec_cli.io.tables.base import CSV_BLOCK_BYTES, Row, TableError

MAX_QUOTED_LINES = 1000  # a quoted CSV field over more lines is taken for an unclosed quote
PARQUET_READ_BUFFER = 1 << 20  # read column chunks through a buffer, not whole (bounded memory)

_SURROGATE = re.compile("[\ud800-\udfff]")
_TEXT_TYPES = (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary, pa.types.is_large_binary)


def text_or_error(value: Any, column: str) -> tuple[str | None, str | None]:
    """(text, None) if ``value`` is usable text, else (None, message)."""
    if value is None:
        return None, f"column '{column}' is null"
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            return None, f"column '{column}' is not valid UTF-8 ({describe_decode_error(exc)})"
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


def fix_surrogates(value: Any) -> Any:
    """``value`` with lone surrogates in its strings (also nested) replaced by U+FFFD, so that it can
    be written as UTF-8."""
    if isinstance(value, str):
        return value if _lone_surrogate(value) is None else _SURROGATE.sub("\ufffd", value)
    if isinstance(value, list):
        return [fix_surrogates(v) for v in value]
    if isinstance(value, dict):
        return {fix_surrogates(k): fix_surrogates(v) for k, v in value.items()}
    return value


def describe_decode_error(exc: UnicodeDecodeError) -> str:
    """Where bytes are not UTF-8, for an error row's message."""
    return f"byte 0x{exc.object[exc.start]:02x} at position {exc.start}"


def decode_lenient(value: Any) -> Any:
    """Bytes -> str for a record value, replacing invalid UTF-8; other values unchanged."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


class TableSource:
    """Rows of an input table, streamed in batches of at most ``batch_rows`` rows.

    Attributes: ``path`` (``"-"`` for stdin), ``format`` ("parquet" | "jsonl" | "csv" |
    "txt"), ``column`` (the text column; any column in a source opened ``raw``), ``columns``
    (input column names; for JSONL those of the first object), ``arrow_schema`` (input column
    types when the format has them, else None: pass it to :func:`open_sink`), ``num_rows`` (known
    up front for Parquet, else None) and ``rows_read`` (rows yielded so far).
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


def missing_column(column: str, where: str, columns: Sequence[str]) -> TableError:
    """The error for an input without the text column, listing the columns it has."""
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


def open_parquet(
    path: Path, column: str, batch_rows: int, raw: bool = False, select: Sequence[str] | None = None
) -> TableSource:
    """A Parquet file, read a row group at a time through a small buffer (bounded memory); the
    column must have a string type unless ``raw``. ``select``: read only these of its columns (and
    ``column``). An unreadable row group becomes error rows."""
    try:
        pf = pq.ParquetFile(path, buffer_size=PARQUET_READ_BUFFER, pre_buffer=False)
        schema = pf.schema_arrow
    except (pa.ArrowException, OSError) as exc:
        raise TableError(
            f"cannot read {path} as Parquet ({exc}); is the file complete and not corrupt?"
        ) from exc
    try:
        schema, read = check_column(schema, column, str(path), raw, select)
    except TableError:
        pf.close()
        raise

    def batches() -> Iterator[list[Row]]:
        next_id = 0
        for rg in range(pf.num_row_groups):
            rg_rows = pf.metadata.row_group(rg).num_rows
            done = 0
            try:
                for batch in pf.iter_batches(
                    batch_size=batch_rows, row_groups=[rg], columns=read, use_threads=False
                ):
                    rows = arrow_batch_rows(batch, column, next_id, raw)
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


def check_column(
    schema: pa.Schema, column: str, where: str, raw: bool, select: Sequence[str] | None
) -> tuple[pa.Schema, list[str] | None]:
    """(the schema of the columns read, their names or None for all) for an Arrow-typed input;
    raises :class:`TableError` when ``column`` is missing or (unless ``raw``) not text."""
    if column not in schema.names:
        raise missing_column(column, where, schema.names)
    ctype = schema.field(column).type
    if not raw and not _is_text_type(ctype):
        raise TableError(f"column {column!r} of {where} has type {ctype}; expected a text (string) column")
    if select is None:
        return schema, None
    read = [n for n in schema.names if n == column or n in select]
    return pa.schema([schema.field(n) for n in read], metadata=schema.metadata), read


def arrow_batch_rows(batch: pa.RecordBatch, column: str, first_id: int, raw: bool = False) -> list[Row]:
    """The rows of an Arrow record batch: every cell as a Python value (invalid UTF-8 in a string
    column replaced), the text of ``column`` checked unless ``raw``."""
    names = batch.schema.names
    values: list[list[Any]] = []
    text_values: list[Any] = []
    for name, arr in zip(names, batch.columns, strict=True):
        try:
            col = arr.to_pylist()
            raw_col = col
        except (UnicodeDecodeError, pa.ArrowException):  # invalid UTF-8 in a string column
            raw_col = arr.cast(pa.binary() if not pa.types.is_large_string(arr.type) else pa.large_binary())
            raw_col = raw_col.to_pylist()
            col = [decode_lenient(v) for v in raw_col]
        values.append(col)
        if name == column:
            text_values = raw_col
    rows = []
    for i, vals in enumerate(zip(*values, strict=True)):
        text, error = (None, None) if raw else text_or_error(text_values[i], column)
        rows.append(Row(first_id + i, text, dict(zip(names, vals, strict=True)), error))
    return rows


# -- CSV ------------------------------------------------------------------------------
def open_csv(path: Path, column: str, batch_rows: int, raw: bool = False) -> TableSource:
    """A CSV file with a header line, read in blocks, every column as bytes (no type guessing).
    A malformed row becomes an error row; an unclosed quote is refused (see ``_scan_csv``).
    ``raw``: the column's cells are not checked (a path column)."""
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
        raise missing_column(column, str(path), names)
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
                    rows = _csv_rows(batch.slice(start, batch_rows), names, column, next_id, raw)
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


def _csv_rows(batch: pa.RecordBatch, names: list[str], column: str, first_id: int, raw: bool) -> list[Row]:
    raw_cols = [arr.to_pylist() for arr in batch.columns]
    text_col = raw_cols[names.index(column)]
    rows = []
    for i, vals in enumerate(zip(*raw_cols, strict=True)):
        text, error = (None, None) if raw else text_or_error(text_col[i], column)
        record = {n: decode_lenient(v) for n, v in zip(names, vals, strict=True)}
        rows.append(Row(first_id + i, text, record, error))
    return rows
