"""Moonshine (``MoonshineForConditionalGeneration``, transformers ``moonshine``) on the shared layers.

A speech recognizer whose encoder reads the raw 16 kHz waveform at any length (no 30 s padding,
no log-mel): conv1 (kernel 127, stride 64, no bias) -> tanh -> GroupNorm(1 group) -> conv2
(kernel 7, stride 3) -> GELU -> conv3 (kernel 3, stride 2) -> GELU gives L = ((N - 127) // 64 + 1
- 7) // 3 + 1 - 3) // 2 + 1 frames, which run through the packed variable-length encoder path
(``cu_seqlens``: each clip its own length, no padding). Checked against transformers' modeling file:
- pre-norm layers with bias-free LayerNorms; attention without biases (``attention_bias``);
- interleaved partial rotary positions (``partial_rotary_factor`` of each head) in encoder and
  decoder self-attention, none in cross-attention; grouped-query K/V repeated at load time;
- encoder MLP fc2(GELU(fc1(x))) with biases; decoder MLP: fc1 gives [value | gate] halves,
  fc2(SiLU(gate) * value) (split into our gated MLP's ``up`` and ``fc1`` at load time);
- decoder tokens without absolute positions, ``proj_out`` tied to the embedding unless stored.
The GroupNorm normalises over a clip's own conv1 frames, so each clip's front end runs alone (a
batch padded to its longest clip would change the shorter clips' statistics).
"""

from __future__ import annotations

import re

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from encdec_models.base import AttentionMetadata, CacheSpec, EncDecModel, EncoderBatch, host_to_device
from encdec_models.layers import (
    DecoderLayer,
    EncoderLayer,
    LayerConfig,
    Norm,
    Rotary,
    final_norm,
    repeat_kv_heads,
)
from encdec_models.text import packed_positions
from encdec_models.whisper import _as_tensor, _check_finite

SAMPLE_RATE = 16000
MIN_SAMPLES = 127 + 64 * 16  # the shortest waveform that gives one encoder frame (about 0.07 s)
MAX_SECONDS = 64  # Moonshine was trained on clips up to ~30 s; longer clips are cut by the task layer

_RENAME = (
    ("self_attn.o_proj", "self_attn.out_proj"),
    ("encoder_attn.o_proj", "encoder_attn.out_proj"),
    ("input_layernorm", "self_attn_layer_norm"),
)
_KV_RE = re.compile(r"\.(self_attn|encoder_attn)\.(k|v)_proj\.(weight|bias)$")
_DEC_FC1_RE = re.compile(r"^model\.decoder\.layers\.(\d+)\.mlp\.fc1\.(weight|bias)$")


def encoder_frames(num_samples: int) -> int:
    """Encoder frames of a waveform of ``num_samples`` (transformers' _get_feat_extract_output_lengths)."""
    n1 = int((num_samples - 127) / 64 + 1)
    n2 = int((n1 - 7) / 3 + 1)
    return int((n2 - 3) / 2 + 1)


def _layer_config(cfg, heads: int, act: str, gated: bool) -> LayerConfig:
    head_dim = cfg.hidden_size // heads
    return LayerConfig(
        d_model=cfg.hidden_size,
        num_heads=heads,
        head_dim=head_dim,
        d_ff=cfg.intermediate_size,
        activation=act,
        gated=gated,
        pre_norm=True,
        norm="layer",
        norm_eps=1e-5,
        bias=cfg.attention_bias,
        scale=head_dim**-0.5,
        mlp_bias=True,
    )


class MoonshineEncoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d = cfg.hidden_size
        self.conv1 = nn.Conv1d(1, d, kernel_size=127, stride=64, bias=False)
        self.conv2 = nn.Conv1d(d, 2 * d, kernel_size=7, stride=3)
        self.conv3 = nn.Conv1d(2 * d, d, kernel_size=3, stride=2)
        self.groupnorm = nn.GroupNorm(num_groups=1, num_channels=d, eps=1e-5)
        lc = _layer_config(cfg, cfg.encoder_num_attention_heads, cfg.encoder_hidden_act, gated=False)
        self.layers = nn.ModuleList(EncoderLayer(lc) for _ in range(cfg.encoder_num_hidden_layers))
        self.layer_norm = Norm(d, "layer", 1e-5)

    def front_end(self, wave: torch.Tensor) -> torch.Tensor:
        """wave [N] -> frames [L, d]."""
        x = torch.tanh(self.conv1(wave.to(self.conv1.weight.dtype)[None, None]))
        x = self.groupnorm(x)
        x = F.gelu(self.conv2(x))
        x = F.gelu(self.conv3(x))
        return x[0].transpose(0, 1)


class MoonshineDecoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        lc = _layer_config(cfg, cfg.decoder_num_attention_heads, cfg.decoder_hidden_act, gated=True)
        self.layers = nn.ModuleList(DecoderLayer(lc) for _ in range(cfg.decoder_num_hidden_layers))
        self.norm = Norm(cfg.hidden_size, "layer", 1e-5)


def _inv_freq(cfg, heads: int) -> torch.Tensor:
    head_dim = cfg.hidden_size // heads
    rope = cfg.rope_parameters or {}
    dim = int(head_dim * rope.get("partial_rotary_factor", 1.0))
    base = float(rope.get("rope_theta", 10000.0))
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float) / dim))


class Moonshine(EncDecModel):
    """Encoder inputs are 16 kHz mono waveforms of any length (numpy / list / 1-D tensor)."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.encoder = MoonshineEncoder(cfg)
        self.decoder = MoonshineDecoder(cfg)
        self.proj_out = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie = getattr(cfg, "tie_word_embeddings", True)
        heads = cfg.decoder_num_attention_heads
        d = cfg.hidden_size
        self.cache_spec = CacheSpec(cfg.decoder_num_hidden_layers, heads, d // heads, d)
        self.max_target_positions = cfg.max_position_embeddings
        self.max_source_positions = encoder_frames(MAX_SECONDS * SAMPLE_RATE)
        self.vocab_size = cfg.vocab_size
        self.n_rep = {
            "encoder": cfg.encoder_num_attention_heads
            // (cfg.encoder_num_key_value_heads or cfg.encoder_num_attention_heads),
            "decoder": heads // (cfg.decoder_num_key_value_heads or heads),
        }
        self.head_dims = {
            "encoder": cfg.hidden_size // cfg.encoder_num_attention_heads,
            "decoder": cfg.hidden_size // heads,
        }
        self.register_buffer("enc_inv_freq", torch.empty(0), persistent=False)
        self.register_buffer("dec_inv_freq", torch.empty(0), persistent=False)

    # ---- weights ----------------------------------------------------------------------------------
    def adapt_checkpoint(self, tensors):
        """Grouped-query K/V repeated to every head; the decoder's fc1 [value | gate] split into our
        gated MLP's ``up`` (value) and ``fc1`` (gate)."""
        for name, w in tensors:
            m = _DEC_FC1_RE.match(name)
            if m is not None:
                value, gate = w.chunk(2, dim=0)
                yield f"model.decoder.layers.{m[1]}.mlp.fc1.{m[2]}", gate
                yield f"model.decoder.layers.{m[1]}.mlp.up.{m[2]}", value
                continue
            if _KV_RE.search(name):
                stack = "decoder" if ".decoder." in name else "encoder"
                w = repeat_kv_heads(w, self.n_rep[stack], self.head_dims[stack])
            yield name, w

    def rename(self, name: str) -> str | None:
        if name == "proj_out.weight":
            return name
        name = name.removeprefix("model.")
        if ".layers." in name:
            stack = name.split(".", 1)[0]
            for theirs, ours in _RENAME:
                name = name.replace(f".{theirs}.", f".{ours}.")
            if stack == "encoder":
                name = name.replace(".post_attention_layernorm.", ".final_layer_norm.")
            else:
                name = name.replace(".post_attention_layernorm.", ".encoder_attn_layer_norm.")
                name = name.replace(".final_layernorm.", ".final_layer_norm.")
        return name

    def fill_missing(self, name: str) -> bool:
        if name.endswith("norm.bias") or name.endswith(".out_proj.bias"):  # bias-free in Moonshine
            self.get_parameter(name).data.zero_()
            return True
        if name == "proj_out.weight" and self.tie:
            self.proj_out.weight = self.decoder.embed_tokens.weight
            return True
        return False

    def post_load(self) -> None:
        cfg = self.config
        self.enc_inv_freq = _inv_freq(cfg, cfg.encoder_num_attention_heads).to(self.proj_out.weight.device)
        self.dec_inv_freq = _inv_freq(cfg, cfg.decoder_num_attention_heads).to(self.proj_out.weight.device)

    def decoder_layers(self):
        return self.decoder.layers

    # ---- encoder inputs ---------------------------------------------------------------------------
    def encoder_length(self, item) -> int:
        """Checks one waveform (a 1-D array / list / tensor of numbers, finite); its encoder frames."""
        if torch.is_tensor(item):
            ok, n = item.dim() == 1 and not item.is_complex() and item.dtype != torch.bool, item.shape[0]
            x = item
        elif isinstance(item, (str, bytes)) or not hasattr(item, "__len__"):
            raise ValueError(f"audio must be a waveform (a 1-D array of samples), got {type(item).__name__}")
        else:
            try:
                x = np.asarray(item)
            except (TypeError, ValueError):
                x = np.asarray(item, dtype=object)
            ok, n = x.ndim == 1 and x.dtype.kind in "fiu", len(x)
        if not ok:
            raise ValueError("audio must be a 1-D array of numbers (16 kHz mono)")
        if n < MIN_SAMPLES:
            raise ValueError(f"audio of {n} samples is too short for Moonshine (at least {MIN_SAMPLES})")
        frames = encoder_frames(n)
        if frames > self.max_source_positions:
            raise ValueError(f"audio of {n / SAMPLE_RATE:.1f} s is longer than {MAX_SECONDS} s; cut it first")
        _check_finite(x, "audio")
        return frames

    def prepare_encoder_batch(self, items, device) -> EncoderBatch:
        """items: waveforms of any lengths -> inputs [N_total] float32 (concatenated samples),
        cu_seqlens over encoder frames, each item's samples at ``input_offsets``."""
        device = torch.device(device)
        waves = [x.detach().cpu().float() if torch.is_tensor(x) else _as_tensor(x) for x in items]
        frames = [encoder_frames(len(w)) for w in waves]
        inputs = host_to_device(torch.cat(waves), device)
        cu = torch.tensor([0, *np.cumsum(frames)], dtype=torch.int32)
        offsets = [0, *np.cumsum([len(w) for w in waves]).tolist()]
        return EncoderBatch(inputs, host_to_device(cu, device), max(frames), input_offsets=offsets)

    # ---- the pieces around the layer stacks (encdec_models/base.py runs the stacks) ---------------
    def encoder_layers(self):
        return self.encoder.layers

    def embed_encoder(self, batch: EncoderBatch) -> torch.Tensor:
        enc, off = self.encoder, batch.input_offsets
        return torch.cat([enc.front_end(batch.inputs[a:b]) for a, b in zip(off, off[1:])])  # [T, d]

    def encoder_layer_args(self, batch: EncoderBatch, x) -> tuple:
        positions = packed_positions(batch.cu_seqlens, x.shape[0])
        rope = Rotary.at(self.enc_inv_freq, positions, x.dtype, interleaved=True)
        return (batch.cu_seqlens, batch.max_seqlen, rope)

    def finish_encoder(self, x, residual) -> torch.Tensor:
        return final_norm(self.encoder.layer_norm, x, residual)

    def embed_decoder(self, tokens, positions) -> torch.Tensor:
        return self.decoder.embed_tokens(tokens)

    def decoder_layer_args(self, meta: AttentionMetadata, positions, x) -> tuple:
        return (meta, Rotary.at(self.dec_inv_freq, positions, x.dtype, interleaved=True))

    def decoder_head(self, x, residual, meta: AttentionMetadata) -> torch.Tensor:
        x = final_norm(self.decoder.norm, x, residual, meta.logits_indices)
        return F.linear(x, self.proj_out.weight)
