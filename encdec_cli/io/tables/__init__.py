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
``flush_interval_s`` seconds (see :class:`SinkOptions`). :meth:`PartsSink.finalize` merges
the parts in row order into the output (committed atomically): parts that are disjoint
ranges are copied, overlapping ones (rows finished out of order, retries) merged row by
row, in rounds of at most ``MERGE_FAN_IN`` parts. It then writes ``.<name>.done.json``
beside the output and removes the directory. The parts directory and the done file are
the resume state: a re-run opens the sink, skips ``sink.done_row_ids()`` (all rows of a
finished job) and finishes.

The modules, bottom to top: ``base`` (Row, TableError, shared conversions), ``rowids``
(RowIdSet), ``sources`` and ``line_sources`` (the readers), ``parts`` (part files, the lock, the
done file), ``merge`` (parts -> output), ``sinks``; this face imports them and picks the reader
and the sink.

A job::

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

import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from encdec_cli.io.tables.arrow_sources import dataset_files, is_dataset_dir, open_arrow, open_ipc
from encdec_cli.io.tables.base import ERROR_COLUMN, Row, TableError
from encdec_cli.io.tables.line_sources import open_json, open_jsonl, open_stdin, open_txt
from encdec_cli.io.tables.rowids import RowIdSet
from encdec_cli.io.tables.sinks import PartsSink, SinkOptions, StreamSink, TableSink
from encdec_cli.io.tables.sources import TableSource, open_csv, open_parquet

__all__ = [
    "ERROR_COLUMN",
    "PartsSink",
    "Row",
    "RowIdSet",
    "SinkOptions",
    "StreamSink",
    "TableError",
    "TableSink",
    "TableSource",
    "is_dataset_dir",
    "open_sink",
    "open_table",
    "table_columns",
]


def open_table(
    path_or_dash: str | os.PathLike[str],
    column: str,
    batch_rows: int = 1024,
    *,
    raw: bool = False,
    select: Sequence[str] | None = None,
) -> TableSource:
    """Open an input table for streaming; raises :class:`TableError` if it cannot be used.

    The format comes from the extension: ``.parquet``/``.pq``, ``.jsonl``/``.ndjson``/
    ``.json`` (JSON Lines; a ``.json`` holding one array is read whole up to 64 MiB),
    ``.csv``, ``.txt`` (one item per line, column ``text``), ``.arrow`` (Arrow IPC). A folder
    written by Hugging Face ``datasets``' ``save_to_disk`` is read as its Arrow files, in order.
    ``-`` reads stdin: JSON Lines if the first non-empty line is a JSON object, else one item
    per line.
    A missing ``column`` raises, listing the columns there are.

    ``raw``: ``column`` may hold any type (audio bytes, paths, ``{bytes, path}`` structs); its cells
    are not checked and rows carry no ``text``: read the value from ``Row.record``. ``select``: read
    only these columns (and ``column``) where the format can skip the others (Parquet).
    """
    if batch_rows < 1:
        raise ValueError("batch_rows must be >= 1")
    if str(path_or_dash) == "-":
        return open_stdin(column, batch_rows)
    path = Path(path_or_dash)
    if is_dataset_dir(path):
        return open_arrow(path, column, batch_rows, raw, select)
    if not path.is_file():
        raise TableError(f"input {path} does not exist or is not a file (nor a save_to_disk folder)")
    ext = path.suffix.lower()
    if ext == ".arrow":
        return open_arrow(path, column, batch_rows, raw, select)
    if ext in (".parquet", ".pq"):
        return open_parquet(path, column, batch_rows, raw, select)
    if ext in (".jsonl", ".ndjson"):
        return open_jsonl(path, column, batch_rows, raw)
    if ext == ".json":
        return open_json(path, column, batch_rows, raw)
    if ext == ".csv":
        return open_csv(path, column, batch_rows, raw)
    if ext == ".txt":
        return open_txt(path, column, batch_rows)
    raise TableError(
        f"cannot tell the format of {path} from its extension; "
        "use .parquet, .arrow, .jsonl, .json, .csv or .txt (or '-' for stdin)"
    )


def table_columns(path: str | os.PathLike[str]) -> list[str] | None:
    """The column names of a typed table (Parquet, Arrow, a ``save_to_disk`` folder) from its schema
    alone, None for other formats; raises :class:`TableError` when it cannot be read."""
    path = Path(path)
    try:
        if is_dataset_dir(path) or path.suffix.lower() == ".arrow":
            with open_ipc(dataset_files(path)[0] if path.is_dir() else path) as reader:
                return list(reader.schema.names)
        if path.suffix.lower() in (".parquet", ".pq"):
            return list(pq.read_schema(path).names)
    except (pa.ArrowException, OSError) as exc:
        raise TableError(f"cannot read {path} ({exc})") from exc
    return None


def open_sink(
    path_or_dash: str | os.PathLike[str],
    fmt: str | None = None,
    options: SinkOptions | None = None,
    **fields: Any,
) -> TableSink:
    """Open the output of a table job, written as ``options`` say (see :class:`SinkOptions`); its
    fields can be given as keywords instead, or to override some of ``options``.

    ``fmt`` is "parquet", "jsonl" or "csv" (default: from the extension); ``-`` writes
    JSON Lines to stdout as soon as each prefix of rows is complete (no resume).
    Temp files of the output left by a killed earlier run are deleted.
    """
    options = replace(options, **fields) if options is not None else SinkOptions(**fields)
    if str(path_or_dash) == "-":
        if fmt not in (None, "jsonl", "json"):
            raise TableError(f"stdout output is JSON Lines only, not {fmt!r}")
        return StreamSink(sys.stdout, options.result_columns)
    path = Path(path_or_dash)
    fmt = (fmt or _format_from_extension(path)).lower()
    if fmt == "json":
        fmt = "jsonl"
    if fmt not in ("parquet", "jsonl", "csv"):
        raise TableError(f"unknown output format {fmt!r}; choose parquet, jsonl or csv")
    return PartsSink(path, fmt, options)


def _format_from_extension(path: Path) -> str:
    ext = path.suffix.lower()
    fmt = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl"}
    fmt[".csv"] = "csv"
    if ext not in fmt:
        raise TableError(
            f"cannot tell the output format of {path}; use .parquet, .jsonl or .csv, or pass a format"
        )
    return fmt[ext]
