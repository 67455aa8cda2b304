"""The resume state of a file output, on disk beside the output ``<name>``: the hidden directory
``.<name>.parts/`` (a lock, ``job.json`` naming the job, and numbered Arrow IPC part files of finished
rows, each with its row-id ranges in its schema metadata) and, once the job is done,
``.<name>.done.json`` (the job, its failed rows, and the output's size and mtime). Each file is
committed atomically, so a crash at any point leaves a state that a re-run can resume from."""

from __future__ import annotations

import base64
import json
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pyarrow as pa

from encdec_cli.io.atomic import atomic_path, atomic_write_text, remove_dir, remove_stale_temps
from encdec_cli.io.tables.base import ERROR_COLUMN, ROW_ID, TableError
from encdec_cli.io.tables.rowids import RowIdSet, id_runs

try:  # advisory lock so two jobs cannot write one output; absent on Windows
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

PART_META_KEY = b"encdec.part"  # part schema metadata: row-id intervals (ok / error)
JOB_FILE = "job.json"  # parts-directory state: which job these parts belong to
DONE_SUFFIX = ".done.json"  # .<output name>.done.json beside the output: the job finished


@dataclass
class Part:
    """Finished rows in one file: a part file, or the output of a finished run of the job."""

    seq: int  # write order; for a row in several parts, the highest seq wins
    path: Path
    first: int  # smallest row id
    last: int  # largest row id
    ok: RowIdSet
    err: RowIdSet
    schema: pa.Schema
    fmt: str | None = None  # None: an Arrow IPC part file; else the format of a finished job's output


def _read_part_info(path: Path) -> Part:
    """A part file's row ids, from its schema metadata (its rows are not read)."""
    with pa.OSFile(str(path)) as source:
        schema = pa.ipc.open_file(source).schema
    meta = json.loads((schema.metadata or {})[PART_META_KEY])
    return Part(
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


def write_ipc(path: Path, schema: pa.Schema, batches: Iterable[pa.RecordBatch]) -> None:
    """Commit ``batches`` to ``path`` as an Arrow IPC file, atomically (LZ4-compressed if available)."""
    options = pa.ipc.IpcWriteOptions(compression="lz4" if pa.Codec.is_available("lz4_frame") else None)
    with atomic_path(path) as tmp:
        with pa.OSFile(str(tmp), "wb") as f, pa.ipc.new_file(f, schema, options=options) as w:
            for batch in batches:
                w.write_batch(batch)


def ipc_batches(path: Path) -> Iterator[pa.RecordBatch]:
    """The record batches of an Arrow IPC file, read one at a time (bounded memory)."""
    with pa.OSFile(str(path)) as source:
        reader = pa.ipc.open_file(source)
        for k in range(reader.num_record_batches):
            yield reader.get_batch(k)


class PartsDir:
    """The parts directory of the output ``path`` (see the module docstring), locked by this job.

    Opening takes the lock (:class:`TableError` if another job holds it), checks that the parts
    there are this job's (same ``job_key``, format and ``result_columns``; else :class:`TableError`),
    reads their row-id ranges (an unreadable part is set aside with a warning: its rows run again)
    and, with ``resume``, takes the output of an earlier finished run of the job as the first part
    (``finished``). Without ``resume`` it discards the parts and the done file first.

    The ranks of a torchrun job (``writer`` = (rank, world size)) share the directory: each holds a
    shared lock and names its parts ``part-SEQ-rRANK.arrow``, with sequence numbers of its own (rank
    r takes every world-th number after the parts it found), so none clobbers another's; rank 0
    opens first (it alone discards, without ``resume``) and, once all are done, reads the others'
    parts (:meth:`adopt_new_parts`) and merges.
    """

    def __init__(
        self,
        path: Path,
        fmt: str,
        result_columns: Sequence[str],
        job_key: str | None,
        resume: bool,
        writer: tuple[int, int] | None = None,
    ) -> None:
        self.path = path
        self.writer = writer
        self.format = fmt
        self.dir = path.with_name(f".{path.name}.parts")
        self.done_file = path.with_name(f".{path.name}{DONE_SUFFIX}")
        self.state = {"version": 1, "job_key": job_key, "format": fmt, "result_columns": list(result_columns)}
        self.parts: list[Part] = []  # in write order (seq)
        self.warnings: list[str] = []
        self.finished = False  # an earlier run of this job wrote its whole output
        self._lock_file: IO[bytes] | None = None
        # a torchrun rank other than 0 opens after rank 0 has cleaned up, alongside the others:
        # it only reads (and writes its own parts)
        self.follower = writer is not None and writer[0] != 0
        self._open(resume)
        if not self.follower:
            remove_stale_temps(path.parent, path.name)  # an output commit a killed run never finished
            remove_stale_temps(path.parent, self.dir.name)  # a parts folder it was removing
        self._next_seq = max((p.seq for p in self.parts), default=-1) + 1
        self._seq_step = 1
        if writer is not None:
            self._next_seq, self._seq_step = self._next_seq + writer[0], writer[1]

    def row_ids(self) -> tuple[RowIdSet, RowIdSet]:
        """The rows in the parts that are fine, and those that failed (a retried row can be in both)."""
        ok, err = RowIdSet(), RowIdSet()
        for part in self.parts:
            ok.update(part.ok)
            err.update(part.err)
        return ok, err

    def write_part(self, rows: list[dict[str, Any]], table: pa.Table) -> Part:
        """Commit ``table``, holding ``rows`` (sorted by row id), as the next part file."""
        ids = [r[ROW_ID] for r in rows]
        ok = id_runs(r[ROW_ID] for r in rows if r[ERROR_COLUMN] is None)
        err = id_runs(r[ROW_ID] for r in rows if r[ERROR_COLUMN] is not None)
        meta = {"first": ids[0], "last": ids[-1], "rows": len(ids), "ok": ok, "err": err}
        table = table.replace_schema_metadata({PART_META_KEY: json.dumps(meta)})
        seq = self._next_seq
        rank = "" if self.writer is None else f"-r{self.writer[0]}"
        path = self.dir / f"part-{seq:08d}{rank}.arrow"
        write_ipc(path, table.schema, table.to_batches(max_chunksize=1024))
        self._next_seq += self._seq_step
        schema = table.schema.remove_metadata()
        part = Part(seq, path, ids[0], ids[-1], RowIdSet(ok), RowIdSet(err), schema)
        self.parts.append(part)
        return part

    def adopt_new_parts(self) -> list[Part]:
        """Read the parts that other writers (torchrun ranks) committed since this one opened; returns
        them (an unreadable one is set aside with a warning, as when opening)."""
        known = {p.path for p in self.parts}
        new = []
        for p in sorted(self.dir.glob("part-*.arrow")):
            if p not in known:
                try:
                    new.append(_read_part_info(p))
                except (pa.ArrowException, OSError, KeyError, ValueError, IndexError) as exc:
                    self.warnings.append(f"ignored unreadable part {p.name} ({exc}); its rows run again")
        self.parts = sorted(self.parts + new, key=lambda p: p.seq)
        return new

    def remove(self) -> None:
        """Delete the directory (the job is done), then release the lock: a job starting meanwhile
        waits, then makes a new directory."""
        remove_dir(self.dir)
        self.unlock()

    def _open(self, resume: bool) -> None:
        """Lock the directory, check or write the job file and read the parts (see the class)."""
        job_file = self.dir / JOB_FILE
        self._lock()  # before touching anything: another job may be using this directory
        if not resume:
            self.done_file.unlink(missing_ok=True)
            for p in self.dir.iterdir():
                if p.name != ".lock":
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
        has_parts = any(p.name.startswith("part-") for p in self.dir.iterdir())
        if job_file.exists() and has_parts:
            try:
                old = json.loads(job_file.read_text("utf-8"))
            except ValueError:
                old = None
            if old != self.state:
                self.unlock()
                raise TableError(
                    f"{self.dir} holds partial results of a different job (input, options or "
                    "output format changed). Re-run with the original settings to finish it, or "
                    "delete that directory (or run without resume) to start over."
                )
        elif not self.follower:  # a new job (or one that crashed before its first part)
            atomic_write_text(job_file, json.dumps(self.state))
        for p in self.dir.iterdir():
            if p.name.startswith(".") and p.name.endswith(".tmp") or p.name.startswith("merged-"):
                if not self.follower:
                    p.unlink()  # from a crash mid-commit or mid-merge
            elif p.name.startswith("part-") and p.suffix == ".arrow":
                try:
                    self.parts.append(_read_part_info(p))
                except (pa.ArrowException, OSError, KeyError, ValueError, IndexError) as exc:
                    self.warnings.append(f"ignored unreadable part {p.name} ({exc}); its rows run again")
                    if not self.follower:
                        p.rename(p.with_name(p.name + ".bad"))
        self.parts.sort(key=lambda p: p.seq)
        if resume:
            self._open_finished_output()

    def _open_finished_output(self) -> None:
        """If an earlier run of this job finished (its done file matches this job and the output is
        as it left it), take that output as the first part: its rows are done, its failed rows known."""
        try:
            done = json.loads(self.done_file.read_text("utf-8"))
            valid = {k: done[k] for k in self.state} == self.state and done["output"] == _stamp(self.path)
            rows, failed = int(done["rows"]), RowIdSet(done["failed"])
            schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(done["schema"])))
        except (OSError, ValueError, KeyError, TypeError, pa.ArrowException):
            valid = False
        if not valid:  # none, another job's, or the output changed since: the job runs again
            if not self.follower:
                self.done_file.unlink(missing_ok=True)
            return
        self.finished = True
        if rows:
            ok = RowIdSet([(0, rows)]).difference(failed)
            self.parts.insert(0, Part(-1, self.path, 0, rows - 1, ok, failed, schema, self.format))

    def write_done_file(self, schema: pa.Schema, rows: int) -> None:
        """Record that the output is complete, with its failed rows, so that a re-run skips the job."""
        ok, err = self.row_ids()
        if self.format == "csv":  # read back as text
            schema = pa.schema([(name, pa.string()) for name in schema.names])
        done = {
            **self.state,
            "rows": rows,
            "failed": err.difference(ok).intervals(),
            "output": _stamp(self.path),
            "schema": base64.b64encode(schema.serialize().to_pybytes()).decode("ascii"),
        }
        atomic_write_text(self.done_file, json.dumps(done))

    def _lock(self) -> None:
        """Create the parts directory and take its lock. A job finishing meanwhile removes the
        directory it locked (with the lock file), so a lock file is used only if it is still there."""
        lock_path = self.dir / ".lock"
        for _ in range(100):
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
                self._lock_file = open(lock_path, "ab")  # noqa: SIM115 - closed by unlock
            except (FileNotFoundError, FileExistsError):  # removed between the two calls, or by them
                continue
            if fcntl is None:
                return
            try:
                mode = fcntl.LOCK_EX if self.writer is None else fcntl.LOCK_SH  # torchrun ranks share it
                fcntl.flock(self._lock_file.fileno(), mode | fcntl.LOCK_NB)
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
                self.unlock()
                raise TableError(f"another encdec job is writing {self.path} right now")
            self.unlock()  # a finished job removed this lock file: take the new one
        raise TableError(f"cannot create and lock {self.dir}")

    def unlock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()  # closing releases the flock
