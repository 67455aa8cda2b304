"""Typed transcription results, serialisable in openai-whisper's JSON shape."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from encdec_models.audio import FRAMES_PER_SECOND  # the unit of "seek"

__all__ = ["TRANSCRIPT_COLUMNS", "Segment", "Transcript", "Word", "json_line"]

WORD_TYPE = pa.struct(
    [("word", pa.string()), ("start", pa.float64()), ("end", pa.float64()), ("probability", pa.float64())]
)
SEGMENT_TYPE = pa.struct(
    [
        ("id", pa.int64()),
        ("seek", pa.int64()),
        ("start", pa.float64()),
        ("end", pa.float64()),
        ("text", pa.string()),
        ("tokens", pa.list_(pa.int64())),
        ("temperature", pa.float64()),
        ("avg_logprob", pa.float64()),
        ("compression_ratio", pa.float64()),
        ("no_speech_prob", pa.float64()),
        ("words", pa.list_(WORD_TYPE)),  # null without word timestamps
    ]
)
# A transcript as table columns (Transcript.to_columns): the segments are a list of structs, the
# shape Hugging Face datasets reads back as a Sequence of dicts.
TRANSCRIPT_COLUMNS: dict[str, pa.DataType] = {
    "text": pa.string(),
    "language": pa.string(),
    "duration": pa.float64(),
    "segments": pa.list_(SEGMENT_TYPE),
}


@dataclass
class Word:
    """One word with its timing (word-level timestamps)."""

    word: str  # the word as decoded, usually with its leading space
    start: float  # seconds from the start of the audio
    end: float  # seconds from the start of the audio
    probability: float  # mean token probability of the word, in [0, 1]

    def to_json_dict(self) -> dict[str, Any]:
        return {"word": self.word, "start": self.start, "end": self.end, "probability": self.probability}


@dataclass
class Segment:
    """One decoded segment (usually a sentence or phrase) of a transcript."""

    id: int  # index of the segment in the transcript, from 0
    start: float  # seconds from the start of the audio
    end: float  # seconds from the start of the audio
    text: str  # decoded text, usually with a leading space
    tokens: list[int]  # text token ids (no special tokens)
    avg_logprob: float  # mean log-probability of the sampled tokens
    compression_ratio: float = 0.0  # gzip compression ratio of the text (repetition detector)
    no_speech_prob: float = 0.0  # probability of the <|nospeech|> token at the window start
    temperature: float = 0.0  # sampling temperature that produced this segment
    words: list[Word] | None = None  # word timings, when word timestamps were requested
    seek: int | None = None  # window offset in mel frames; None = derived from `start`

    def to_json_dict(self) -> dict[str, Any]:
        seek = self.seek if self.seek is not None else round(self.start * FRAMES_PER_SECOND)
        out: dict[str, Any] = {
            "id": self.id,
            "seek": seek,
            "start": self.start,
            "end": self.end,
            "text": self.text,
            "tokens": list(self.tokens),
            "temperature": self.temperature,
            "avg_logprob": self.avg_logprob,
            "compression_ratio": self.compression_ratio,
            "no_speech_prob": self.no_speech_prob,
        }
        if self.words is not None:
            out["words"] = [w.to_json_dict() for w in self.words]
        return out


@dataclass
class Transcript:
    """The transcription of one audio input."""

    text: str  # full text (concatenation of the segment texts)
    segments: list[Segment] = field(default_factory=list)
    language: str = ""  # ISO 639-1 code, e.g. "en"
    duration: float = 0.0  # seconds of audio transcribed
    warnings: list[str] = field(default_factory=list)  # e.g. the audio file was truncated

    def to_json_dict(self) -> dict[str, Any]:
        """openai-whisper's result shape: ``{"text", "segments": [...], "language"}``, and
        ``"warnings"`` when there are any."""
        out: dict[str, Any] = {
            "text": self.text,
            "segments": [s.to_json_dict() for s in self.segments],
            "language": self.language,
        }
        if self.warnings:
            out["warnings"] = list(self.warnings)
        return out

    def to_columns(self) -> dict[str, Any]:
        """The values of :data:`TRANSCRIPT_COLUMNS` for this transcript (segments as in the JSON)."""
        return {
            "text": self.text,
            "language": self.language,
            "duration": self.duration,
            "segments": [s.to_json_dict() for s in self.segments],
        }

    @classmethod
    def from_json_dict(cls, data: dict[str, Any], duration: float | None = None) -> Transcript:
        """Inverse of :meth:`to_json_dict` (also reads openai-whisper's own JSON output)."""
        segments = []
        for i, s in enumerate(data.get("segments", [])):
            words = s.get("words")
            segments.append(
                Segment(
                    id=int(s.get("id", i)),
                    start=float(s["start"]),
                    end=float(s["end"]),
                    text=str(s["text"]),
                    tokens=[int(t) for t in s.get("tokens", [])],
                    avg_logprob=float(s.get("avg_logprob", 0.0)),
                    compression_ratio=float(s.get("compression_ratio", 0.0)),
                    no_speech_prob=float(s.get("no_speech_prob", 0.0)),
                    temperature=float(s.get("temperature", 0.0)),
                    words=None if words is None else [Word(**w) for w in words],
                    seek=None if s.get("seek") is None else int(s["seek"]),
                )
            )
        if duration is None:
            duration = segments[-1].end if segments else 0.0
        return cls(
            text=str(data.get("text", "")),
            segments=segments,
            language=str(data.get("language", "")),
            duration=duration,
            warnings=[str(w) for w in data.get("warnings", [])],
        )


def json_line(obj: Any) -> str:
    """``obj`` as one line of JSON: UTF-8 text, except that a string holding lone surrogates (a
    non-UTF-8 file name, decoded with surrogateescape) makes the whole line \\u-escaped ASCII, which
    UTF-8 can carry and ``json.loads`` turns back into the same string (``os.fsencode``: the name)."""
    text = json.dumps(obj, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(obj)
    return text
