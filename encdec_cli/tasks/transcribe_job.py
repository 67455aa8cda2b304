"""The ``encdec transcribe`` job: inputs -> audio items, transcripts -> files, manifest, progress.

Exit status: 0 all done, 1 some items failed (in this run, or in an earlier one and skipped now),
130 interrupted (usage errors are 2, from the CLI).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from encdec_cli.engine import Engine
from encdec_cli.io.audio import AUDIO_EXTENSIONS
from encdec_cli.io.manifest import Manifest, file_key
from encdec_cli.io.records import Transcript
from encdec_cli.io.subtitles import resolve_formats, write_transcript
from encdec_cli.tasks.progress import JobProgress
from encdec_cli.tasks.transcribe import AudioItem, TranscribeOptions, Transcriber

TABLE_EXTENSIONS = (".parquet", ".pq", ".jsonl", ".ndjson")


class UsageError(ValueError):
    """Bad command-line input (exit status 2)."""


@dataclass
class InputPlan:
    items: list[AudioItem]  # paths only: audio is read lazily, table rows are read lazily below
    tables: list[tuple[Path, str]]  # (table path, audio column)


def _audio_files(directory: Path) -> Iterator[Path]:
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for f in sorted(files):
            if f.rsplit(".", 1)[-1].lower() in AUDIO_EXTENSIONS and not f.startswith("."):
                yield Path(root) / f


def check_inputs(inputs: list[str], audio_column: str = "audio") -> None:
    """Fail fast (UsageError) on INPUTS that do not exist or tables without the audio column;
    touches only the named paths, never walks folders."""
    for raw in inputs:
        if raw == "-":
            continue
        p = Path(raw)
        if not p.exists() and not p.is_symlink():
            raise UsageError(f"input {raw!r} does not exist")
        if p.suffix.lower() in TABLE_EXTENSIONS and p.is_file():
            _check_table_column(p, audio_column)


def count_files(inputs: list[str]) -> int | None:
    """How many audio items the inputs hold, for the progress bar (names only, no stat); None when
    unknown up front (stdin lists, tables)."""
    n = 0
    for raw in inputs:
        p = Path(raw)
        if raw == "-" or p.suffix.lower() in TABLE_EXTENSIONS:
            return None
        n += sum(1 for _ in _audio_files(p)) if p.is_dir() else 1
    return n


def plan_inputs(inputs: list[str], audio_column: str = "audio") -> Iterator[AudioItem | tuple[Path, str]]:
    """Expand INPUTS lazily: audio files, folders (recursive), '-' (paths on stdin), Parquet/JSONL
    tables (yielded as (path, column) and read row by row later). Nothing is listed up front, so a
    folder of millions of files starts at once and costs no memory in proportion."""
    check_inputs(inputs, audio_column)
    for raw in inputs:
        if raw == "-":
            for line in sys.stdin:
                if line.strip():
                    p = Path(line.strip())
                    yield AudioItem(file_key(p) if p.exists() else str(p), p.with_suffix("").name, str(p))
            continue
        p = Path(raw)
        if p.is_dir():
            for f in _audio_files(p):
                yield AudioItem(file_key(f), str(f.relative_to(p).with_suffix("")), str(f))
        elif p.suffix.lower() in TABLE_EXTENSIONS and p.is_file():
            yield (p, audio_column)
        else:
            yield AudioItem(file_key(p), p.with_suffix("").name, str(p))


def _check_table_column(path: Path, column: str) -> None:
    """A readable Parquet table without the audio column is a usage error (an unreadable one
    fails as its own item when the job reads it)."""
    if path.suffix.lower() not in (".parquet", ".pq"):
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
    except (pa.ArrowException, OSError):
        return
    if column not in names:
        raise UsageError(f"{path} has no column {column!r}; columns: {', '.join(names)} (see --audio-column)")


def iter_table_audio(path: Path, column: str) -> Iterator[AudioItem]:
    """Rows of a Parquet/JSONL table whose ``column`` holds audio file bytes, a path, or a
    Hugging Face datasets Audio struct {bytes, path}. Streams record batches."""
    if path.suffix.lower() in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        if column not in pf.schema_arrow.names:
            raise UsageError(f"{path} has no column {column!r}; columns: {', '.join(pf.schema_arrow.names)}")
        batches = (b.column(column).to_pylist() for b in pf.iter_batches(batch_size=64, columns=[column]))
    else:

        def batches_jsonl():
            with open(path, encoding="utf-8", errors="replace") as f:
                yield [_json_field(line, column) for line in f if line.strip()]

        batches = batches_jsonl()
    row = 0
    for values in batches:
        for v in values:
            name = f"{path.stem}/{row:06d}"
            key = f"{file_key(path)}#{row}"
            if isinstance(v, dict):
                v = v.get("bytes") or v.get("path")
            if isinstance(v, str) and not os.path.isabs(v):
                v = str(path.parent / v)
            yield AudioItem(key, name, v if v is not None else b"")
            row += 1


def _json_field(line: str, column: str):
    try:
        return json.loads(line).get(column)
    except (json.JSONDecodeError, AttributeError):
        return None


def run_transcribe(
    engine: Engine,
    inputs: list[str],
    output: str,
    formats: list[str],
    opts: TranscribeOptions,
    audio_column: str = "audio",
    overwrite: bool = False,
    retry_failed: bool = False,
    quiet: bool = False,
) -> int:
    formats = resolve_formats(formats)
    check_inputs(inputs, audio_column)
    planned = plan_inputs(inputs, audio_column)
    to_stdout = output == "-"
    out_dir = Path(output)
    manifest = None if to_stdout else Manifest.in_dir(out_dir)
    progress = JobProgress("transcribe", total=count_files(inputs) or None, quiet=quiet, unit="audio s")
    failed: list[tuple[str, str]] = []
    skipped = 0
    failed_before = 0  # skipped items that failed in an earlier run: the job is still not all done
    unreadable: list[tuple[AudioItem, str]] = []  # tables that failed while read (reader thread)

    def table_items(path: Path, column: str) -> Iterator[AudioItem]:
        try:
            yield from iter_table_audio(path, column)
        except Exception as e:  # an unreadable table is its own error, never the job's (nor a hang)
            unreadable.append((AudioItem(file_key(path), path.stem, str(path)), f"cannot read table: {e}"))

    def items() -> Iterator[AudioItem]:
        nonlocal skipped, failed_before
        for p in planned:
            for item in table_items(*p) if isinstance(p, tuple) else [p]:
                if manifest is not None and not overwrite:
                    failed_earlier = manifest.failed(item.key) and not retry_failed
                    if manifest.is_done(item.key) or failed_earlier:
                        skipped += 1
                        failed_before += bool(failed_earlier)
                        progress.advance(files=1)
                        continue
                yield item

    def on_done(item: AudioItem, transcript: Transcript | None, error: str | None) -> None:
        if error is None:
            try:
                if to_stdout:
                    rec = {"input": item.name, **transcript.to_json_dict(), "error": None}
                    sys.stdout.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    sys.stdout.flush()
                else:
                    paths = write_transcript(transcript, out_dir / item.name, formats)
                    manifest.record_ok(item.key, paths)
            except OSError as e:
                error = f"cannot write outputs: {e}"
        if error is not None:
            failed.append((item.name, error))
            progress.log(f"[red]error[/red] {item.name}: {error}")
            if to_stdout:
                sys.stdout.write(json.dumps({"input": item.name, "text": None, "error": error}) + "\n")
            elif manifest is not None:
                manifest.record_error(item.key, error)
        progress.advance(files=1)

    start = time.perf_counter()
    interrupted = False
    with progress:
        try:
            Transcriber(engine, opts).run(items(), on_done, on_audio=lambda s: progress.advance(amount=s))
        except KeyboardInterrupt:
            interrupted = True
        for item, error in unreadable:
            on_done(item, None, error)
    if manifest is not None:
        manifest.close()
    wall = time.perf_counter() - start
    audio_s = progress.amount
    done = progress.files - len(failed) - skipped
    summary = (
        f"transcribed {done} file(s), {audio_s / 60:.1f} min of audio in {wall:.1f} s "
        f"(RTFx {audio_s / max(wall, 1e-9):.1f})"
    )
    if skipped:
        summary += (
            f"; {skipped} already done or failed before (skipped; --overwrite / --retry-failed redo them)"
        )
    if failed_before:
        summary += f"; {failed_before} of them FAILED in an earlier run (see the manifest)"
    if failed:
        summary += f"; {len(failed)} FAILED: " + "; ".join(f"{n}: {e}" for n, e in failed[:5])
        summary += " ..." if len(failed) > 5 else ""
    progress.summary(summary + ("; INTERRUPTED" if interrupted else ""))
    return 130 if interrupted else 1 if failed or failed_before else 0


__all__ = ["run_transcribe", "plan_inputs", "check_inputs", "count_files", "iter_table_audio", "UsageError"]
