"""Synthetic speech with known timing for the transcription tests: espeak-ng sentences separated
by silences of chosen lengths, so the true start and end of every sentence are known; and the checks
of transcripts against that truth."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

SENTENCES = [
    "Good morning, everyone.",
    "The weather is very nice today.",
    "I will send you the report tomorrow morning.",
    "Please close the door when you leave.",
    "We are going to the park after lunch.",
    "My brother plays the guitar every evening.",
    "The train to the city leaves at eight o'clock.",
    "She bought three apples and a loaf of bread.",
]
MORE_SENTENCES = [  # distinct text for long clips (repeated text invites loops in prompted windows)
    "The meeting starts at ten in the small room.",
    "Our team finished the new design last week.",
    "Can you call the doctor before noon?",
    "The children are playing football in the garden.",
    "He forgot his umbrella at the office again.",
    "The library is closed on Sunday afternoons.",
    "We need more paper for the printer downstairs.",
    "The river is quiet and the water is cold.",
    "I read a good book about old ships.",
    "Dinner will be ready in twenty minutes.",
    "The store on the corner sells fresh fish.",
    "Turn left at the bridge and walk to the church.",
    "My sister lives in a house near the sea.",
    "The bus was late because of the snow.",
    "Please write your name at the top of the page.",
    "The coffee machine in the kitchen is broken.",
    "They are planning a trip to the mountains in June.",
    "The price of the tickets went up this year.",
    "Remember to water the plants on Friday.",
    "The dog sleeps under the table after dinner.",
]
SAMPLE_RATE = 16000
SPEECH_RMS_FRACTION = 0.02  # a 10 ms frame is speech when its RMS exceeds this share of the peak RMS
TOLERANCE = 0.5  # seconds: how far a segment edge may lie from the speech boundary it marks


@dataclass(frozen=True)
class Spoken:
    text: str
    start: float  # seconds: first speech frame
    end: float  # seconds: end of the last speech frame


def have_espeak() -> bool:
    return shutil.which("espeak-ng") is not None


def speak(text: str, voice: str = "en-us", wpm: int = 150) -> np.ndarray:
    """One sentence from espeak-ng, 16 kHz mono float32, trimmed to its speech."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(wpm), "-w", str(path), text], check=True)
        audio, sr = sf.read(path, dtype="float32")
    audio = soxr.resample(audio, sr, SAMPLE_RATE) if sr != SAMPLE_RATE else audio
    hop = SAMPLE_RATE // 100
    rms = np.sqrt(np.mean(audio[: len(audio) // hop * hop].reshape(-1, hop) ** 2, axis=1))
    on = np.flatnonzero(rms > SPEECH_RMS_FRACTION * rms.max())
    return np.ascontiguousarray(audio[on[0] * hop : (on[-1] + 1) * hop], dtype=np.float32)


@dataclass(frozen=True)
class Say:
    """A sentence in its own voice and speed (``build`` speaks a plain str in its defaults)."""

    text: str
    voice: str
    wpm: int


def build(
    parts: list[str | Say | float], voice: str = "en-us", wpm: int = 150
) -> tuple[np.ndarray, list[Spoken]]:
    """``parts``: sentences and silences (seconds), in order -> (audio, where each sentence is)."""
    chunks, spoken, t = [], [], 0
    for p in parts:
        if isinstance(p, str):
            p = Say(p, voice, wpm)
        if isinstance(p, Say):
            a = speak(p.text, p.voice, p.wpm)
            spoken.append(Spoken(p.text, t / SAMPLE_RATE, (t + len(a)) / SAMPLE_RATE))
        else:
            a = np.zeros(round(p * SAMPLE_RATE), np.float32)
        chunks.append(a)
        t += len(a)
    return np.concatenate(chunks), spoken


def write(path: Path, audio: np.ndarray) -> Path:
    sf.write(path, audio, SAMPLE_RATE, subtype="PCM_16")
    return path


# ---- transcripts against the truth ---------------------------------------------------------------


def words(text: str) -> list[str]:
    """Lower-case words without punctuation, for comparing transcripts."""
    return re.sub(r"[^a-z0-9' ]", " ", text.lower()).split()


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Word-level edit distance (substitutions, insertions, deletions) / reference words."""
    ref, hyp = words(reference), words(hypothesis)
    row = list(range(len(hyp) + 1))  # distances from ref[:i] to each hyp[:j]
    for i, r in enumerate(ref, 1):
        diag, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            diag, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diag + (r != h))
    return row[-1] / max(len(ref), 1)


def sentences_in(segment, truth: list[Spoken]) -> list[Spoken]:
    """The sentences whose midpoint lies inside ``segment`` (anything with start and end)."""
    return [t for t in truth if segment.start <= (t.start + t.end) / 2 <= segment.end]


def check_word_segment_times(segments, truth: list[Spoken], tolerance: float = TOLERANCE) -> None:
    """Segment times with word timestamps on (a segment runs from its first word's start to its last
    word's end) against the true sentences. For each segment, with S the sentences it contains
    (never none: no segment is placed in silence):

    - a window's first segment starts in the pause before S[0], +- ``tolerance``: the alignment
      anchors a window's first word at the window's first frame (openai-whisper's does too) and its
      long-first-word heuristic only trims it to twice the median word length, so that start is
      early by up to the pause (windows start in pauses: at a timestamp or a word end);
    - any other segment starts within ``tolerance`` of S[0]'s start;
    - it ends in the pause after S[-1], +- ``tolerance``: never early by more than ``tolerance``,
      but the alignment gives a pause to the word before it, so an end can run late into the pause
      (tiny.en: up to 1.4 s in the 3.6-minute clip, 1.05 s in the 16 s clip);
    - its words lie inside it; segments and words follow each other without overlapping.
    """
    for i, s in enumerate(segments):
        inside = sentences_in(s, truth)
        assert inside, f"segment {s.start}-{s.end} {s.text!r} contains no speech"
        first, last = truth.index(inside[0]), truth.index(inside[-1])
        pause_from = truth[first - 1].end if first else 0.0
        pause_to = truth[last + 1].start if last + 1 < len(truth) else math.inf
        where = (s.start, s.end, s.text, inside[0].start, inside[-1].end)
        if i == 0 or segments[i - 1].seek != s.seek:  # the window's first segment
            assert pause_from - tolerance <= s.start <= inside[0].start + tolerance, where
        else:
            assert abs(s.start - inside[0].start) <= tolerance, where
        assert inside[-1].end - tolerance <= s.end <= pause_to + tolerance, where
        assert s.words and s.words[0].start == s.start and s.words[-1].end == s.end, where
    assert all(a.end <= b.start for a, b in zip(segments, segments[1:]))
    timed = [w for s in segments for w in s.words]
    assert all(w.start <= w.end for w in timed)
    assert all(a.end <= b.start for a, b in zip(timed, timed[1:]))


def transcribe(engine, paths, **opts) -> dict:
    """Transcribe files with ``Transcriber`` (options: ``TranscribeOptions`` fields) -> {stem:
    Transcript}; every file must succeed."""
    from encdec_cli.io.inputs import AudioItem
    from encdec_cli.tasks.transcribe import Transcriber
    from encdec_cli.tasks.whisper_rules import TranscribeOptions

    out = {}
    items = [AudioItem(str(p), p.stem, str(p)) for p in paths]
    Transcriber(engine, TranscribeOptions(**opts)).run(items, lambda i, t, e: out.__setitem__(i.name, (t, e)))
    assert all(e is None for _, e in out.values()), out
    return {k: t for k, (t, _) in out.items()}


# ---- speech between long stretches of silence, noise and music-like tones (--vad) -----------------

GAP_KINDS = ("silence", "noise", "tones")


def gap_audio(kind: str, seconds: float, seed: int = 0) -> np.ndarray:
    """``seconds`` of non-speech, 16 kHz: digital silence; noise (white noise low-passed to a hiss,
    about -30 dBFS RMS); or music-like tones (a new three-note chord of a pentatonic scale every 0.4 s,
    each note with its overtones and a decaying envelope, about -20 dBFS)."""
    n = round(seconds * SAMPLE_RATE)
    rng = np.random.default_rng(seed)
    if kind == "silence":
        return np.zeros(n, np.float32)
    if kind == "noise":
        white = rng.normal(0.0, 1.0, n + 8)
        hiss = np.convolve(white, np.ones(8) / 8, mode="valid")[:n]  # a gentle low-pass
        return (0.03 * hiss / hiss.std()).astype(np.float32)
    if kind == "tones":
        scale = 220.0 * 2 ** (np.array([0, 2, 4, 7, 9, 12, 14, 16]) / 12)  # A pentatonic, two octaves
        note = round(0.4 * SAMPLE_RATE)
        t = np.arange(note) / SAMPLE_RATE
        envelope = np.minimum(t / 0.01, 1.0) * np.exp(-t / 0.25)
        out = np.zeros(n + note, np.float32)
        for start in range(0, n, note):
            notes = rng.choice(scale, 3, replace=False)
            chord = sum(np.sin(2 * np.pi * k * f * t) / k for f in notes for k in (1, 2, 3))
            out[start : start + note] += (0.05 * chord * envelope).astype(np.float32)
        return out[:n]
    raise ValueError(f"unknown gap kind {kind!r}; have {GAP_KINDS}")


def build_with_gaps(
    sentences: list[str], gaps: list[tuple[str, float]], lead: tuple[str, float] = ("silence", 1.0)
) -> tuple[np.ndarray, list[Spoken]]:
    """``lead``, then each sentence followed by its gap (kind, seconds): the audio and where each
    sentence is."""
    chunks, spoken, t = [gap_audio(*lead, seed=99)], [], round(lead[1] * SAMPLE_RATE)
    for i, (text, (kind, seconds)) in enumerate(zip(sentences, gaps)):
        a = speak(text)
        spoken.append(Spoken(text, t / SAMPLE_RATE, (t + len(a)) / SAMPLE_RATE))
        g = gap_audio(kind, seconds, seed=i)
        chunks += [a, g]
        t += len(a) + len(g)
    return np.concatenate(chunks), spoken


def words_outside(segments, truth: list[Spoken], tolerance: float = TOLERANCE) -> list:
    """The timed words (word timestamps) that lie in no sentence: their middle is more than
    ``tolerance`` outside every sentence placed in the file."""
    return [
        w
        for s in segments
        for w in s.words or ()
        if not any(t.start - tolerance <= (w.start + w.end) / 2 <= t.end + tolerance for t in truth)
    ]
