"""--vad on CUDA: the VAD runs on the engine's GPU (its own stream) with the CPU's probabilities and
regions, fast enough never to hold the engine up (an hour of audio in seconds)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from encdec_cli.tasks.vad import VadOptions, VoiceActivity
from tests.support.transcribe_clips import SENTENCES, build_with_gaps, have_espeak

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not have_espeak(), reason="espeak-ng not installed"),
]


def test_vad_on_cuda_matches_the_cpu_and_is_fast():
    gaps = [("silence", 5), ("noise", 12), ("tones", 8), ("silence", 25)]
    audio, truth = build_with_gaps(SENTENCES[:4], gaps)
    cpu, gpu = VoiceActivity(VadOptions(), "cpu"), VoiceActivity(VadOptions(), "cuda")
    p_cpu, p_gpu = cpu.probs(audio), gpu.probs(audio)
    assert np.abs(p_cpu - p_gpu).max() < 1e-3
    assert gpu.regions(audio) == cpu.regions(audio) and len(cpu.regions(audio)) == len(truth)

    hour = np.tile(audio, int(3600 * 16000 / len(audio)) + 1)[: 3600 * 16000]
    gpu.regions(hour[: 16000 * 60])  # warm up
    torch.cuda.synchronize()
    start = time.perf_counter()
    regions = gpu.regions(hour)
    seconds = time.perf_counter() - start
    print(
        f"VAD of 1 h of audio on {torch.cuda.get_device_name()}: {seconds:.2f} s (RTFx {3600 / seconds:,.0f})"
    )
    assert len(regions) >= 4 * (len(hour) // len(audio)) and seconds < 20
