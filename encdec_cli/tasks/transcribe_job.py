"""The ``encdec transcribe`` job: inputs -> audio items, transcripts -> files, manifest, progress.

Inputs are planned into named items by ``encdec_cli.io.inputs``. The transcripts go to a folder
(files per input, a manifest), to stdout (JSON Lines) or to one Parquet table (``-o x.parquet``:
a row per input, in input order, through the resumable table sink of ``encdec_cli.io.tables``).

A stop signal (Ctrl-C, SIGTERM) never cuts an item's outputs or its manifest line in half: the
item being recorded is finished, the summary printed, and the exit status is 130 or 143. Exit
status otherwise: 0 all done, 1 some items failed (in this run, or in an earlier one and skipped
now) or an input folder held no audio (usage errors are 2, from the CLI).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
from rich.markup import escape

from encdec_cli.engine import Engine
from encdec_cli.errors import UsageError
from encdec_cli.io.inputs import AudioItem, Namer, check_inputs, count_files, plan_inputs
from encdec_cli.io.manifest import Manifest, file_key, fold_rank_manifests
from encdec_cli.io.records import TRANSCRIPT_COLUMNS, Transcript, json_line
from encdec_cli.io.subtitles import FORMATS, write_transcript
from encdec_cli.io.tables import RowIdSet, SinkOptions, TableSink, open_sink
from encdec_cli.tasks import summary
from encdec_cli.tasks.data_parallel import DataParallel
from encdec_cli.tasks.distributed import Distributed
from encdec_cli.tasks.interrupts import InterruptGuard
from encdec_cli.tasks.outcome import FILES, JobOutcome, prefix_cache_details, stage_busy_note
from encdec_cli.tasks.progress import JobProgress
from encdec_cli.tasks.transcribe import TranscribeOptions, Transcriber
from encdec_cli.tasks.transcribe_chunks import ChunkTranscriber


def transcriber_for(engine: Engine, opts: TranscribeOptions):
    """The front end and decoding rules the model folder asks for: Whisper's (log-mel windows,
    timestamp tokens, fallback) or chunk-timed raw-waveform decoding (Moonshine)."""
    if engine.loaded.architecture == "WhisperForConditionalGeneration":
        return Transcriber(engine, opts)
    return ChunkTranscriber(engine, opts)


TABLE_OUTPUTS = (".parquet", ".pq")  # -o with these writes one table, not a folder
# The table output's columns before the transcript's (TRANSCRIPT_COLUMNS) and "error".
ITEM_SCHEMA = pa.schema([("input", pa.string()), ("row", pa.int64()), ("name", pa.string())])


def is_table_output(output: str) -> bool:
    return Path(output).suffix.lower() in TABLE_OUTPUTS


def check_output(output: str, formats: list[str]) -> None:
    """``-o -`` prints JSON records and ``-o x.parquet`` writes a table: another format asked for
    (``-f srt``) is a usage error. ``formats``: from ``resolve_formats``."""
    if is_table_output(output) and formats != list(FORMATS):
        raise UsageError(f"-o {output} writes one Parquet table of transcripts; -f applies to -o FOLDER")
    if output == "-" and formats not in (["json"], list(FORMATS)):
        other = ", ".join(f for f in formats if f != "json")
        raise UsageError(f"-o - prints JSON Lines records, not {other}: pass -o FOLDER for {other} files")


class _Printer:
    """JSON Lines records on stdout, as items finish or (``ordered``) in input order."""

    def __init__(self, ordered: bool):
        self.ordered, self.next, self.held = ordered, 0, {}

    def put(self, index: int, record: dict) -> None:
        self.held[index if self.ordered else self.next] = json_line(record) + "\n"
        while self.next in self.held:
            sys.stdout.write(self.held.pop(self.next))
            self.next += 1
        sys.stdout.flush()

    def close(self) -> None:  # an interrupted job: what finished, in order, past the gaps
        sys.stdout.writelines(self.held[i] for i in sorted(self.held))
        sys.stdout.flush()


@dataclass(frozen=True)
class TranscribeWork:
    """The transcribe job's side in a data-parallel rank: audio items in (each its own unit; the rank
    decodes the audio), (transcript, error) out, and the Transcriber's progress."""

    opts: TranscribeOptions

    def serve(self, engine: Engine, feed, result, progress) -> None:
        def items() -> Iterator[AudioItem]:
            for unit, item in feed:
                item.index = unit
                yield item

        transcriber_for(engine, self.opts).run(
            items(),
            lambda item, transcript, error: result(item.index, (transcript, error), True),
            on_audio=lambda *amounts: progress(amounts),
        )


def _open_table_output(
    output: str,
    inputs: list[str],
    opts: TranscribeOptions,
    model: str,
    overwrite: bool,
    dist: Distributed | None = None,
) -> TableSink:
    """The Parquet output: a row per item (its row id: the item's place in the input order), the
    transcript's columns, resumable; a job with other inputs or options does not mix into it.
    Under torchrun every rank writes its own parts into the one parts folder: rank 0 opens it first
    (and, with --overwrite, discards an earlier run's), the others then join it."""
    key = json.dumps([[file_key(i) if i != "-" else "-" for i in inputs], repr(opts), model])
    first = dist is None or dist.rank == 0
    options = SinkOptions(
        result_columns=list(TRANSCRIPT_COLUMNS),
        input_schema=ITEM_SCHEMA,
        result_types=TRANSCRIPT_COLUMNS,
        job_key=key,
        # a list on stdin cannot be told apart; with --overwrite only rank 0 starts afresh
        resume="-" not in inputs and (not overwrite or not first),
        writer=None if dist is None else (dist.rank, dist.world),
    )
    if not first:
        dist.barrier()  # rank 0 has opened the output
    sink = open_sink(output, "parquet", options)
    if dist is not None and first:
        dist.barrier()
    return sink


def run_transcribe(
    engine: Engine | DataParallel,
    inputs: list[str],
    output: str,
    formats: list[str],
    opts: TranscribeOptions,
    audio_column: str = "audio",
    overwrite: bool = False,
    retry_failed: bool = False,
    quiet: bool = False,
    id_column: str | None = None,
    ordered: bool = False,
    dist: Distributed | None = None,
) -> int:
    """Transcribe every input into ``output``; the exit status. ``engine`` is one engine, or the ranks
    of a data-parallel job (each item then runs on some rank; everything else happens here, as with
    one engine). The caller has checked the inputs
    (``check_inputs``) and the output (``check_output``) once and resolved ``formats``
    (``resolve_formats``), as the CLI does before the model loads.

    Under torchrun (``dist``), this rank plans every input (the same names on every rank) and runs
    its share of them (``encdec_cli.tasks.distributed``); the exit status is the whole job's."""
    to_stdout = output == "-"
    if dist is not None:
        if to_stdout:
            raise UsageError("-o - under torchrun: every rank would print; pass -o FOLDER")
        if "-" in inputs:
            raise UsageError("a list of inputs on stdin ('-') under torchrun: every rank would read it")
        dist.start()
    table = None
    done_rows = failed_rows = RowIdSet()  # the table output's rows of an earlier run
    if is_table_output(output):
        model = engine.spec.path if isinstance(engine, DataParallel) else str(engine.loaded.path)
        table = _open_table_output(output, inputs, opts, model, overwrite, dist)
        done_rows, failed_rows = table.done_row_ids(), table.failed_row_ids()
    manifest = (
        None
        if to_stdout or table is not None
        else Manifest.in_dir(output, rank=None if dist is None else dist.rank)
    )
    if retry_failed:
        done_rows = done_rows.difference(failed_rows)
    if dist is not None:
        dist.barrier()  # every rank has read the manifests before any rank writes
    notes: list[str] = []  # inputs that matched nothing
    planned = plan_inputs(inputs, audio_column, id_column, Namer(manifest, output), notes)
    printer = _Printer(ordered) if to_stdout else None
    total = count_files(inputs)
    if dist is not None:  # rank 0 shows its own share's progress, the summary the whole job's
        quiet = quiet or dist.rank != 0
        total = None if total is None else len(range(dist.rank, total, dist.world))
    progress = JobProgress("transcribe", total, quiet=quiet, unit="audio s", items="files")
    failed: list[tuple[str, str]] = []
    warned: list[tuple[str, str]] = []
    written, written_s, skipped, failed_before = 0, 0.0, 0, 0  # failed_before: skipped, failed earlier

    planned_count = 0

    def items() -> Iterator[AudioItem]:
        nonlocal skipped, failed_before, planned_count
        seen: set[str] = set()
        for item in planned:
            if item.key in seen:  # the same file named twice (a folder and a file in it)
                continue
            seen.add(item.key)
            item.index, planned_count = planned_count, planned_count + 1  # its place in input order
            if dist is not None and not dist.owns(len(seen) - 1):  # another rank's
                continue
            if manifest is not None and not overwrite:
                failed_earlier = manifest.failed(item.key) and not retry_failed
                done = manifest.is_done(item.key)
            else:
                failed_earlier = item.index in failed_rows and not retry_failed
                done = item.index in done_rows
            if done or failed_earlier:
                skipped += 1
                failed_before += bool(failed_earlier)
                progress.skip()
                continue
            yield item

    def on_done(item: AudioItem, transcript: Transcript | None, error: str | None) -> None:
        nonlocal written, written_s
        with guard.protect():  # a stop signal waits for the item's outputs, manifest line and count
            where = item.input + ("" if item.row is None else f" row {item.row}")
            record = {"input": item.input, **({} if item.row is None else {"row": item.row})}
            if error is None:
                try:
                    if printer is not None:
                        printer.put(item.index, {**record, **transcript.to_json_dict(), "error": None})
                    elif table is not None:
                        table.write(item.index, {**record, "name": item.name}, transcript.to_columns())
                    else:
                        paths = write_transcript(transcript, Path(output) / item.name, formats)
                        manifest.record_ok(item.key, paths, transcript.warnings)
                except (OSError, ValueError) as e:  # ValueError: e.g. a name the file system cannot take
                    error = f"cannot write outputs: {e}"
                else:
                    written, written_s = written + 1, written_s + transcript.duration
                    warned.extend((where, w) for w in transcript.warnings)
                    for w in transcript.warnings:
                        progress.log(f"[yellow]warning[/yellow] {escape(w)}")
            if error is not None:
                failed.append((where, error))
                progress.log(f"[red]error[/red] {escape(where)}: {escape(error)}")
                if printer is not None:
                    printer.put(item.index, {**record, "text": None, "error": error})
                elif table is not None:
                    table.write(item.index, {**record, "name": item.name}, error=error)
                else:
                    manifest.record_error(item.key, error)
            progress.advance(files=1)

    def on_audio(planned_s: float, seconds: float, started: int) -> None:
        progress.advance(amount=seconds, planned=planned_s, started=started)

    start = time.perf_counter()
    interrupted = False
    report = None  # the ranks' report (data parallel)
    guard = InterruptGuard()
    with guard.installed():
        try:
            with progress:
                if isinstance(engine, DataParallel):
                    report = engine.run(
                        TranscribeWork(opts),
                        items(),
                        on_result=lambda item, value: on_done(item, *value),
                        on_failed=lambda item, message: on_done(item, None, message),
                        on_progress=lambda amounts: on_audio(*amounts),
                    )
                else:
                    transcriber_for(engine, opts).run(items(), on_done, on_audio=on_audio)
            if table is not None:
                with guard.protect():
                    first = dist is None or dist.rank == 0
                    if dist is not None:  # rank 0 merges every rank's parts once all are committed
                        table.flush() if first else table.close()
                        dist.barrier()
                        if first:
                            table.adopt_new_parts()
                    if first:  # (a finished job with nothing redone keeps its output)
                        finished = table.finished and done_rows == table.done_row_ids()
                        table.finalize(expected_rows=None if finished else planned_count)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            guard.stopping()  # from here on a stop signal does not cut the saving short
            if printer is not None:
                printer.close()
            if manifest is not None:
                manifest.close()
            if table is not None:
                table.close()
    outcome = JobOutcome(
        "transcribe",
        FILES,
        done=written,
        failed=len(failed),
        failed_before=failed_before,
        skipped=skipped,
        amount=written_s,
        wall=time.perf_counter() - start,
        output=None if to_stdout else output,
        interrupted=interrupted,
        failures=failed,
        warnings=warned,
        notes=notes,
        details=[]
        if isinstance(engine, DataParallel)
        else prefix_cache_details(engine.stats)
        + ([line] if (line := engine.stats.speculation_summary()) else [])
        + stage_busy_note(engine.stats),
        faults=report.notes() if report is not None else [],
    )
    if dist is not None:
        if interrupted:  # this rank stops alone (torchrun stops the others): its own summary
            dist.stop()
        else:
            outcome = JobOutcome.combined(dist.gather(outcome))
            if dist.rank == 0 and manifest is not None:
                fold_rank_manifests(output)  # every rank is done writing: one manifest again
            dist.stop()
            if dist.rank != 0:  # rank 0 says how the job went (its summary, its status)
                return 0
    progress.summary(outcome.summary())
    summary.record(outcome, engine)
    return outcome.exit_code()


__all__ = ["check_inputs", "check_output", "run_transcribe"]
