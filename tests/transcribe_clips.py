"""Synthetic speech with known timing for the transcription tests: espeak-ng sentences separated
by silences of chosen lengths, so the true start and end of every sentence are known."""

from __future__ import annotations

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
SAMPLE_RATE = 16000
SPEECH_RMS_FRACTION = 0.02  # a 10 ms frame is speech when its RMS exceeds this share of the peak RMS


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


def build(parts: list[str | float], voice: str = "en-us", wpm: int = 150) -> tuple[np.ndarray, list[Spoken]]:
    """``parts``: sentences and silences (seconds), in order -> (audio, where each sentence is)."""
    chunks, spoken, t = [], [], 0
    for p in parts:
        if isinstance(p, str):
            a = speak(p, voice, wpm)
            spoken.append(Spoken(p, t / SAMPLE_RATE, (t + len(a)) / SAMPLE_RATE))
        else:
            a = np.zeros(round(p * SAMPLE_RATE), np.float32)
        chunks.append(a)
        t += len(a)
    return np.concatenate(chunks), spoken


def write(path: Path, audio: np.ndarray) -> Path:
    sf.write(path, audio, SAMPLE_RATE, subtype="PCM_16")
    return path
