"""Table output: sinks take finished rows in any order and write the output in input row order.
:class:`StreamSink` writes JSON Lines to stdout as soon as each prefix of rows is complete;
:class:`PartsSink` writes a file, resumably: it commits the rows written to it as part files (see
``parts``) and, when the job ends, merges them into the output (see ``merge``). How a sink writes is
set by :class:`SinkOptions`; ``open_sink`` (the package's face) picks the sink."""

from __future__ import annotations

import json
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pyarrow as pa

from encdec_cli.io.atomic import fsync_dir
from encdec_cli.io.tables.base import ERROR_COLUMN, ROW_ID, Row, TableError, infer_array, json_default
from encdec_cli.io.tables.merge import write_output
from encdec_cli.io.tables.parts import PartsDir
from encdec_cli.io.tables.rowids import RowIdSet

MAX_BUFFER_BYTES = 64 << 20  # a file sink commits buffered rows beyond about this much text/bytes


@dataclass(frozen=True)
class SinkOptions:
    """How a table job's output is written.

    ``input_schema`` (``TableSource.arrow_schema``) keeps input column types; without it, types are
    inferred from the values. ``result_types`` gives result columns a type other than string (e.g. a
    list of strings). ``job_key`` identifies the job (input + options): parts left by a job with
    another key raise :class:`TableError` instead of being mixed in; the output of a finished run of
    the same job counts as done (its rows are skipped, its failed rows can be retried).
    ``resume=False`` discards both.

    A file sink commits the rows written to it, in whatever order they come, as a part when it holds
    ``part_rows`` rows or about ``max_buffer_bytes`` of their strings and bytes, and at the latest
    ``flush_interval_s`` after the oldest of them was written (a thread commits them then even if
    nothing else is written). What a crash, even SIGKILL, can lose is thus at most ``part_rows`` rows
    and the rows of the last ``flush_interval_s`` seconds.
    """

    result_columns: Sequence[str]  # the columns the job adds to each row
    input_schema: pa.Schema | None = None
    result_types: Mapping[str, pa.DataType] | None = None
    job_key: str | None = None
    resume: bool = True
    part_rows: int = 4096
    max_buffer_bytes: int = MAX_BUFFER_BYTES
    flush_interval_s: float = 30.0
    writer: tuple[int, int] | None = None  # (rank, world size) of a torchrun job's rank (see PartsDir)


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
        self._stream.write(json.dumps(row, ensure_ascii=False, default=json_default) + "\n")
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


class PartsSink(TableSink):
    """File output via a resumable parts directory (see ``parts``), merged by :meth:`finalize`."""

    def __init__(self, path: Path, fmt: str, options: SinkOptions) -> None:
        super().__init__(options.result_columns)
        result_types = dict(options.result_types or {})
        if options.part_rows < 1:
            raise ValueError("part_rows must be >= 1")
        self.path = path
        self.format = fmt
        self.part_rows = options.part_rows
        self.max_buffer_bytes = options.max_buffer_bytes
        self.flush_interval_s = options.flush_interval_s
        self._input_names: list[str] = []
        self._part_schema: pa.Schema | None = None
        if options.input_schema is not None:
            fields = [f for f in options.input_schema.remove_metadata() if f.name not in self._reserved]
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
        self._dir = PartsDir(path, fmt, self.result_columns, options.job_key, options.resume, options.writer)
        self.parts_dir = self._dir.dir
        self.warnings = self._dir.warnings
        self.finished = self._dir.finished
        prev_ok, prev_err = self._dir.row_ids()
        self._committed = RowIdSet()  # ids in any part
        self._committed.update(prev_ok)
        self._committed.update(prev_err)
        self._prev_done = RowIdSet(self._committed.intervals())
        self._prev_failed = prev_err.difference(prev_ok)
        self._flusher = threading.Thread(
            target=_flush_when_due, args=(weakref.ref(self), self._mutex), name="encdec-sink", daemon=True
        )
        self._flusher.start()

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
        """``rows`` as a table: with the input's types when the values fit them, else with types
        inferred from the values; the result columns, ``error`` and the row id at the end."""
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
        arrays = [infer_array([r.get(n) for r in rows]) for n in ordered]
        arrays.append(pa.array([r[ROW_ID] for r in rows], pa.int64()))
        return pa.Table.from_arrays(arrays, names=[*ordered, ROW_ID])

    def _write_part(self, rows: list[dict[str, Any]]) -> None:
        """Commit ``rows`` (sorted by row id) as the next part file."""
        part = self._dir.write_part(rows, self._rows_to_table(rows))
        self._committed.update(part.ok)
        self._committed.update(part.err)

    def adopt_new_parts(self) -> None:
        """Take in the rows that other writers (the other ranks of a torchrun job, all done now)
        committed into this output's parts folder, so that :meth:`finalize` merges them too."""
        with self._mutex:
            for part in self._dir.adopt_new_parts():
                self._committed.update(part.ok)
                self._committed.update(part.err)

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
        if not self.finished or any(p.fmt is None for p in self._dir.parts):
            out_schema = write_output(self._dir, self._part_schema, self.result_columns)
            if self._committed == RowIdSet([(0, len(self._committed))]):  # row ids are positions
                self._dir.write_done_file(out_schema, len(self._committed))
        self._dir.remove()  # the output is committed: its parts are no longer needed
        self._closed = True
        fsync_dir(self.path.parent)
        return self.path

    def close(self) -> None:
        if not self._closed:
            self._stop_flusher()
            try:
                self.flush()
            finally:
                self._closed = True
                self._dir.unlock()


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
