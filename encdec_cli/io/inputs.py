"""Audio inputs of ``encdec transcribe``: what INPUTS name, planned into named items, and each
item's audio in windows.

INPUTS are audio files, folders (searched recursively), ``-`` (paths on stdin) or Parquet/JSONL
tables with an audio column. :func:`check_inputs` validates them once, up front (it never walks
folders); :func:`plan_inputs` expands them lazily into :class:`AudioItem` s with unique output names.

Output names mirror the inputs' paths relative to their common folder, without the audio extension
(``a/x.wav`` and ``b/x.wav`` -> ``a/x.txt``, ``b/x.txt``). Audio files beside each other that share
a stem keep their extensions (``x.wav`` and ``x.mp3`` -> ``x.wav.txt``, ``x.mp3.txt``); any other
clash, in this run or with an earlier run's outputs in the same folder, gives the later input its
extension, then ``~2``, ``~3``... (in input order, never completion order). A table's rows are
named ``TABLE/ID`` by the ``--id-column`` value, else by the audio's path, else by row number.
"""

from __future__ import annotations

import itertools
import os
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from encdec_cli.errors import UsageError
from encdec_cli.io.audio import AUDIO_EXTENSIONS, Samples, iter_audio_windows, load_audio, split_on_silence
from encdec_cli.io.manifest import Manifest, file_key, key_input
from encdec_cli.io.tables import TableError, is_dataset_dir, open_table, table_columns

TABLE_EXTENSIONS = (".parquet", ".pq", ".arrow", ".jsonl", ".ndjson")
SEARCHED = ", ".join(f".{e}" for e in sorted(AUDIO_EXTENSIONS))


def _is_table(path: str) -> bool:
    """A table input: by its extension, or a folder written by ``datasets``' ``save_to_disk``."""
    return os.path.splitext(path)[1].lower() in TABLE_EXTENSIONS or is_dataset_dir(Path(path))


def _audio_files(directory: str, extensions=AUDIO_EXTENSIONS) -> Iterator[tuple[str, bool]]:
    """(path, whether another file of ``extensions`` beside it has the same stem), recursively, sorted."""
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        audio = sorted(f for f in files if f.rsplit(".", 1)[-1].lower() in extensions and f[0] != ".")
        stems = Counter(os.path.splitext(f)[0] for f in audio)
        for f in audio:
            yield os.path.join(root, f), stems[os.path.splitext(f)[0]] > 1


def check_inputs(
    inputs: list[str],
    audio_column: str = "audio",
    id_column: str | None = None,
    column_flag: str = "--audio-column",
) -> None:
    """Fail fast (UsageError) on INPUTS that do not exist or tables without the audio column (or
    without an ``id_column`` asked for); touches only the named paths, never walks folders."""
    for raw in inputs:
        if raw == "-":
            continue
        p = Path(raw)
        if not p.exists() and not p.is_symlink():
            raise UsageError(f"input {raw!r} does not exist")
        if _is_table(raw):
            _check_table_columns(p, [audio_column, *([id_column] if id_column else [])], column_flag)


def count_files(inputs: list[str], extensions=AUDIO_EXTENSIONS) -> int | None:
    """How many audio items the inputs hold, for the progress bar (names only, no stat); None when
    unknown up front (stdin lists, tables)."""
    n = 0
    for raw in inputs:
        if raw == "-" or _is_table(raw):
            return None
        n += sum(1 for _ in _audio_files(raw, extensions)) if os.path.isdir(raw) else 1
    return n


def _check_table_columns(path: Path, columns: list[str], column_flag: str = "--audio-column") -> None:
    """A readable typed table (Parquet, Arrow, a save_to_disk folder) without a needed column is a
    usage error (an unreadable one fails as its own item when the job reads it)."""
    try:
        names = table_columns(path)
    except TableError:
        return
    for column in columns if names is not None else ():
        if column not in names:
            flag = column_flag if column == columns[0] else "--id-column"
            raise UsageError(f"{path} has no column {column!r}; columns: {', '.join(names)} (see {flag})")


def _safe_name(value: object) -> str | None:
    """``value`` as one file name (path separators replaced), or None when it makes none."""
    if value is None:
        return None
    name = str(value).strip().replace("/", "_").replace("\\", "_").replace("\0", "_")
    try:
        too_long = len(name.encode("utf-8", "surrogateescape")) > 200
    except UnicodeEncodeError:  # a lone surrogate that is no escaped byte
        return None
    return None if too_long or name in ("", ".", "..") else name


class Namer:
    """Unique output names (relative paths without extension): each belongs to one input (a
    manifest key without the file's state, so it stays when the file changes). An input takes the
    first of its candidate names that no other input holds, else the last one with ~2, ~3, ..."""

    def __init__(self, manifest: Manifest | None = None, out_dir: str = "."):
        self._owner: dict[str, str] = {}  # name (case-folded) -> input
        for entry in manifest.entries() if manifest is not None else ():
            for out in entry.outputs[:1]:  # the outputs of one input share their name
                self._owner.setdefault(
                    os.path.splitext(os.path.relpath(out, out_dir))[0].casefold(), key_input(entry.key)
                )

    def claim(self, key: str, candidates: list[str]) -> str:
        owner = key_input(key)
        numbered = (f"{candidates[-1]}~{n}" for n in itertools.count(2))
        return next(
            name
            for name in itertools.chain(candidates, numbered)
            if self._owner.setdefault(name.casefold(), owner) == owner
        )


def _file_names(rel: str, keep_extension: bool) -> list[str]:
    stem = os.path.splitext(rel)[0]
    return [rel] if keep_extension or stem == rel else [stem, rel]


def plan_inputs(
    inputs: list[str],
    audio_column: str = "audio",
    id_column: str | None = None,
    namer: Namer | None = None,
    warnings: list[str] | None = None,
    extensions=AUDIO_EXTENSIONS,
    kind: str = "audio",
) -> Iterator[AudioItem]:
    """Expand INPUTS lazily into named items (``kind`` files of ``extensions``; audio by default): files,
    folders (recursive), '-' (paths on
    stdin), Parquet/JSONL tables (read row by row). Folders are walked as the job goes, so a folder
    of millions of files starts at once and costs no memory in proportion. A folder without audio
    files, or an empty stdin list, adds a message to ``warnings``. The inputs have passed
    :func:`check_inputs`."""
    namer = namer or Namer()
    warnings = [] if warnings is None else warnings
    stdin = (
        [os.fsdecode(p.strip()) for p in sys.stdin.buffer.read().splitlines() if p.strip()]
        if "-" in inputs
        else []
    )
    if "-" in inputs and not stdin:
        warnings.append("no paths on stdin")
    args = [raw for raw in inputs if raw != "-"]
    dirs = [
        os.path.abspath(p) if os.path.isdir(p) and not _is_table(p) else os.path.dirname(os.path.abspath(p))
        for p in args
    ]
    root = os.path.commonpath(dirs + [os.path.dirname(os.path.abspath(p)) for p in stdin] or [os.getcwd()])

    def rel(path: str) -> str:
        return os.path.relpath(os.path.abspath(path), root)

    listed = {os.path.abspath(p) for p in args + stdin if not os.path.isdir(p) and not _is_table(p)}
    stems = Counter(os.path.splitext(rel(p))[0] for p in listed)  # listed files that share a name

    def file_item(path: str, key: str, beside: bool = False) -> AudioItem:
        keep = beside or stems[os.path.splitext(rel(path))[0]] > 1
        return AudioItem(key, namer.claim(key, _file_names(rel(path), keep)), path)

    for raw in inputs:
        if raw == "-":
            for p in stdin:
                yield file_item(p, file_key(p) if os.path.exists(p) else p)
        elif _is_table(raw) and (os.path.isfile(raw) or os.path.isdir(raw)):
            table = file_item(raw, file_key(raw))
            yield from _table_items(raw, audio_column, id_column or "id", table, namer)
        elif os.path.isdir(raw):
            found = False
            for path, beside in _audio_files(raw, extensions):
                found = True
                yield file_item(path, file_key(path), beside)
            if not found:
                searched = ", ".join(f".{e}" for e in sorted(extensions))
                warnings.append(f"no {kind} files in {raw} (searched for {searched})")
        else:
            yield file_item(raw, file_key(raw))


def audio_value(value: Any, table_dir: str) -> tuple[Any, str | None]:
    """(the item's source, the audio's path if it has one) for a table cell: file bytes, a path
    (relative to the table's folder), a Hugging Face datasets Audio struct {bytes, path}, or decoded
    samples {array, sampling_rate}; null is empty bytes (the item fails as empty)."""
    if isinstance(value, dict) and "array" in value:
        audio_path = value.get("path")
        samples = Samples(value["array"], value.get("sampling_rate"))
        return samples, (audio_path if isinstance(audio_path, str) else None)
    audio_path = value.get("path") if isinstance(value, dict) else value
    source = (value.get("bytes") or audio_path) if isinstance(value, dict) else value
    if isinstance(source, str) and not os.path.isabs(source):
        source = os.path.join(table_dir, source)
    return (b"" if source is None else source), (audio_path if isinstance(audio_path, str) else None)


TABLE_BATCH_ROWS = 64  # rows of audio read at once from a table (each may hold a file's bytes)


def _table_items(
    path: str, column: str, id_column: str, table: AudioItem, namer: Namer
) -> Iterator[AudioItem]:
    """The rows of a table (read by ``encdec_cli.io.tables``, streamed), named TABLE/ID,
    TABLE/PATH-STEM or TABLE/ROW; a row that cannot be read is an item with its error, an
    unreadable table one item with its error."""
    table_dir = os.path.dirname(path)
    try:
        with open_table(path, column, TABLE_BATCH_ROWS, raw=True, select=[id_column]) as rows:
            for row in rows:
                record = row.record or {}
                source, audio_path = audio_value(record.get(column), table_dir)
                stem = os.path.splitext(os.path.basename(audio_path))[0] if audio_path else ""
                label = _safe_name(record.get(id_column)) or _safe_name(stem) or f"{row.row_id:06d}"
                key = f"{table.key}#{row.row_id}"
                names = [f"{table.name}/{label}", f"{table.name}/{label}~{row.row_id:06d}"]
                error = None if row.error is None else f"{row.error}; no audio read: empty (0 bytes)"
                yield AudioItem(key, namer.claim(key, names), source, path, row.row_id, error=error)
    except Exception as e:  # an unreadable table is its own error, never the job's (nor a hang)
        yield AudioItem(table.key, table.name, path, error=f"cannot read table: {e}")


@dataclass
class AudioItem:
    """One input: a path, in-memory file bytes or decoded samples, with a name for outputs and
    messages."""

    key: str  # identity for the manifest
    name: str  # relative output path without extension
    source: Any  # str path, bytes or Samples
    input: str | None = None  # the input as given, for records and messages (default: the path or name)
    row: int | None = None  # row number, for a row of a table input
    error: str | None = None  # known to fail before it is read (e.g. its table is unreadable)
    index: int = 0  # position in the job's input order
    warnings: list[str] = field(default_factory=list)  # found while reading (e.g. a truncated file)

    def __post_init__(self):
        if self.input is None:
            self.input = self.source if isinstance(self.source, str) else self.name


def read_windows(item: AudioItem) -> Iterator[tuple[int, np.ndarray]]:
    """(start sample, samples) of each <= 30 s window of an item's audio, cut at quiet points;
    streamed from disk for a path, whole in memory for file bytes and samples."""
    if isinstance(item.source, (bytes, bytearray, memoryview, Samples)):
        audio = load_audio(item.source, item.warnings)
        for s, e in split_on_silence(audio):
            yield s, audio[s:e]
    else:
        yield from iter_audio_windows(item.source, warnings=item.warnings)
