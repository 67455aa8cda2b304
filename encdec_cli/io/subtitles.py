"""Transcript writers: txt, srt, vtt, tsv, json, formatted like openai-whisper's.

``format_*`` return the file content as a string; :func:`write_transcript` commits
each requested format atomically beside a base path.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from encdec_cli.io.atomic import atomic_write_text
from encdec_cli.io.records import Transcript

__all__ = [
    "FORMATS",
    "format_json",
    "format_srt",
    "format_timestamp",
    "format_tsv",
    "format_txt",
    "format_vtt",
    "resolve_formats",
    "write_transcript",
]

FORMATS = ("txt", "srt", "vtt", "tsv", "json")

_BLANK_LINES = re.compile(r"\n\s*\n")  # a blank line would end a subtitle cue early


def format_timestamp(seconds: float, always_include_hours: bool = False, decimal_marker: str = ".") -> str:
    """``[HH:]MM:SS<marker>mmm`` as openai-whisper writes it; negative times clamp to 0."""
    milliseconds = max(0, round(seconds * 1000.0))
    hours, milliseconds = divmod(milliseconds, 3_600_000)
    minutes, milliseconds = divmod(milliseconds, 60_000)
    secs, milliseconds = divmod(milliseconds, 1_000)
    hours_marker = f"{hours:02d}:" if always_include_hours or hours > 0 else ""
    return f"{hours_marker}{minutes:02d}:{secs:02d}{decimal_marker}{milliseconds:03d}"


def _cues(
    transcript: Transcript, always_include_hours: bool, decimal_marker: str
) -> Iterator[tuple[str, str, str]]:
    """(start, end, text) per segment with text; cue text cannot contain '-->' or blank lines."""
    for seg in transcript.segments:
        text = _BLANK_LINES.sub("\n", seg.text.strip().replace("-->", "->"))
        if not text:  # an empty cue is invalid in SRT and useless in VTT
            continue
        yield (
            format_timestamp(seg.start, always_include_hours, decimal_marker),
            format_timestamp(seg.end, always_include_hours, decimal_marker),
            text,
        )


def format_txt(transcript: Transcript) -> str:
    """One line per segment, stripped."""
    return "".join(f"{seg.text.strip()}\n" for seg in transcript.segments)


def format_srt(transcript: Transcript) -> str:
    """SubRip: numbered cues from 1, ``00:00:01,230 --> 00:00:04,560``."""
    cues = _cues(transcript, always_include_hours=True, decimal_marker=",")
    return "".join(f"{i}\n{start} --> {end}\n{text}\n\n" for i, (start, end, text) in enumerate(cues, 1))


def format_vtt(transcript: Transcript) -> str:
    """WebVTT: ``WEBVTT`` header, cues ``00:01.230 --> 00:04.560`` (hours only when needed)."""
    cues = _cues(transcript, always_include_hours=False, decimal_marker=".")
    return "WEBVTT\n\n" + "".join(f"{start} --> {end}\n{text}\n\n" for start, end, text in cues)


def format_tsv(transcript: Transcript) -> str:
    """``start\\tend\\ttext`` header, then one row per segment; times in integer milliseconds."""
    lines = ["start\tend\ttext\n"]
    for seg in transcript.segments:
        text = " ".join(seg.text.strip().replace("\t", " ").splitlines())
        lines.append(f"{round(1000 * seg.start)}\t{round(1000 * seg.end)}\t{text}\n")
    return "".join(lines)


def format_json(transcript: Transcript) -> str:
    """openai-whisper's JSON result (text, segments with words when present, language)."""
    return json.dumps(transcript.to_json_dict(), ensure_ascii=False)


_FORMATTERS: dict[str, Callable[[Transcript], str]] = {
    "txt": format_txt,
    "srt": format_srt,
    "vtt": format_vtt,
    "tsv": format_tsv,
    "json": format_json,
}


def resolve_formats(formats: Iterable[str]) -> list[str]:
    """Lower-case, expand ``"all"``, drop duplicates (order kept); unknown names raise ValueError."""
    out: list[str] = []
    for name in formats:
        name = name.strip().lower()
        names = FORMATS if name == "all" else (name,)
        for n in names:
            if n not in _FORMATTERS:
                raise ValueError(f"unknown output format {n!r}; choose from {', '.join(FORMATS)} or 'all'")
            if n not in out:
                out.append(n)
    return out


def write_transcript(
    transcript: Transcript, base_path: str | os.PathLike[str], formats: Iterable[str]
) -> list[Path]:
    """Write ``<base_path>.<fmt>`` for each format (names from ``resolve_formats``), each atomically;
    returns the paths written.

    ``base_path`` has no extension (``out/talk`` -> ``out/talk.srt``); a dot already in
    its name is kept (``talk.v2`` -> ``talk.v2.srt``).
    """
    base = Path(base_path)
    paths = []
    for fmt in formats:
        path = base.with_name(f"{base.name}.{fmt}")
        atomic_write_text(path, _FORMATTERS[fmt](transcript))
        paths.append(path)
    return paths
