"""Voice activity detection for chunked long-form transcription (``--vad``).

Silero VAD (``encdec_models.silero_vad``: the ``silero-vad`` package's model, run batched on the
engine's device) gives a speech probability per 32 ms; the package's own post-processing turns
them into speech regions (``--vad-threshold``, ``--min-silence``, a minimum speech length, a
little padding). Regions are then packed, in order, into chunks of at most 30 s of speech, as
faster-whisper's batched pipeline does: a chunk's audio is its regions' audio joined, so the
silence between them never reaches the decoder. :meth:`Chunk.to_file` maps a time in a chunk's
joined audio back to the file's timeline (segment and word timestamps).

A file is streamed (:meth:`VoiceActivity.stream`): read and searched 10 minutes at a time, the
VAD's state carried from piece to piece, so memory stays bounded on hours-long files; a speech
region that runs over a piece's end is cut there (into two regions, usually in one chunk).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from encdec_models.audio import N_SAMPLES, SAMPLE_RATE
from encdec_models.silero_vad import VadState

DEFAULT_THRESHOLD = 0.5  # speech probability from which a frame is speech (Silero's default)
DEFAULT_MIN_SILENCE = 0.5  # s: shorter pauses do not end a speech region
MIN_SPEECH_MS = 250  # shorter bursts are not speech (Silero's default)
SPEECH_PAD_MS = 200  # kept on each side of a region, so no word edge is cut
PIECE_SAMPLES = 10 * 60 * SAMPLE_RATE  # a file is read and searched 10 min at a time (38 MB)
FRAME = 512  # samples per VAD probability


@dataclass(frozen=True)
class VadOptions:
    threshold: float = DEFAULT_THRESHOLD
    min_silence: float = DEFAULT_MIN_SILENCE  # seconds

    def __post_init__(self):
        if not 0 < self.threshold < 1:
            raise ValueError(f"--vad-threshold must be between 0 and 1, got {self.threshold}")
        if self.min_silence < 0:
            raise ValueError(f"--min-silence must be >= 0 seconds, got {self.min_silence}")


@dataclass(frozen=True)
class Chunk:
    """Speech regions ``pieces`` ([start, end) samples of the file), decoded as one joined audio."""

    pieces: tuple[tuple[int, int], ...]

    @property
    def start(self) -> int:
        return self.pieces[0][0]

    @property
    def end(self) -> int:
        return self.pieces[-1][1]

    @property
    def samples(self) -> int:
        return sum(e - s for s, e in self.pieces)

    def audio(self, audio: np.ndarray) -> np.ndarray:
        """The chunk's regions of the file's ``audio``, joined."""
        return np.concatenate([audio[s:e] for s, e in self.pieces])

    def to_file(self, t: float, end: bool = False) -> float:
        """Seconds into the joined audio -> seconds into the file. A time on the seam of two pieces
        is the end of the first when ``end``, else the start of the second."""
        x = t * SAMPLE_RATE
        joined = 0
        for i, (s, e) in enumerate(self.pieces):
            n = e - s
            last = i == len(self.pieces) - 1
            if x < joined + n or (end and x <= joined + n) or last:
                return (s + min(max(x - joined, 0), n)) / SAMPLE_RATE
            joined += n
        raise AssertionError("unreachable")


def pack(regions: list[tuple[int, int]], max_samples: int = N_SAMPLES) -> list[Chunk]:
    """Consecutive regions joined while their speech fits ``max_samples`` (each region fits)."""
    chunks, current, size = [], [], 0
    for s, e in regions:
        if current and size + (e - s) > max_samples:
            chunks.append(Chunk(tuple(current)))
            current, size = [], 0
        current.append((s, e))
        size += e - s
    if current:
        chunks.append(Chunk(tuple(current)))
    return chunks


_import_lock = threading.Lock()


def _post_processing():
    with _import_lock:
        threads = torch.get_num_threads()  # importing silero_vad sets torch's threads to 1
        try:
            from silero_vad import get_speech_timestamps_from_probs
        finally:
            torch.set_num_threads(threads)
    return get_speech_timestamps_from_probs


class VoiceActivity:
    """Speech regions and chunks of whole files, on ``device`` (the engine's)."""

    def __init__(self, opts: VadOptions, device: torch.device | str = "cpu"):
        from encdec_models.silero_vad import load_silero_vad

        self.opts = opts
        self.device = torch.device(device)
        with _import_lock:
            self.model = load_silero_vad(str(self.device))
        self._timestamps = _post_processing()
        # on a GPU the VAD runs on its own stream, beside the engine's work
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def probs(self, audio: np.ndarray, state: VadState | None = None) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))
        if self._stream is None:
            return self.model.probs(x, state).numpy()
        with torch.cuda.stream(self._stream):
            return self.model.probs(x.pin_memory().to(self.device, non_blocking=True), state).numpy()

    def regions(self, audio: np.ndarray) -> list[tuple[int, int]]:
        """[start, end) samples of each speech region of 16 kHz ``audio``, each <= 30 s."""
        return self._regions(self.probs(audio), len(audio)) if len(audio) else []

    def _regions(self, probs: np.ndarray, samples: int) -> list[tuple[int, int]]:
        if samples == 0:
            return []
        found = self._timestamps(
            probs.tolist(),
            sampling_rate=SAMPLE_RATE,
            threshold=self.opts.threshold,
            min_speech_duration_ms=MIN_SPEECH_MS,
            max_speech_duration_s=N_SAMPLES / SAMPLE_RATE,
            min_silence_duration_ms=round(self.opts.min_silence * 1000),
            speech_pad_ms=SPEECH_PAD_MS,
            audio_length_samples=samples,
        )
        regions = [(int(r["start"]), min(int(r["end"]), samples)) for r in found]
        return [(s, e) for s, e in regions if e > s]

    def chunks(self, audio: np.ndarray) -> list[Chunk]:
        return pack(self.regions(audio))

    def stream(
        self, blocks: Iterable[tuple[int, np.ndarray]], piece_samples: int = PIECE_SAMPLES
    ) -> Iterator[tuple[Chunk, np.ndarray]]:
        """Chunks of a file read as consecutive ``(start, samples)`` blocks, in bounded memory: the
        audio is taken ``piece_samples`` at a time (the VAD's state carries on, so its probabilities
        are those of the whole file), each piece's regions packed into chunks. Yields (chunk, its
        joined audio); ``self.samples_read`` is the file's length once the blocks are exhausted."""
        state = VadState()
        self.samples_read = 0
        held: list[np.ndarray] = []  # audio not yet run, from file sample `base`
        base = held_samples = 0

        def run_piece(audio: np.ndarray):
            nonlocal base
            probs = self.probs(audio, state)
            for chunk in pack(self._regions(probs, len(audio))):
                shifted = Chunk(tuple((s + base, e + base) for s, e in chunk.pieces))
                yield shifted, chunk.audio(audio)
            base += len(audio)
            self.samples_read = base

        for _, samples in blocks:
            held.append(samples)
            held_samples += len(samples)
            if held_samples >= piece_samples:
                audio = np.concatenate(held)
                whole = len(audio) // FRAME * FRAME  # every piece but the last: whole frames
                held, held_samples = [audio[whole:]], len(audio) - whole
                yield from run_piece(audio[:whole])
        if held_samples:
            yield from run_piece(np.concatenate(held))


__all__ = ["Chunk", "VadOptions", "VoiceActivity", "pack"]
