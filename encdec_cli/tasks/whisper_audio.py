"""Whole-file Whisper features for sequential long-form decoding (openai-whisper computes the
log-mel spectrogram of the whole file once and slides 30 s windows over it)."""

from __future__ import annotations

import numpy as np
import torch

from encdec_models.audio import DYNAMIC_RANGE, HOP_LENGTH, LOG_FLOOR, N_FFT, _hann_window, mel_filters

BLOCK_FRAMES = 30_000  # frames per STFT block (5 min): bounds the complex STFT's memory (~50 MB)


def file_log_mel(audio: np.ndarray, n_mels: int = 80) -> torch.Tensor:
    """Log-mel features of a whole file: ``[n_mels, len(audio) // HOP_LENGTH]`` float32 on the CPU.

    The same numbers as ``encdec_models.audio.log_mel_spectrogram`` on the unpadded waveform (centred
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


__all__ = ["file_log_mel"]
