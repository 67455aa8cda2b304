"""Whisper log-mel features in torch: batched, on any device.

Matches transformers' `WhisperFeatureExtractor` (and openai-whisper's
`log_mel_spectrogram`): 25 ms Hann window, 10 ms hop, slaney mel filterbank,
log10, clamp to (max - 8) per example, then (x + 4) / 4.
"""

from __future__ import annotations

import threading

import numpy as np
import torch
import torch.nn.functional as F

SAMPLE_RATE = 16000  # Hz; every Whisper model expects 16 kHz mono audio
N_FFT = 400  # 25 ms analysis window at 16 kHz
HOP_LENGTH = 160  # 10 ms between frames at 16 kHz
CHUNK_LENGTH = 30  # seconds of audio per encoder input
N_SAMPLES = CHUNK_LENGTH * SAMPLE_RATE  # 480000 samples in one 30 s chunk
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000 mel frames in one chunk (encoder halves it to 1500)
FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH  # 100 mel frames per second: the unit of "seek"
INPUT_STRIDE = 2  # mel frames per encoder position (conv2 stride): frames per timestamp step
N_AUDIO_CTX = N_FRAMES // INPUT_STRIDE  # 1500 encoder positions per window
TIME_PRECISION = INPUT_STRIDE / FRAMES_PER_SECOND  # 0.02 s between timestamp tokens (one position)
LOG_FLOOR = 1e-10  # power floor before log10, avoids log(0)
DYNAMIC_RANGE = 8.0  # log10 units kept below each example's maximum (80 dB)

BLOCK_FRAMES = 30_000  # frames per STFT block (5 min): bounds the complex STFT's memory (~50 MB)

_MEL_CACHE: dict[tuple[int, str], torch.Tensor] = {}
_WINDOW_CACHE: dict[str, torch.Tensor] = {}
_LOCK = threading.Lock()


def _device_key(device: torch.device) -> str:
    return str(device)


def mel_filters(n_mels: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The slaney-normalised mel filterbank, `[n_mels, N_FFT // 2 + 1]` float32, cached per device.

    Same numbers as `librosa.filters.mel(sr=16000, n_fft=400, n_mels=n_mels)` (what openai-whisper
    ships in `mel_filters.npz` and what `WhisperFeatureExtractor.mel_filters` holds, transposed).
    """
    if n_mels not in (80, 128):
        raise ValueError(f"Whisper uses 80 or 128 mel bins, got n_mels={n_mels}")
    device = torch.device(device)
    key = (n_mels, _device_key(device))
    filters = _MEL_CACHE.get(key)
    if filters is None:
        from transformers.audio_utils import mel_filter_bank  # what WhisperFeatureExtractor uses

        bank = mel_filter_bank(
            num_frequency_bins=N_FFT // 2 + 1,
            num_mel_filters=n_mels,
            min_frequency=0.0,
            max_frequency=SAMPLE_RATE / 2,
            sampling_rate=SAMPLE_RATE,
            norm="slaney",
            mel_scale="slaney",
        ).T  # [n_mels, 201]
        filters = torch.from_numpy(np.asarray(bank, dtype=np.float32)).to(device)
        with _LOCK:
            filters = _MEL_CACHE.setdefault(key, filters)
    return filters


def _hann_window(device: torch.device) -> torch.Tensor:
    key = _device_key(device)
    window = _WINDOW_CACHE.get(key)
    if window is None:
        window = torch.hann_window(N_FFT, device=device)  # periodic, as torch.stft expects
        with _LOCK:
            window = _WINDOW_CACHE.setdefault(key, window)
    return window


def pad_or_trim(audio: torch.Tensor | np.ndarray, length: int = N_SAMPLES) -> torch.Tensor | np.ndarray:
    """Zero-pad or cut the last axis to `length` samples (keeps the input's type, dtype and device)."""
    n = audio.shape[-1]
    if n == length:
        return audio
    if isinstance(audio, np.ndarray):
        if n > length:
            return audio[..., :length]
        widths = [(0, 0)] * (audio.ndim - 1) + [(0, length - n)]
        return np.pad(audio, widths)
    if n > length:
        return audio[..., :length]
    return F.pad(audio, (0, length - n))


def log_mel_spectrogram(audio: torch.Tensor, n_mels: int = 80) -> torch.Tensor:
    """Whisper encoder input features.

    Args:
        audio: `[B, N_SAMPLES]` (or `[N_SAMPLES]`) float32 waveform at 16 kHz, already
            padded/trimmed to 30 s with `pad_or_trim`. Any device.
        n_mels: 80 (tiny..large-v2) or 128 (large-v3).

    Returns:
        `[B, n_mels, N_FRAMES]` float32 (`[n_mels, N_FRAMES]` for 1-D input) on `audio.device`,
        normalised per example like `WhisperFeatureExtractor`.
    """
    squeeze = audio.dim() == 1
    if squeeze:
        audio = audio.unsqueeze(0)
    if audio.dim() != 2:
        raise ValueError(f"audio must be [B, samples], got shape {tuple(audio.shape)}")
    audio = audio.to(torch.float32)
    window = _hann_window(audio.device)
    # stft: [B, N_FFT // 2 + 1, N_FRAMES + 1] (center=True, reflect padding)
    stft = torch.stft(audio, N_FFT, HOP_LENGTH, window=window, return_complex=True)
    power = stft[..., :-1].abs().square().contiguous()  # drop the last frame: [B, 201, N_FRAMES]
    mel = mel_filters(n_mels, audio.device) @ power  # [B, n_mels, N_FRAMES]
    log_spec = mel.clamp_min(LOG_FLOOR).log10()
    peak = log_spec.amax(dim=(1, 2), keepdim=True)  # [B, 1, 1]
    log_spec = torch.maximum(log_spec, peak - DYNAMIC_RANGE)
    log_spec = (log_spec + 4.0) / 4.0
    return log_spec.squeeze(0) if squeeze else log_spec


def file_log_mel(audio: np.ndarray, n_mels: int = 80) -> torch.Tensor:
    """Log-mel features of a whole file: ``[n_mels, len(audio) // HOP_LENGTH]`` float32 on the CPU.

    The same numbers as ``log_mel_spectrogram`` on the unpadded waveform (centred
    STFT with reflect padding, the last frame dropped, clamped to the file's maximum - 8, then
    (x + 4) / 4), computed in blocks of frames so an hours-long file needs no giant STFT."""
    wave = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))
    n_frames = len(wave) // HOP_LENGTH
    half = N_FFT // 2
    mode = "reflect" if len(wave) > half else "constant"
    padded = torch.nn.functional.pad(wave[None, None], (half, half), mode=mode)[0, 0]
    window, filters = _hann_window(wave.device), mel_filters(n_mels)
    out = torch.empty(n_mels, n_frames)
    for a in range(0, n_frames, BLOCK_FRAMES):
        b = min(a + BLOCK_FRAMES, n_frames)
        chunk = padded[a * HOP_LENGTH : (b - 1) * HOP_LENGTH + N_FFT]  # frames a..b-1
        stft = torch.stft(chunk, N_FFT, HOP_LENGTH, window=window, center=False, return_complex=True)
        out[:, a:b] = (filters @ stft.abs().square()).clamp_min(LOG_FLOOR).log10()  # [n_mels, b - a]
    if n_frames:
        out = torch.maximum(out, out.max() - DYNAMIC_RANGE)
    return (out + 4.0) / 4.0
