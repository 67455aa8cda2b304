"""The line-based table readers: JSON Lines, a JSON array, plain text (one item per line) and stdin
(JSON Lines if its first line is a JSON object, else plain text). They read a line at a time, so
memory stays bounded however big the input; only a ``.json`` array is loaded whole (up to
``MAX_JSON_ARRAY_BYTES``). Opened ``raw``, a JSON object's column is not checked: any value (a
path, base64 text, a nested object) is the caller's to judge, a missing key reads as null."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow as pa

from encdec_cli.io.tables.base import Row, TableError
from encdec_cli.io.tables.sources import (
    TableSource,
    describe_decode_error,
    fix_surrogates,
    missing_column,
    text_or_error,
)

MAX_JSON_ARRAY_BYTES = 64 << 20  # a .json array is loaded whole; beyond this, ask for JSONL

# A JSON \uD800-\uDFFF escape: json.loads turns a lone one into a str that cannot be UTF-8 encoded.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _strip_eol(raw: bytes) -> bytes:
    if raw.endswith(b"\n"):
        raw = raw[:-1]
    if raw.endswith(b"\r"):
        raw = raw[:-1]
    return raw


def _jsonl_row(row_id: int, lineno: int, data: bytes, column: str, raw: bool = False) -> Row:
    try:
        line = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Row(row_id, None, None, f"line {lineno} is not valid UTF-8 ({describe_decode_error(exc)})")
    try:
        obj = json.loads(line)
    except ValueError as exc:
        return Row(row_id, None, None, f"line {lineno} is not valid JSON ({exc})")
    surrogates = _SURROGATE_ESCAPE.search(data) is not None
    return _object_row(row_id, f"line {lineno}", obj, column, surrogates, raw)


def _object_row(
    row_id: int, where: str, obj: Any, column: str, surrogates: bool = True, raw: bool = False
) -> Row:
    """A row from one JSON value; ``surrogates``: its text may hold lone surrogates to replace;
    ``raw``: the column's value is not checked (nor required)."""
    if not isinstance(obj, dict):
        return Row(row_id, None, None, f"{where} is a JSON {type(obj).__name__}, expected an object")
    if raw:
        return Row(row_id, None, fix_surrogates(obj) if surrogates else obj, None)
    if column not in obj:
        keys = ", ".join(repr(k) for k in obj) or "(none)"
        return Row(
            row_id,
            None,
            fix_surrogates(obj) if surrogates else obj,
            f"{where} has no column {column!r} (it has {keys})",
        )
    text, error = text_or_error(obj[column], column)
    return Row(row_id, text, fix_surrogates(obj) if surrogates else obj, error)


def _text_row(row_id: int, lineno: int, raw: bytes, column: str) -> Row:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        msg = f"line {lineno} is not valid UTF-8 ({describe_decode_error(exc)})"
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


def open_jsonl(path: Path, column: str, batch_rows: int, raw: bool = False) -> TableSource:
    """JSON Lines, one object per line; its columns are those of the first object."""
    lines = _file_lines(path)
    it = lines()
    try:
        keys = _first_object_keys(it)
    finally:
        it.close()  # type: ignore[attr-defined]
    if keys is not None and column not in keys:
        raise missing_column(column, f"{path} (first JSON object)", keys)
    batches = _line_batches(lines, partial(_jsonl_row, raw=raw), column, batch_rows, skip_blank=True)
    return TableSource(str(path), "jsonl", column, keys or [], None, batches)


def open_json(path: Path, column: str, batch_rows: int, raw: bool = False) -> TableSource:
    """A ``.json`` file: one JSON array of objects (loaded whole, up to MAX_JSON_ARRAY_BYTES), else
    JSON Lines."""
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if not head.startswith(b"["):
        return open_jsonl(path, column, batch_rows, raw)
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
        raise missing_column(column, f"{path} (first JSON object)", keys)

    def batches() -> Iterator[list[Row]]:
        for start in range(0, len(items), batch_rows):
            chunk = items[start : start + batch_rows]
            yield [_object_row(i, f"item {i}", obj, column, raw=raw) for i, obj in enumerate(chunk, start)]

    return TableSource(str(path), "jsonl", column, keys or [], None, batches)


def open_txt(path: Path, column: str, batch_rows: int) -> TableSource:
    """Plain text, one item per line, as column ``text``."""
    if column != "text":
        raise missing_column(column, f"{path} (plain text, one item per line)", ["text"])
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


def open_stdin(column: str, batch_rows: int) -> TableSource:
    """stdin, read once: JSON Lines if its first non-blank line is a JSON object, else plain text."""
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
            raise missing_column(column, "stdin (first JSON object)", keys)
        batches = _line_batches(lines, _jsonl_row, column, batch_rows, skip_blank=True)
        return TableSource("-", "jsonl", column, keys, None, batches, reiterable=False)
    if column != "text":
        raise missing_column(column, "stdin (plain text, one item per line)", ["text"])
    batches = _line_batches(lines, _text_row, column, batch_rows, skip_blank=False)
    schema = pa.schema([("text", pa.string())])
    return TableSource("-", "txt", column, ["text"], schema, batches, reiterable=False)
