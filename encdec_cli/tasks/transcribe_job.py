"""The ``encdec transcribe`` job: inputs -> audio items, transcripts -> files, manifest, progress.

Inputs are planned into named items by ``encdec_cli.io.inputs``.

A stop signal (Ctrl-C, SIGTERM) never cuts an item's outputs or its manifest line in half: the
item being recorded is finished, the summary printed, and the exit status is 130 or 143. Exit
status otherwise: 0 all done, 1 some items failed (in this run, or in an earlier one and skipped
now) or an input folder held no audio (usage errors are 2, from the CLI).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

from rich.markup import escape

from encdec_cli.engine import Engine
from encdec_cli.errors import UsageError
from encdec_cli.io.inputs import AudioItem, Namer, check_inputs, count_files, plan_inputs
from encdec_cli.io.manifest import Manifest
from encdec_cli.io.records import Transcript, json_line
from encdec_cli.io.subtitles import FORMATS, write_transcript
from encdec_cli.tasks.interrupts import InterruptGuard
from encdec_cli.tasks.outcome import FILES, JobOutcome, stage_busy_note
from encdec_cli.tasks.progress import JobProgress
from encdec_cli.tasks.transcribe import TranscribeOptions, Transcriber


def check_output(output: str, formats: list[str]) -> None:
    """``-o -`` prints JSON records: another format asked for (``-f srt``) is a usage error.
    ``formats``: from ``resolve_formats``."""
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
    id_column: str | None = None,
    ordered: bool = False,
) -> int:
    """Transcribe every input into ``output``; the exit status. The caller has checked the inputs
    (``check_inputs``) and the output (``check_output``) once and resolved ``formats``
    (``resolve_formats``), as the CLI does before the model loads."""
    to_stdout = output == "-"
    manifest = None if to_stdout else Manifest.in_dir(output)
    notes: list[str] = []  # inputs that matched nothing
    planned = plan_inputs(inputs, audio_column, id_column, Namer(manifest, output), notes)
    printer = _Printer(ordered) if to_stdout else None
    progress = JobProgress("transcribe", count_files(inputs), quiet=quiet, unit="audio s", items="files")
    failed: list[tuple[str, str]] = []
    warned: list[tuple[str, str]] = []
    written, written_s, skipped, failed_before = 0, 0.0, 0, 0  # failed_before: skipped, failed earlier

    def items() -> Iterator[AudioItem]:
        nonlocal skipped, failed_before
        seen: set[str] = set()
        index = 0
        for item in planned:
            if item.key in seen:  # the same file named twice (a folder and a file in it)
                continue
            seen.add(item.key)
            if manifest is not None and not overwrite:
                failed_earlier = manifest.failed(item.key) and not retry_failed
                if manifest.is_done(item.key) or failed_earlier:
                    skipped += 1
                    failed_before += bool(failed_earlier)
                    progress.skip()
                    continue
            item.index, index = index, index + 1
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
                else:
                    manifest.record_error(item.key, error)
            progress.advance(files=1)

    def on_audio(planned_s: float, seconds: float, started: int) -> None:
        progress.advance(amount=seconds, planned=planned_s, started=started)

    start = time.perf_counter()
    interrupted = False
    guard = InterruptGuard()
    with guard.installed():
        try:
            with progress:
                Transcriber(engine, opts).run(items(), on_done, on_audio=on_audio)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            guard.stopping()  # from here on a stop signal does not cut the saving short
            if printer is not None:
                printer.close()
            if manifest is not None:
                manifest.close()
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
        details=stage_busy_note(engine.stats),
    )
    progress.summary(outcome.summary())
    return outcome.exit_code()


__all__ = ["check_inputs", "check_output", "run_transcribe"]
