"""How a GPU KV pool is sized (``runner.fit_blocks``), with the device's memory figures stood in:
memory torch's caching allocator holds but no tensor uses (a dropped engine's pool) counts as free,
and when too little is left the error says how much is in use and by whom."""

from __future__ import annotations

from types import SimpleNamespace
from unittest import mock

import pytest
import torch

from encdec_cli.engine.config import EngineConfig
from encdec_cli.engine.runner import fit_blocks

GIB = 1 << 30
SPEC = SimpleNamespace(num_heads=4, head_dim=16)


def _model(vocab=100, encoder_bytes_a_token=64 * 48):
    return SimpleNamespace(
        cache_spec=SPEC,
        vocab_size=vocab,
        encoder_activation_bytes=lambda tokens: tokens * encoder_bytes_a_token,
    )


MODEL = _model()


def fit(free, total, reserved, allocated, per_block=1 << 20, model=MODEL, logit_rows=8, **config):
    with (
        mock.patch("torch.cuda.mem_get_info", return_value=(free, total)),
        mock.patch("torch.cuda.memory_reserved", return_value=reserved),
        mock.patch("torch.cuda.memory_allocated", return_value=allocated),
    ):
        cfg = EngineConfig(gpu_memory_utilization=0.9, **config)
        return fit_blocks(model, cfg, per_block, torch.device("cuda"), logit_rows)


def test_cached_unused_memory_counts_as_free():
    # 9 GiB in use on the device, 8 of them torch's cache of a freed pool: ~8 GiB for this pool
    # (0.9 x 10 GiB - 1 GiB, less the activations' room and 256 MiB of attention split partials)
    blocks = fit(free=1 * GIB, total=10 * GIB, reserved=8.5 * GIB, allocated=0.5 * GIB)
    assert 7.65 * 1024 < blocks <= 7.75 * 1024
    # the same device with those 8 GiB held by live tensors: no room
    with pytest.raises(RuntimeError, match="in use") as err:
        fit(free=1 * GIB, total=10 * GIB, reserved=8.5 * GIB, allocated=8.5 * GIB)
    assert "9.0 of 10.0 GiB in use, 8.5 GiB by this process" in str(err.value)
    assert "Engine.close()" in str(err.value) and "--max-num-seqs" in str(err.value)


def test_room_for_a_decode_steps_logits_and_the_encoders_activations():
    """The pool leaves room for the largest decode step (its logits, 16 bytes a value, and its
    layers' temporaries) and the model's own estimate of its largest encoder step."""
    # 2560 rows (512 sequences x 5 verification queries) of a 256,206-token vocabulary (NLLB): 10 GB
    big, rows = _model(vocab=256_206), 2560
    room = rows * (256_206 * 16 + 64 * 128)
    whole = dict(free=30 * GIB, total=30 * GIB, reserved=0, allocated=0)
    assert fit(**whole, model=big, logit_rows=0) - fit(**whole, model=big, logit_rows=rows) == pytest.approx(
        room / (1 << 20), abs=1
    )
    # the encoder's estimate comes from the model, at max_encoder_tokens
    heavy = _model(encoder_bytes_a_token=1 << 20)
    light = fit(**whole, model=MODEL, max_encoder_tokens=4096)
    assert light - fit(**whole, model=heavy, max_encoder_tokens=4096) == pytest.approx(
        4096 - 4096 * 64 * 48 / (1 << 20), abs=1
    )


def test_florence2_encoder_estimate_counts_its_vision_towers_first_stage():
    """Florence-2-large at 768 x 768 (W9): 577 encoder tokens an image, and its DaViT tower's first
    stage is a 192 x 192 grid of 256 channels with a 4x wider MLP: far more than 24 rows of
    d_model per encoder token (the OOM W9 hit on an 80 GB H100 with 28 images in a step)."""
    from encdec_models.base import CacheSpec
    from encdec_models.florence2 import Florence2

    vision = SimpleNamespace(embed_dim=(256, 512, 1024, 2048), mlp_ratio=4.0)
    fake = SimpleNamespace(
        config=SimpleNamespace(vision_config=vision),
        strides=[(7, 4, 3), (3, 2, 1), (3, 2, 1), (3, 2, 1)],
        cache_spec=CacheSpec(12, 16, 64, 1024),
    )
    per_image = Florence2.encoder_activation_bytes(fake, 577)
    # the first stage's rows of one image (192 x 192 = 64 x 576), 256 channels, MLP + 4 tensors, bf16
    assert per_image == 577 * 64 * 256 * 8 * 2
    assert per_image > 577 * 1024 * 2 * 24 * 5  # over 5x the generic estimate
    assert Florence2.encoder_activation_bytes(fake, 16_384) == 4 * GIB  # 16,384 tokens: 28 images a step
