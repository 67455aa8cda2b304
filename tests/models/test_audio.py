"""Audio features (encdec_models/audio.py) and audio input (encdec_cli/io/audio.py)."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch

from encdec_cli.io.audio import (
    AUDIO_EXTENSIONS,
    AudioError,
    iter_audio_windows,
    load_audio,
    split_on_silence,
)
from encdec_models.audio import (
    N_FRAMES,
    N_SAMPLES,
    SAMPLE_RATE,
    log_mel_spectrogram,
    mel_filters,
    pad_or_trim,
)

# ---------------------------------------------------------------- log-mel features


@pytest.mark.parametrize("n_mels", [80, 128])
def test_mel_filters_match_feature_extractor(n_mels):
    from transformers import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor(feature_size=n_mels)
    ours = mel_filters(n_mels)
    assert ours.shape == (n_mels, 201)
    np.testing.assert_allclose(ours.numpy(), fe.mel_filters.T, atol=1e-7)
    assert mel_filters(n_mels) is ours  # cached per (n_mels, device)


@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel_matches_feature_extractor(n_mels, example_clips):
    from transformers import WhisperFeatureExtractor

    waves = [load_audio(c.path) for c in example_clips]
    ref = WhisperFeatureExtractor(feature_size=n_mels)(
        waves, sampling_rate=SAMPLE_RATE, return_tensors="np"
    ).input_features
    batch = torch.stack([torch.from_numpy(pad_or_trim(w)) for w in waves])  # [B, N_SAMPLES]
    ours = log_mel_spectrogram(batch, n_mels)
    assert ours.shape == (len(waves), n_mels, N_FRAMES) and ours.dtype == torch.float32
    assert np.abs(ours.numpy() - ref).max() < 1e-3
    # one example alone gives the same features as inside the batch (per-example max)
    single = log_mel_spectrogram(batch[1], n_mels)
    assert single.shape == (n_mels, N_FRAMES)
    torch.testing.assert_close(single, ours[1])


def test_pad_or_trim():
    x = np.arange(10, dtype=np.float32)
    assert pad_or_trim(x, 4).tolist() == [0, 1, 2, 3]
    assert pad_or_trim(x, 12).tolist() == list(range(10)) + [0, 0]
    t = torch.ones(2, 5)
    assert pad_or_trim(t, 7).shape == (2, 7) and pad_or_trim(t, 7)[:, 5:].abs().sum() == 0
    assert pad_or_trim(torch.ones(3)).shape == (N_SAMPLES,)


def test_log_mel_rejects_bad_input():
    with pytest.raises(ValueError, match="80 or 128"):
        log_mel_spectrogram(torch.zeros(1, N_SAMPLES), 64)
    with pytest.raises(ValueError, match="B, samples"):
        log_mel_spectrogram(torch.zeros(1, 1, N_SAMPLES), 80)


# ---------------------------------------------------------------- load_audio


def test_load_audio_example_formats(example_clips):
    for clip in example_clips:
        info = sf.info(str(clip.path))
        audio = load_audio(clip.path)
        assert audio.dtype == np.float32 and audio.ndim == 1
        assert abs(len(audio) - info.duration * SAMPLE_RATE) <= 2
        assert 0.1 < np.abs(audio).max() <= 1.0
        assert np.array_equal(load_audio(clip.path.read_bytes()), audio)  # bytes == path


def test_load_audio_stereo_44k_flac(example_clips):
    flac = next(c.path for c in example_clips if c.path.suffix == ".flac")
    data, sr = sf.read(str(flac), dtype="float32", always_2d=True)
    assert (sr, data.shape[1]) == (44100, 2)
    expected = soxr.resample(data.mean(axis=1), sr, SAMPLE_RATE, quality="HQ")
    np.testing.assert_allclose(load_audio(flac), expected, atol=1e-6)


def test_load_audio_downmix_and_resample(tmp_path):
    sr = 8000
    t = np.arange(sr) / sr  # 1 s
    tone = (0.5 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)
    path = tmp_path / "left_only.wav"
    sf.write(path, np.stack([tone, np.zeros_like(tone)], axis=1), sr, subtype="FLOAT")
    audio = load_audio(path)
    assert len(audio) == SAMPLE_RATE
    assert abs(np.abs(audio[1000:-1000]).max() - 0.25) < 0.01  # (L + R) / 2
    spectrum = np.abs(np.fft.rfft(audio))
    assert abs(np.argmax(spectrum) * SAMPLE_RATE / len(audio) - 440.0) <= 1.0


def _write_bad(tmp_path, kind: str):
    path = tmp_path / f"{kind}.wav"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "zero_length":
        sf.write(path, np.zeros(0, np.float32), SAMPLE_RATE)
    elif kind == "text":
        path.write_text("this is a text file, not a recording\n" * 10)
    elif kind == "truncated_header":
        sf.write(path, np.zeros(1000, np.float32), SAMPLE_RATE)
        path.write_bytes(path.read_bytes()[:30])
    elif kind in ("nan", "inf"):
        x = np.full(SAMPLE_RATE, 0.1, np.float32)
        x[4000] = np.nan if kind == "nan" else np.inf
        sf.write(path, x, SAMPLE_RATE, subtype="FLOAT")
    elif kind == "absurd_rate":
        sf.write(path, np.full(100, 0.1, np.float32), 100)
    elif kind == "missing":
        pass
    return path


BAD_FILES = {
    "empty": "empty",
    "zero_length": "no audio samples",
    "text": "text file, not audio",
    "truncated_header": "could not be decoded",
    "nan": "NaN or infinite",
    "inf": "NaN or infinite",
    "absurd_rate": "sample rate 100 Hz",
    "missing": "does not exist",
}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_audio_errors(tmp_path, kind):
    path = _write_bad(tmp_path, kind)
    with pytest.raises(AudioError, match=BAD_FILES[kind]) as err:
        load_audio(path)
    assert path.name in str(err.value)  # the message names the file
    with pytest.raises(AudioError, match=BAD_FILES[kind]):
        list(iter_audio_windows(path))


def test_audio_errors_bytes():
    assert issubclass(AudioError, ValueError)
    with pytest.raises(AudioError, match="empty"):
        load_audio(b"")
    with pytest.raises(AudioError, match="not a readable audio file"):
        load_audio(b"\x00\x01garbage" * 50)


def test_audio_extensions():
    for ext in (
        "wav",
        "flac",
        "mp3",
        "ogg",
        "opus",
        "m4a",
        "aac",
        "wma",
        "aiff",
        "aif",
        "webm",
        "mp4",
        "mkv",
    ):
        assert ext in AUDIO_EXTENSIONS


# ---------------------------------------------------------------- windows


def _speech_with_silences(example_clips, min_seconds: float = 70.0):
    """Trimmed speech clips separated by (near) silences; returns audio and silence spans."""
    rng = np.random.default_rng(0)
    speech = []
    for clip in example_clips:
        audio = load_audio(clip.path)
        loud = np.nonzero(np.abs(audio) > 0.02)[0]
        speech.append(audio[loud[0] : loud[-1] + 1])
    parts, silences, pos, i = [], [], 0, 0
    while pos < min_seconds * SAMPLE_RATE:
        clip = speech[i % len(speech)]
        parts.append(clip)
        pos += len(clip)
        gap = int(rng.uniform(0.3, 1.0) * SAMPLE_RATE)
        # A noise floor below espeak's own pauses (RMS ~1.3e-5 after "morning," etc.), so the
        # quietest point of any 5 s search span lies in one of these known silences.
        parts.append(rng.normal(0.0, 1e-6, gap).astype(np.float32))
        silences.append((pos, pos + gap))
        pos += gap
        i += 1
    return np.concatenate(parts), silences


def _check_cover(spans, n, max_len=N_SAMPLES):
    assert spans[0][0] == 0 and spans[-1][1] == n
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
        assert end == start
    assert all(0 < e - s <= max_len for s, e in spans)


def test_split_on_silence_cuts_in_pauses(example_clips):
    audio, silences = _speech_with_silences(example_clips)
    assert len(audio) > 60 * SAMPLE_RATE
    spans = split_on_silence(audio)
    _check_cover(spans, len(audio))
    assert len(spans) >= 3
    for _, cut in spans[:-1]:
        assert any(lo <= cut <= hi for lo, hi in silences), f"cut at {cut / SAMPLE_RATE:.2f} s is in speech"


def test_split_on_silence_short_and_empty():
    assert split_on_silence(np.zeros(10 * SAMPLE_RATE, np.float32)) == [(0, 10 * SAMPLE_RATE)]
    assert split_on_silence(np.zeros(N_SAMPLES, np.float32)) == [(0, N_SAMPLES)]
    assert split_on_silence(np.zeros(0, np.float32)) == []
    spans = split_on_silence(np.zeros(N_SAMPLES + 1, np.float32))
    _check_cover(spans, N_SAMPLES + 1)
    with pytest.raises(ValueError):
        split_on_silence(np.zeros(10, np.float32), max_seconds=0)


def test_iter_audio_windows_matches_split(example_clips, tmp_path):
    audio, _ = _speech_with_silences(example_clips)
    path = tmp_path / "long.wav"
    sf.write(path, audio, SAMPLE_RATE, subtype="FLOAT")
    windows = list(iter_audio_windows(path))
    assert [(s, s + len(w)) for s, w in windows] == split_on_silence(audio)
    for start, window in windows:
        assert window.dtype == np.float32
        assert np.array_equal(window, audio[start : start + len(window)])


def test_iter_audio_windows_resamples_stereo(example_clips, tmp_path):
    audio, _ = _speech_with_silences(example_clips, min_seconds=40.0)
    stereo = soxr.resample(audio, SAMPLE_RATE, 44100)[:, None].repeat(2, axis=1)
    path = tmp_path / "long44k.flac"
    sf.write(path, stereo, 44100)
    windows = list(iter_audio_windows(path))
    whole = load_audio(path)
    spans = [(s, s + len(w)) for s, w in windows]
    _check_cover(spans, len(whole))
    np.testing.assert_allclose(np.concatenate([w for _, w in windows]), whole, atol=1e-5)
