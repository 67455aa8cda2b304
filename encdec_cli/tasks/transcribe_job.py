"""The ``encdec transcribe`` job: inputs -> audio items, transcripts -> files, manifest, progress.

Inputs are planned into named items by ``encdec_cli.io.inputs``.

Exit status: 0 all done, 1 some items failed (in this run, or in an earlier one and skipped now)
or an input folder held no audio, 130 interrupted (usage errors are 2, from the CLI).
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


def _listed(pairs: list[tuple[str, str]], limit: int = 5) -> str:
    return "; ".join(f"{n}: {m}" for n, m in pairs[:limit]) + (" ..." if len(pairs) > limit else "")


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

    start = time.perf_counter()
    interrupted = False
    with progress:
        try:
            Transcriber(engine, opts).run(
                items(), on_done, on_audio=lambda r, t, n: progress.advance(amount=t, planned=r, started=n)
            )
        except KeyboardInterrupt:
            interrupted = True
    if printer is not None:
        printer.close()
    if manifest is not None:
        manifest.close()
    wall = time.perf_counter() - start
    for note in notes:
        progress.summary(f"warning: {note}")
    summary = (
        f"transcribed {written} file(s), {written_s / 60:.1f} min of audio in {wall:.1f} s "
        f"(RTFx {written_s / max(wall, 1e-9):.1f})"
    )
    if skipped:
        summary += (
            f"; {skipped} already done or failed before (skipped; --overwrite / --retry-failed redo them)"
        )
    if failed_before:
        summary += f"; {failed_before} of them FAILED in an earlier run (see the manifest)"
    if warned:
        summary += f"; {len(warned)} warning(s): {_listed(warned, 3)}"
    if failed:
        summary += f"; {len(failed)} FAILED: {_listed(failed)}"
    if notes:
        summary += f"; {len(notes)} input(s) matched no audio"
    progress.summary(summary + ("; INTERRUPTED" if interrupted else ""))
    return 130 if interrupted else 1 if failed or failed_before or notes else 0


__all__ = ["check_inputs", "check_output", "run_transcribe"]
