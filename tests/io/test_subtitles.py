"""Transcript records and subtitle writers: every format written and parsed back."""

from __future__ import annotations

import json
import re

import pytest

from encdec_cli.io.records import Segment, Transcript, Word
from encdec_cli.io.subtitles import (
    FORMATS,
    format_json,
    format_srt,
    format_timestamp,
    format_tsv,
    format_txt,
    format_vtt,
    resolve_formats,
    write_transcript,
)

WHISPER_SEGMENT_KEYS = {
    "id",
    "seek",
    "start",
    "end",
    "text",
    "tokens",
    "temperature",
    "avg_logprob",
    "compression_ratio",
    "no_speech_prob",
}


def make_transcript(words: bool = False) -> Transcript:
    segs = [
        Segment(0, 0.0, 1.23, " Hello there.", [1, 2, 3], -0.2),
        Segment(1, 1.23, 4.5604, " General\tKenobi --> you are bold.", [4, 5], -0.3, 1.2, 0.01, 0.2),
        Segment(2, 3599.9996, 3725.5, " Past the hour.", [6], -0.1),
    ]
    if words:
        segs[0].words = [Word(" Hello", 0.0, 0.6, 0.9), Word(" there.", 0.6, 1.23, 0.8)]
    return Transcript("".join(s.text for s in segs), segs, "en", 3725.5)


SRT_CUE = re.compile(
    r"(\d+)\n(\d\d):(\d\d):(\d\d),(\d{3}) --> (\d\d):(\d\d):(\d\d),(\d{3})\n(.+?)\n\n", re.DOTALL
)
VTT_CUE = re.compile(
    r"(?:(\d\d):)?(\d\d):(\d\d)\.(\d{3}) --> (?:(\d\d):)?(\d\d):(\d\d)\.(\d{3})\n(.+?)\n\n", re.DOTALL
)


def _secs(h: str | None, m: str, s: str, ms: str) -> float:
    return int(h or 0) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000


def test_format_timestamp_like_whisper():
    assert format_timestamp(1.23) == "00:01.230"
    assert format_timestamp(1.23, True, ",") == "00:00:01,230"
    assert format_timestamp(3725.5) == "01:02:05.500"
    assert format_timestamp(59.9996) == "01:00.000"  # rounds to the millisecond, carries
    assert format_timestamp(-0.01) == "00:00.000"


def test_srt_parses_back():
    t = make_transcript()
    text = format_srt(t)
    cues = SRT_CUE.findall(text)
    assert SRT_CUE.sub("", text) == ""  # nothing outside well-formed cues
    assert [int(c[0]) for c in cues] == [1, 2, 3]
    for cue, seg in zip(cues, t.segments, strict=True):
        assert _secs(*cue[1:5]) == pytest.approx(seg.start, abs=5e-4)
        assert _secs(*cue[5:9]) == pytest.approx(seg.end, abs=5e-4)
        assert cue[9] == seg.text.strip().replace("-->", "->")
    assert text.startswith("1\n00:00:00,000 --> 00:00:01,230\nHello there.\n\n")
    assert "01:00:00,000 --> 01:02:05,500" in text


def test_vtt_parses_back():
    t = make_transcript()
    text = format_vtt(t)
    assert text.startswith("WEBVTT\n\n")
    body = text[len("WEBVTT\n\n") :]
    cues = VTT_CUE.findall(body)
    assert VTT_CUE.sub("", body) == ""
    assert len(cues) == 3
    for cue, seg in zip(cues, t.segments, strict=True):
        assert _secs(*cue[0:4]) == pytest.approx(seg.start, abs=5e-4)
        assert _secs(*cue[4:8]) == pytest.approx(seg.end, abs=5e-4)
    assert "00:00.000 --> 00:01.230\n" in body  # no hours below one hour
    assert "01:00:00.000 --> 01:02:05.500\n" in body  # hours when needed


def test_tsv_columns_in_milliseconds():
    t = make_transcript()
    lines = format_tsv(t).splitlines()
    assert lines[0] == "start\tend\ttext"
    rows = [line.split("\t") for line in lines[1:]]
    assert all(len(r) == 3 for r in rows)  # a tab inside the text does not add a column
    assert rows[0] == ["0", "1230", "Hello there."]
    assert rows[1][:2] == ["1230", "4560"]
    assert rows[2][:2] == ["3600000", "3725500"]


def test_txt_one_line_per_segment():
    assert format_txt(make_transcript()).splitlines() == [
        "Hello there.",
        "General\tKenobi --> you are bold.",
        "Past the hour.",
    ]


def test_json_has_whisper_keys_and_words():
    plain = json.loads(format_json(make_transcript()))
    assert set(plain) == {"text", "segments", "language"}
    assert plain["language"] == "en"
    assert all(set(s) == WHISPER_SEGMENT_KEYS for s in plain["segments"])
    assert plain["segments"][1]["seek"] == 123  # start in 10 ms frames when not given
    with_words = json.loads(format_json(make_transcript(words=True)))
    seg0 = with_words["segments"][0]
    assert set(seg0) == WHISPER_SEGMENT_KEYS | {"words"}
    assert seg0["words"][0] == {"word": " Hello", "start": 0.0, "end": 0.6, "probability": 0.9}
    back = Transcript.from_json_dict(with_words)
    assert back.to_json_dict() == with_words


def test_words_do_not_change_srt_or_tsv():
    assert format_srt(make_transcript(True)) == format_srt(make_transcript())
    assert format_tsv(make_transcript(True)) == format_tsv(make_transcript())


def test_empty_text_segment_skipped_in_cues():
    t = Transcript(" a", [Segment(0, 0, 1, "   ", [], 0.0), Segment(1, 1, 2, " a\n\nb", [], 0.0)], "en", 2)
    srt = format_srt(t)
    assert srt == "1\n00:00:01,000 --> 00:00:02,000\na\nb\n\n"
    assert format_vtt(t) == "WEBVTT\n\n00:01.000 --> 00:02.000\na\nb\n\n"


def test_write_transcript_all_formats(tmp_path):
    t = make_transcript(words=True)
    paths = write_transcript(t, tmp_path / "out" / "talk.v2", resolve_formats(["all"]))
    assert [p.name for p in paths] == [f"talk.v2.{f}" for f in FORMATS]
    assert (tmp_path / "out" / "talk.v2.srt").read_text("utf-8") == format_srt(t)
    assert json.loads((tmp_path / "out" / "talk.v2.json").read_text("utf-8"))["text"] == t.text
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in paths)


def test_resolve_formats():
    assert resolve_formats(["srt", "SRT", "all"]) == ["srt", "txt", "vtt", "tsv", "json"]
    with pytest.raises(ValueError, match="unknown output format 'docx'"):
        resolve_formats(["docx"])
