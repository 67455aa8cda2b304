"""Random-weight Whisper models that give diverse (non-degenerate) greedy outputs.

Standard init (std 0.02) makes a random decoder repeat one token whatever the input, and two
such outputs agreeing proves little. Weights ~ N(0, (3/sqrt(fan_in))^2) and unit-variance
embeddings make every layer matter: outputs differ between inputs and within a sequence.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration

from encdec_models.loading import LoadedModel, build_model, iter_checkpoint

SOT, EOT, PAD = 1, 2, 0


def discriminating_init_(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 3 / p.shape[-1] ** 0.5)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def random_whisper(path: Path, seed: int = 0, **overrides) -> WhisperForConditionalGeneration:
    """Build, initialise and save_pretrained a small random Whisper; returns the HF model."""
    kw = dict(
        vocab_size=1000,
        num_mel_bins=80,
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_target_positions=64,
        decoder_start_token_id=SOT,
        eos_token_id=EOT,
        pad_token_id=PAD,
        bos_token_id=EOT,
        suppress_tokens=[],
        begin_suppress_tokens=[],
    )
    kw.update(overrides)
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(WhisperConfig(**kw)).eval()
    discriminating_init_(model, seed)
    model.save_pretrained(path)
    return model


def load_ours(path: Path, dtype=torch.float32) -> LoadedModel:
    """Our model from a saved folder, without a tokenizer (random models have none)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path)
    arch = "WhisperForConditionalGeneration"
    model = build_model(arch, cfg, iter_checkpoint(path), torch.device("cpu"), dtype)
    return LoadedModel(model, None, cfg, GenerationConfig(), arch, path)
