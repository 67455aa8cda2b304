"""Audio input: decode any file to 16 kHz mono float32, and cut long audio into <= 30 s windows.

- `load_audio(path_or_bytes)`: whole file in memory (short clips, items of a table); also
  decoded `Samples` at any rate (a datasets `{array, sampling_rate}` cell).
- `split_on_silence(audio)`: window bounds for audio longer than 30 s, each cut in a pause.
- `iter_audio_windows(path)`: the same windows, streamed block by block from disk, so an
  hours-long recording is never fully in memory.

Decoding: libsndfile (soundfile) first: WAV, FLAC, OGG/Vorbis/Opus, MP3, AIFF, ...; other
formats (m4a, aac, wma, webm, mp4, ...) go through audioread, which needs ffmpeg or
GStreamer on the machine. Every failure is an `AudioError` with a message for the user; a file
that is read but damaged (a WAV cut short of the length its header gives) adds a message to the
caller's `warnings` list.
"""

from __future__ import annotations

import io
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import soxr

from encdec_models.audio import CHUNK_LENGTH, SAMPLE_RATE

# Read by libsndfile (soundfile); a file with one of these names that it cannot open is broken.
_LIBSNDFILE_EXTENSIONS = frozenset(
    {"wav", "wave", "flac", "mp3", "ogg", "oga", "opus", "aiff", "aif", "aifc", "au", "snd", "caf", "w64"}
)
# Need ffmpeg or GStreamer through audioread.
_FFMPEG_EXTENSIONS = frozenset({"m4a", "aac", "wma", "webm", "mp4", "mkv", "mka", "mov", "amr", "3gp"})
AUDIO_EXTENSIONS = _LIBSNDFILE_EXTENSIONS | _FFMPEG_EXTENSIONS  # lower case, without the dot

MIN_SAMPLE_RATE = 4_000  # Hz; below this no speech band survives (telephony is 8 kHz)
MAX_SAMPLE_RATE = 768_000  # Hz; the highest rate real recording formats use
RESAMPLE_QUALITY = "HQ"  # soxr "high quality": 20-bit precision, flat to 95% of Nyquist
STREAM_BLOCK_SECONDS = 10.0  # seconds of source audio read per block by `iter_audio_windows`
CUT_SEARCH_SECONDS = 5.0  # a cut is searched in the last this-many seconds before the limit
CUT_FRAME_SECONDS = 0.1  # RMS window for finding the quietest point (longer than a stop closure)
CUT_HOP_SECONDS = 0.01  # RMS window step: cut positions are on a 10 ms grid

# libsndfile's log line for a data chunk longer in its header than in the file:
# "data : 124852 (should be 62404)"
_SHORT_DATA = re.compile(r"^\s*(?:data|SSND)\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)
_FFMPEG_HINT = "install ffmpeg (e.g. `apt install ffmpeg`) to read m4a/aac/wma/webm/mp4 files"


class AudioError(ValueError):
    """An audio input that cannot be used; the message says which file and what to do."""


@dataclass(frozen=True)
class Samples:
    """Decoded audio, as Hugging Face ``datasets`` holds it: ``array`` is ``[samples]`` or
    ``[channels, samples]`` (any numeric sequence), ``sampling_rate`` in Hz."""

    array: Any
    sampling_rate: Any


def _describe(source: str | os.PathLike | bytes | Samples) -> str:
    if isinstance(source, Samples):
        return "<decoded audio samples>"
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes of audio>"
    return f"'{os.fspath(source)}'"


def _check_path(path: Path) -> None:
    if not path.exists():
        if path.is_symlink():
            raise AudioError(f"'{path}' is a broken symbolic link (its target is missing, or it loops)")
        raise AudioError(f"audio file '{path}' does not exist")
    if not path.is_file():
        raise AudioError(f"'{path}' is not a file")
    if path.stat().st_size == 0:
        raise AudioError(f"audio file '{path}' is empty (0 bytes)")


def _check_format(name: str, sample_rate: int, channels: int, frames: int | None) -> None:
    if not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:
        raise AudioError(
            f"{name} has sample rate {sample_rate} Hz, outside the supported "
            f"{MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz; the file header is probably corrupt"
        )
    if channels < 1:
        raise AudioError(f"{name} has no audio channels")
    if frames == 0:
        raise AudioError(f"{name} contains no audio samples (zero length)")


def _check_length(f: sf.SoundFile, name: str, warnings: list[str] | None) -> None:
    """Note a file whose header promises more audio data than it holds (a truncated download or copy):
    what is there is transcribed, with a warning on the item."""
    m = _SHORT_DATA.search(f.extra_info) if warnings is not None else None
    if m and int(m.group(2)) < int(m.group(1)):
        promised, held = int(m.group(1)), int(m.group(2))
        warnings.append(
            f"{name} is truncated: its header gives {promised} bytes of audio data, the file holds {held}; "
            f"transcribed the {f.frames / f.samplerate:.2f} s that are there"
        )


def _check_finite(name: str, samples: np.ndarray, sample_rate: int, offset_seconds: float = 0.0) -> None:
    """Reject NaN/inf samples: they would silently turn every feature of the window into NaN."""
    finite = np.isfinite(samples).reshape(len(samples), -1).all(axis=1)  # [frames]
    if not finite.all():
        first = int(np.argmin(finite))
        raise AudioError(
            f"{name} contains NaN or infinite sample values (first at "
            f"{offset_seconds + first / sample_rate:.2f} s); the file is corrupt or was written "
            "from invalid data"
        )


def _to_mono_16k(name: str, data: np.ndarray, sample_rate: int) -> np.ndarray:
    """`[frames, channels]` at any rate -> `[samples]` float32 mono at 16 kHz."""
    _check_finite(name, data, sample_rate)
    mono = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    if sample_rate != SAMPLE_RATE:
        mono = soxr.resample(mono, sample_rate, SAMPLE_RATE, quality=RESAMPLE_QUALITY)
    return np.ascontiguousarray(mono, dtype=np.float32)


def _samples_mono_16k(name: str, samples: Samples) -> np.ndarray:
    rate = samples.sampling_rate
    if not isinstance(rate, (int, np.integer)) or isinstance(rate, bool):
        raise AudioError(f"{name} have no integer sampling_rate (got {rate!r})")
    try:
        data = np.asarray(samples.array if samples.array is not None else [], dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise AudioError(f"{name} are not an array of numbers ({e})") from None
    if data.ndim not in (1, 2):
        raise AudioError(f"{name} have {data.ndim} dimensions; expected [samples] or [channels, samples]")
    data = data[:, None] if data.ndim == 1 else data.T  # [frames, channels]
    _check_format(name, int(rate), data.shape[1], len(data))
    return _to_mono_16k(name, data, int(rate))


def _read_soundfile(source: bytes | io.BytesIO, name: str, warnings: list[str] | None) -> np.ndarray:
    with sf.SoundFile(source) as f:
        _check_format(name, f.samplerate, f.channels, f.frames)
        _check_length(f, name, warnings)
        data = f.read(dtype="float32", always_2d=True)  # [frames, channels]
        sample_rate = f.samplerate
    if len(data) == 0:
        raise AudioError(f"{name} contains no audio samples (zero length)")
    return _to_mono_16k(name, data, sample_rate)


def _read_audioread(path: str, name: str) -> np.ndarray:
    import audioread  # a librosa dependency; backends: ffmpeg, GStreamer, stdlib wave/aifc

    with audioread.audio_open(path) as f:
        sample_rate, channels = int(f.samplerate), int(f.channels)
        _check_format(name, sample_rate, channels, None)
        pcm = b"".join(f)  # interleaved 16-bit little-endian PCM
    samples = np.frombuffer(pcm[: len(pcm) - len(pcm) % (2 * channels)], dtype="<i2")
    if samples.size == 0:
        raise AudioError(f"{name} contains no audio samples (zero length)")
    data = samples.reshape(-1, channels).astype(np.float32) / 32768.0  # int16 full scale -> [-1, 1)
    return _to_mono_16k(name, data, sample_rate)


def _looks_like_text(path: str) -> bool:
    """True when the file starts with printable UTF-8 and no NUL byte (audio headers have both)."""
    with open(path, "rb") as f:
        head = f.read(512)
    if b"\x00" in head:
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = head[:-4].decode("utf-8", errors="replace")  # may end inside a multi-byte char
        if "\ufffd" in text:
            return False
    return all(c.isprintable() or c in "\t\r\n" for c in text)


def _fallback(path: str, name: str, suffix: str, first: sf.LibsndfileError) -> np.ndarray:
    """libsndfile could not open the file: try audioread, else explain what is wrong."""
    import audioread

    reason = first.error_string
    if _looks_like_text(path):
        raise AudioError(f"{name} is a text file, not audio") from first
    try:
        return _read_audioread(path, name)
    except audioread.NoBackendError as e:
        if suffix in _LIBSNDFILE_EXTENSIONS or suffix not in AUDIO_EXTENSIONS:
            msg = f"{name} is not a readable audio file ({reason}); it is corrupt or not audio"
        else:
            msg = f"{name} could not be decoded: no decoder for .{suffix} on this machine; {_FFMPEG_HINT}"
        raise AudioError(msg) from e
    except AudioError:
        raise
    except Exception as e:  # any decoder failure on arbitrary bytes means "cannot decode"
        raise AudioError(f"{name} could not be decoded ({reason}); the file may be corrupt") from e


def load_audio(source: str | os.PathLike | bytes | Samples, warnings: list[str] | None = None) -> np.ndarray:
    """Decode a file (path), in-memory file contents (bytes) or samples to `[samples]` float32 mono
    16 kHz. A truncated file is read as far as it goes, with a message added to ``warnings``.

    Raises:
        AudioError: missing, empty, zero-length, non-audio, corrupt, NaN/inf samples,
            or an impossible sample rate.
    """
    name = _describe(source)
    if isinstance(source, Samples):
        return _samples_mono_16k(name, source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise AudioError("audio input is empty (0 bytes)")
        try:
            return _read_soundfile(io.BytesIO(data), name, warnings)
        except sf.LibsndfileError as first:
            with tempfile.NamedTemporaryFile(suffix=".audio") as tmp:
                tmp.write(data)
                tmp.flush()
                return _fallback(tmp.name, name, "", first)
    path = Path(source)
    _check_path(path)
    try:
        return _read_soundfile(os.fsencode(path), name, warnings)  # bytes: any Linux file name
    except sf.LibsndfileError as first:
        return _fallback(str(path), name, path.suffix.lower().lstrip("."), first)


def _find_cut(audio: np.ndarray, lo: int, hi: int, sample_rate: int = SAMPLE_RATE) -> int:
    """The quietest point of `audio[lo:hi]` (absolute index in `(lo, hi]`).

    Energy is the sum of squares over `CUT_FRAME_SECONDS` windows stepped by `CUT_HOP_SECONDS`;
    the cut is the centre of the quietest window. Among (near-)equally quiet windows, e.g. a
    stretch of digital silence, it takes the middle of the last quiet run, so windows stay long.
    Only `audio[lo:hi]` is read, so a streaming caller gets the same cut as a whole-array one.
    """
    frame = max(1, int(CUT_FRAME_SECONDS * sample_rate))
    hop = max(1, int(CUT_HOP_SECONDS * sample_rate))
    region = audio[lo:hi].astype(np.float64)
    if len(region) <= frame:
        return hi
    csum = np.concatenate([[0.0], np.cumsum(region * region)])
    starts = np.arange(0, len(region) - frame + 1, hop)
    energy = csum[starts + frame] - csum[starts]  # [n_windows]
    quiet = energy <= energy.min() * (1.0 + 1e-6) + 1e-12  # ties: digital silence, float noise
    last = len(quiet) - 1 - int(np.argmax(quiet[::-1]))
    first = last
    while first > 0 and quiet[first - 1]:
        first -= 1
    best = (first + last) // 2
    return lo + int(starts[best]) + frame // 2


def _cut_bounds(max_seconds: float, sample_rate: int) -> tuple[int, int]:
    if max_seconds <= 0:
        raise ValueError(f"max_seconds must be positive, got {max_seconds}")
    max_len = int(round(max_seconds * sample_rate))
    search = min(int(CUT_SEARCH_SECONDS * sample_rate), max_len // 2)
    return max_len, search


def split_on_silence(
    audio: np.ndarray, max_seconds: float = float(CHUNK_LENGTH), sample_rate: int = SAMPLE_RATE
) -> list[tuple[int, int]]:
    """Window bounds `[(start, end), ...]` (sample indices) covering `audio` exactly, in order.

    Each window is at most `max_seconds` long. Audio no longer than that is one window; longer
    audio is cut at the quietest point of the last `CUT_SEARCH_SECONDS` before each limit, so
    cuts fall in pauses rather than mid-word. Empty audio gives no windows.
    """
    n = len(audio)
    max_len, search = _cut_bounds(max_seconds, sample_rate)
    spans: list[tuple[int, int]] = []
    start = 0
    while n - start > max_len:
        cut = _find_cut(audio, start + max_len - search, start + max_len, sample_rate)
        spans.append((start, cut))
        start = cut
    if n > start:
        spans.append((start, n))
    return spans


def iter_audio_windows(
    path: str | os.PathLike, max_seconds: float = float(CHUNK_LENGTH), warnings: list[str] | None = None
) -> Iterator[tuple[int, np.ndarray]]:
    """Stream `(start_sample, window)` pairs: float32 mono 16 kHz windows of at most `max_seconds`.

    Same windows as `split_on_silence(load_audio(path))` but read block by block, holding at most
    one window plus one block in memory. `start_sample` counts 16 kHz samples from the file start.
    Formats libsndfile cannot read (m4a, ...) are decoded whole through `load_audio`. A truncated
    file adds a message to ``warnings``.
    """
    p = Path(path)
    _check_path(p)
    name = _describe(path)
    max_len, search = _cut_bounds(max_seconds, SAMPLE_RATE)
    try:
        f = sf.SoundFile(os.fsencode(p))
    except sf.LibsndfileError:
        audio = load_audio(p, warnings)  # not streamable by libsndfile: decode whole (raises AudioError)
        for start, end in split_on_silence(audio, max_seconds):
            yield start, audio[start:end]
        return
    with f:
        _check_format(name, f.samplerate, f.channels, f.frames)
        _check_length(f, name, warnings)
        buf = np.zeros(0, dtype=np.float32)  # pending 16 kHz samples, buf[0] is sample `buf_start`
        buf_start = 0
        for chunk in _stream_mono_16k(f, name):
            buf = np.concatenate([buf, chunk])
            while len(buf) > max_len:  # more than one window left: cut the next one off
                cut = _find_cut(buf, max_len - search, max_len)
                yield buf_start, buf[:cut].copy()
                buf, buf_start = buf[cut:], buf_start + cut
        if len(buf):
            yield buf_start, buf


def _stream_mono_16k(f: sf.SoundFile, name: str) -> Iterator[np.ndarray]:
    """Float32 mono 16 kHz chunks of an open file, one per `STREAM_BLOCK_SECONDS` block."""
    sample_rate = f.samplerate
    resampler = None
    if sample_rate != SAMPLE_RATE:
        resampler = soxr.ResampleStream(
            sample_rate, SAMPLE_RATE, 1, dtype="float32", quality=RESAMPLE_QUALITY
        )
    blocks = f.blocks(blocksize=int(STREAM_BLOCK_SECONDS * sample_rate), dtype="float32", always_2d=True)
    read_frames = 0
    while True:
        try:
            block = next(blocks)  # [frames, channels]
        except StopIteration:
            break
        except sf.LibsndfileError as e:
            raise AudioError(
                f"{name} could not be decoded after {read_frames / sample_rate:.1f} s ({e.error_string}); "
                "the file may be corrupt"
            ) from e
        _check_finite(name, block, sample_rate, read_frames / sample_rate)
        read_frames += len(block)
        mono = block.mean(axis=1, dtype=np.float32) if block.shape[1] > 1 else block[:, 0]
        yield mono if resampler is None else resampler.resample_chunk(mono, last=False)
    if read_frames == 0:
        raise AudioError(f"{name} contains no audio samples (zero length)")
    if resampler is not None:
        yield resampler.resample_chunk(np.zeros(0, np.float32), last=True)  # flush the filter tail
