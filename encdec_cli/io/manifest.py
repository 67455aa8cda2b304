"""Job manifest: an append-only JSONL log of finished and failed items, for resume.

One line per event, ``{"key", "status": "ok"|"error", "error"?, "outputs"?, "warnings"?, "time"}``;
the last line for a key wins. Each line is flushed and fsynced before the call
returns, so a crash loses at most the line being written; a truncated or otherwise
unreadable line is ignored when the manifest is read back. Keys and paths are str; a non-UTF-8 file
name (surrogateescape) is written \\u-escaped and reads back as the same str.

Typical use (a file job such as transcribe)::

    manifest = Manifest.in_dir(output_dir)
    for path in inputs:
        key = file_key(path)
        if manifest.is_done(key):
            continue
        try:
            outputs = write_transcript(...)      # each output committed atomically
        except Exception as exc:
            manifest.record_error(key, str(exc))
        else:
            manifest.record_ok(key, outputs)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from encdec_cli.io.atomic import fsync_dir, remove_stale_temps
from encdec_cli.io.records import json_line

__all__ = [
    "MANIFEST_NAME",
    "Manifest",
    "ManifestEntry",
    "file_key",
    "fold_rank_manifests",
    "key_input",
    "row_key",
]

MANIFEST_NAME = ".encdec-manifest.jsonl"
RANK_MANIFEST = ".encdec-manifest.rank-{rank}.jsonl"  # a torchrun rank's own manifest (see in_dir)
RANK_MANIFEST_GLOB = ".encdec-manifest.rank-*.jsonl"


def file_key(path: str | os.PathLike[str]) -> str:
    """Identity of an input file: resolved path + size + mtime (ns); changes when the file does.

    Never raises: a path that cannot be stat'ed (missing, a dangling symlink or a symlink loop,
    no permission on a folder) gets a key that says so; reading it fails later, as that item's
    error, and the key changes once the file is there."""
    try:
        resolved = Path(path).resolve()
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop (Python < 3.13)
        resolved = Path(os.path.abspath(path))
    try:
        st = resolved.stat()
    except OSError as e:
        return f"file:{resolved}:unreadable:{e.errno}"
    return f"file:{resolved}:{st.st_size}:{st.st_mtime_ns}"


_FILE_STATE = re.compile(r":(?:\d+|unreadable):-?\d+(?=(?:#\d+)?$)")  # ":size:mtime" of a file key


def key_input(key: str) -> str:
    """The input a key names, without the file's state: ``file:/a/x.wav`` for ``file:/a/x.wav:SIZE:MTIME``,
    ``file:/t.parquet#3`` for the key of row 3 of that table. It stays the same when the file changes."""
    return _FILE_STATE.sub("", key, count=1) if key.startswith("file:") else key


def row_key(row_id: int, text: str | bytes) -> str:
    """Identity of a table row: its row id + a hash of its content."""
    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    return f"row:{row_id}:{hashlib.sha256(data).hexdigest()[:16]}"


@dataclass(frozen=True)
class ManifestEntry:
    """The latest manifest line for one key."""

    key: str
    status: str  # "ok" | "error"
    error: str | None  # message, when status == "error"
    outputs: tuple[str, ...]  # files written for the item, when status == "ok"
    time: float  # unix time of the event
    warnings: tuple[str, ...] = ()  # e.g. the input was truncated (status "ok": done regardless)


class Manifest:
    """Append-only record of which items of a job are done or failed."""

    def __init__(self, path: str | os.PathLike[str], read_also: list[Path] | tuple = ()) -> None:
        """The manifest in the file ``path``, which this object appends to. The entries of the
        manifests ``read_also`` count too (for a key in several files, its newest entry wins)."""
        self.path = Path(path)
        self.skipped_lines = 0  # unreadable lines found on load (e.g. truncated by a crash)
        self._entries: dict[str, ManifestEntry] = {}
        self._file: IO[bytes] | None = None
        self._needs_newline = False  # the file ends in a partial line: start ours on a new one
        self._load(self.path)
        for other in read_also:
            self._load(Path(other), newest=True)

    @classmethod
    def in_dir(cls, directory: str | os.PathLike[str], rank: int | None = None) -> Manifest:
        """The manifest of a job writing into ``directory``. Temp files that an earlier run of a
        job there left when it was killed mid-commit (outputs that never became files) are
        deleted from the directory tree.

        A torchrun job's rank ``rank`` appends to its own manifest there and reads everyone's (the
        folder's manifest and every rank's); rank 0 folds the ranks' manifests into the folder's
        one when the job ends (:func:`fold_rank_manifests`). A job of one process (``rank`` None)
        folds what an interrupted torchrun job left first."""
        directory = Path(directory)
        if directory.is_dir():
            remove_stale_temps(directory, recursive=True)
        if rank is None:
            fold_rank_manifests(directory)
            return cls(directory / MANIFEST_NAME)
        own = directory / RANK_MANIFEST.format(rank=rank)
        others = [
            directory / MANIFEST_NAME,
            *sorted(p for p in directory.glob(RANK_MANIFEST_GLOB) if p != own),
        ]
        return cls(own, read_also=others)

    # -- reading -------------------------------------------------------------------
    def _load(self, path: Path, newest: bool = False) -> None:
        """Read the manifest file ``path``: its last entry of a key wins, or, with ``newest``, the
        key's newest entry of those read so far and this file's."""
        try:
            f = open(path, "rb")  # noqa: SIM115
        except FileNotFoundError:
            return
        with f:
            last = b""
            for raw in f:
                last = raw
                entry = _parse_line(raw)
                if entry is None:
                    self.skipped_lines += raw.strip() != b""
                elif not newest or entry.time >= getattr(self._entries.get(entry.key), "time", 0.0):
                    self._entries[entry.key] = entry
            if path == self.path:
                self._needs_newline = bool(last) and not last.endswith(b"\n")

    def get(self, key: str) -> ManifestEntry | None:
        """The latest entry for ``key``, or None if the item was never recorded."""
        return self._entries.get(key)

    def is_done(self, key: str, check_outputs: bool = True) -> bool:
        """True if ``key`` finished ok (and, with ``check_outputs``, its outputs still exist)."""
        entry = self._entries.get(key)
        if entry is None or entry.status != "ok":
            return False
        return not check_outputs or all(os.path.exists(p) for p in entry.outputs)

    def failed(self, key: str) -> str | None:
        """The error message if the latest record for ``key`` is a failure, else None."""
        entry = self._entries.get(key)
        if entry is None or entry.status != "error":
            return None
        return entry.error or "failed"

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def entries(self) -> list[ManifestEntry]:
        """Latest entry of every key, in first-recorded order."""
        return list(self._entries.values())

    # -- writing -------------------------------------------------------------------
    def record_ok(
        self, key: str, outputs: list[str | os.PathLike[str]] | tuple = (), warnings: list[str] | tuple = ()
    ) -> None:
        """Record that ``key`` finished and wrote ``outputs`` (call after they are committed)."""
        outs = tuple(os.fspath(p) for p in outputs)
        self._append(ManifestEntry(key, "ok", None, outs, time.time(), tuple(warnings)))

    def record_error(self, key: str, message: str) -> None:
        """Record that ``key`` failed with ``message``; a re-run may retry it."""
        self._append(ManifestEntry(key, "error", str(message), (), time.time()))

    def _append(self, entry: ManifestEntry) -> None:
        line: dict[str, Any] = {"key": entry.key, "status": entry.status}
        if entry.error is not None:
            line["error"] = entry.error
        if entry.status == "ok":
            line["outputs"] = list(entry.outputs)
        if entry.warnings:
            line["warnings"] = list(entry.warnings)
        line["time"] = round(entry.time, 3)
        data = json_line(line).encode("utf-8") + b"\n"
        f = self._open()
        if self._needs_newline:
            data = b"\n" + data
            self._needs_newline = False
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
        self._entries[entry.key] = entry

    def _open(self) -> IO[bytes]:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            created = not self.path.exists()
            self._file = open(self.path, "ab")  # noqa: SIM115 - closed by close()
            if created:
                fsync_dir(self.path.parent)
        return self._file

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> Manifest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def fold_rank_manifests(directory: str | os.PathLike[str]) -> None:
    """Append the lines of the torchrun ranks' manifests in ``directory`` to the folder's manifest,
    oldest first, and delete them: one manifest again. A crash in between leaves lines in both,
    which read back the same."""
    directory = Path(directory)
    ranks = sorted(directory.glob(RANK_MANIFEST_GLOB))
    if not ranks:
        return
    lines = []
    for path in ranks:
        for raw in path.read_bytes().splitlines():
            entry = _parse_line(raw)
            if entry is not None:
                lines.append((entry.time, raw.strip()))
    lines.sort(key=lambda t: t[0])
    main = directory / MANIFEST_NAME
    if lines:
        with open(main, "ab") as f:
            if f.tell() and not main.read_bytes().endswith(b"\n"):
                f.write(b"\n")
            f.write(b"".join(raw + b"\n" for _, raw in lines))
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(directory)
    for path in ranks:
        path.unlink(missing_ok=True)
    fsync_dir(directory)


def _parse_line(raw: bytes) -> ManifestEntry | None:
    """One manifest line, or None if it is blank, truncated or not a manifest record."""
    try:
        obj = json.loads(raw)
    except ValueError:  # includes UnicodeDecodeError
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("key"), str):
        return None
    status = obj.get("status")
    if status not in ("ok", "error"):
        return None
    outputs = obj.get("outputs") or ()
    warnings = obj.get("warnings") or ()
    error = obj.get("error")
    return ManifestEntry(
        key=obj["key"],
        status=status,
        error=None if error is None else str(error),
        outputs=tuple(str(p) for p in outputs) if isinstance(outputs, list) else (),
        time=float(obj.get("time", 0.0)) if isinstance(obj.get("time"), (int, float)) else 0.0,
        warnings=tuple(str(w) for w in warnings) if isinstance(warnings, list) else (),
    )
