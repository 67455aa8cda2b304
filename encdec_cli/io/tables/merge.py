"""The merge of a file output's parts into the output, in row order and bounded memory. Parts whose
row-id ranges are disjoint (rows finished in order) are copied batch by batch; overlapping ones (rows
finished out of order, retried rows: the newest part wins) are merged row by row, in rounds of at
most ``MERGE_FAN_IN`` parts. The output, Parquet, JSON Lines or CSV, is committed atomically."""

from __future__ import annotations

import csv
import heapq
import itertools
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from encdec_cli.io.atomic import atomic_open, atomic_path
from encdec_cli.io.tables.base import (
    CSV_BLOCK_BYTES,
    ERROR_COLUMN,
    ROW_ID,
    infer_array,
    json_default,
    to_text,
)
from encdec_cli.io.tables.parts import Part, PartsDir, ipc_batches, write_ipc
from encdec_cli.io.tables.rowids import RowIdSet

MERGE_FAN_IN = 64  # finalize merges at most this many overlapping parts at once (more: in rounds)
ROW_GROUP_ROWS = 65_536  # Parquet output row group: at most this many rows ...
ROW_GROUP_BYTES = 8 << 20  # ... or this many bytes of Arrow data (bounds the writer's memory)


def write_output(
    parts_dir: PartsDir, part_schema: pa.Schema | None, result_columns: Sequence[str]
) -> pa.Schema:
    """Write the rows of all parts of ``parts_dir`` in row order to its output, in its format (see
    :func:`unified_schema` for the two other arguments); returns the output's schema."""
    schema = unified_schema(parts_dir.parts, part_schema, result_columns)
    out_schema = pa.schema([f for f in schema if f.name != ROW_ID])
    batches = (
        pa.RecordBatch.from_arrays([b.column(f.name) for f in out_schema], schema=out_schema)
        for b in _merged_batches(parts_dir.parts, schema, parts_dir.dir)
    )
    if parts_dir.format == "parquet":
        _write_parquet(parts_dir.path, out_schema, batches)
    elif parts_dir.format == "jsonl":
        _write_jsonl(parts_dir.path, batches)
    else:
        _write_csv(parts_dir.path, out_schema, batches)
    return out_schema


def unified_schema(
    parts: list[Part], part_schema: pa.Schema | None, result_columns: Sequence[str]
) -> pa.Schema:
    """One schema for all ``parts``: types unified, conflicting types fall back to text. A column of
    ``part_schema`` (the input's types, if known) keeps its type where the parts hold only nulls."""
    reserved = (*result_columns, ERROR_COLUMN, ROW_ID)
    types: dict[str, list[pa.DataType]] = {}
    if part_schema is not None:
        for f in part_schema:
            types[f.name] = []
    for part in parts:
        for f in part.schema:
            types.setdefault(f.name, []).append(f.type)
    for name in reserved:  # always present, at the end
        types[name] = types.pop(name, [])
    fields = []
    for name, seen in types.items():
        if name == ROW_ID:
            fields.append(pa.field(name, pa.int64()))
            continue
        known = [t for t in dict.fromkeys(seen) if not pa.types.is_null(t)]
        if not known:
            if part_schema is not None and name in part_schema.names:
                t = part_schema.field(name).type
            else:
                t = pa.string() if name in reserved or not seen else pa.null()
        elif len(known) == 1:
            t = known[0]
        else:
            try:
                t = (
                    pa.unify_schemas([pa.schema([(name, k)]) for k in known], promote_options="permissive")
                    .field(name)
                    .type
                )
            except (pa.ArrowException, TypeError):
                t = pa.string()
        fields.append(pa.field(name, t))
    return pa.schema(fields)


def _merged_batches(parts: list[Part], schema: pa.Schema, work_dir: Path) -> Iterator[pa.RecordBatch]:
    """All rows of ``parts`` in row-id order, conformed to ``schema``, in bounded memory."""
    parts = sorted(parts, key=lambda p: (p.first, p.seq))
    i = 0
    while i < len(parts):  # clusters of parts whose id ranges overlap
        j, last = i + 1, parts[i].last
        while j < len(parts) and parts[j].first <= last:
            last = max(last, parts[j].last)
            j += 1
        if j == i + 1:  # the usual case: a contiguous run, copied batch by batch
            yield from _part_batches(parts[i], schema)
        else:
            yield from _merge_rows(_compacted(parts[i:j], schema, work_dir), schema)
        i = j


def _compacted(parts: list[Part], schema: pa.Schema, work_dir: Path) -> list[Part]:
    """Overlapping ``parts`` merged (into files in ``work_dir``) in groups of consecutive writes until
    at most MERGE_FAN_IN are left, so that the final merge holds few files open and few rows in memory
    however many parts a long job wrote out of order. A merged part takes the newest seq of its group."""
    while len(parts) > MERGE_FAN_IN:
        by_seq = sorted(parts, key=lambda p: p.seq)
        parts = []
        for k in range(0, len(by_seq), MERGE_FAN_IN):
            group = sorted(by_seq[k : k + MERGE_FAN_IN], key=lambda p: p.first)
            seq = max(p.seq for p in group)
            path = work_dir / f"merged-{seq:08d}-{len(group)}.arrow"
            write_ipc(path, schema, _merge_rows(group, schema))
            first, last = min(p.first for p in group), max(p.last for p in group)
            parts.append(Part(seq, path, first, last, RowIdSet(), RowIdSet(), schema))
        parts.sort(key=lambda p: p.first)
    return parts


def _part_batches(part: Part, schema: pa.Schema) -> Iterator[pa.RecordBatch]:
    """The rows of one part, with its row ids, conformed to ``schema``."""
    batches = ipc_batches(part.path) if part.fmt is None else _output_batches(part)
    for batch in batches:
        yield _conform(batch, schema)


def _output_batches(part: Part) -> Iterator[pa.RecordBatch]:
    """The rows of a finished job's output with their row ids (its row order), read as ``part.schema``
    where the format keeps types (CSV is read as text, JSON values that do not fit as they come)."""
    next_id = 0
    for batch in _read_output(part):
        ids = pa.array(range(next_id, next_id + batch.num_rows), pa.int64())
        next_id += batch.num_rows
        yield pa.RecordBatch.from_arrays([*batch.columns, ids], names=[*batch.schema.names, ROW_ID])


def _read_output(part: Part) -> Iterator[pa.RecordBatch]:
    """The rows of a finished job's output file, a batch at a time."""
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
                    arrays = [infer_array([r.get(n) for r in rows]) for n in part.schema.names]
                    yield pa.RecordBatch.from_arrays(arrays, names=part.schema.names)


def _merge_rows(parts: list[Part], schema: pa.Schema, chunk: int = 1024) -> Iterator[pa.RecordBatch]:
    """k-way merge of overlapping parts; a part is opened when its first row is due.

    For an id in several parts the newest part (highest seq) wins.
    """

    def rows(part: Part) -> Iterator[dict[str, Any]]:
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
                arr = pa.array([to_text(v) for v in arr.to_pylist()], pa.string())
        arrays.append(arr)
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def _write_parquet(path: Path, schema: pa.Schema, batches: Iterable[pa.RecordBatch]) -> None:
    """Commit ``batches`` as Parquet; row groups of at most ROW_GROUP_ROWS rows or ROW_GROUP_BYTES
    (the writer holds one row group in memory)."""
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
    """Commit ``batches`` as JSON Lines (UTF-8, not ASCII-escaped)."""
    with atomic_open(path, "w", encoding="utf-8", newline="\n") as f:
        for batch in batches:
            f.writelines(
                json.dumps(row, ensure_ascii=False, default=json_default) + "\n" for row in batch.to_pylist()
            )


def _csv_value(value: Any) -> Any:
    """A value as ``csv.writer`` should write it: null as empty, booleans lowercase, strings and
    numbers as they are, other values as JSON text."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        return value
    return to_text(value)


def _write_csv(path: Path, schema: pa.Schema, batches: Iterable[pa.RecordBatch]) -> None:
    """Commit ``batches`` as CSV with a header line."""
    with atomic_open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(schema.names)
        for batch in batches:
            cols = [[_csv_value(v) for v in col.to_pylist()] for col in batch.columns]
            writer.writerows(zip(*cols, strict=True))
