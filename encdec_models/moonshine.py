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
The front end runs the clips of an encoder batch together, in groups of similar lengths each
zero-padded to its longest (one group when the clips are alike): the
GroupNorm normalises over each clip's own valid conv1 frames only (``layers.masked_group_norm``; a
plain GroupNorm would count the padding in the shorter clips' statistics), and a clip's valid
conv2/conv3 frames read only its valid conv1 frames, so each clip's frames equal those of a run on
the clip alone. The valid frames are then gathered into the packed [T, d] of the encoder layers.
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
    logits_into,
    masked_group_norm,
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

    def front_end(self, waves: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """waves [B, N] zero-padded, item b's samples valid below lengths[b] ([B], on the device)
        -> frames [B, d, L] (L = encoder_frames(N)); item b's first encoder_frames(lengths[b])
        frames are those of its samples alone, the rest are padding."""
        x = torch.tanh(self.conv1(waves.to(self.conv1.weight.dtype)[:, None]))
        x = masked_group_norm(x, torch.div(lengths - 127, 64, rounding_mode="floor") + 1, self.groupnorm)
        x = F.gelu(self.conv2(x))
        return F.gelu(self.conv3(x))


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
        self.enc_rope: Rotary | None = None  # rotary tables of every position (post_load)
        self.dec_rope: Rotary | None = None

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
        """The rotary tables of every encoder frame and decoder position, on the weights' device and
        in their dtype: a step gathers its rows (two kernels) instead of computing them."""
        cfg, w = self.config, self.proj_out.weight
        tables = {}
        for stack, heads, n in (
            ("encoder", cfg.encoder_num_attention_heads, self.max_source_positions),
            ("decoder", cfg.decoder_num_attention_heads, self.max_target_positions),
        ):
            inv_freq, d = _inv_freq(cfg, heads).to(w.device), self.head_dims[stack]
            tables[stack] = Rotary.table(inv_freq, n, w.dtype, interleaved=True, head_dim=d)
        self.enc_rope, self.dec_rope = tables["encoder"], tables["decoder"]

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
        """items: waveforms of any lengths -> an encoder batch whose front end runs in a few groups
        of similar lengths (``front_end_groups``): the clips sorted longest first, a group's clips
        at least half as long as its first, each group zero-padded to its longest (padding at most
        doubles the samples, however mixed the lengths: a 30 s clip does not pad a hundred 1 s ones
        to 30 s). inputs: every group's [rows, width] float32 samples, flattened one after another
        (built in pinned memory for a CUDA device: one copy); ``input_lengths``: each row's valid
        samples; ``pack_index`` [2, T]: the (row in its group, frame) of every valid frame, groups
        in order; ``pack_order`` ([T], None when the groups keep the items' order): the rows of that
        packing in the items' order, which cu_seqlens describes."""
        device = torch.device(device)
        waves = [x.detach().cpu().float().reshape(-1) if torch.is_tensor(x) else _as_tensor(x) for x in items]
        lengths = np.array([len(w) for w in waves])
        frames = np.array([encoder_frames(n) for n in lengths])
        order = np.argsort(-lengths, kind="stable")  # longest first; equal lengths keep their order
        groups, row_in_group = [], np.zeros(len(waves), np.int64)
        for i in order:  # groups of [rows, width, frames]
            if groups and 2 * lengths[i] >= groups[-1][1]:
                groups[-1][0] += 1
                groups[-1][2] += int(frames[i])
            else:
                groups.append([1, int(lengths[i]), int(frames[i])])
            row_in_group[i] = groups[-1][0] - 1
        inputs = torch.empty(sum(r * w for r, w, _ in groups), pin_memory=device.type == "cuda")
        start, k = 0, 0
        for rows, width, _ in groups:
            block = inputs[start : start + rows * width].view(rows, width)
            for row in block:
                w = waves[order[k]]
                row[: len(w)] = w
                row[len(w) :] = 0
                k += 1
            start += rows * width
        f = frames[order]  # frames of the rows, groups in order
        item = np.repeat(row_in_group[order], f)
        frame = np.arange(item.size) - np.repeat(np.cumsum(f) - f, f)
        parts = [[0], np.cumsum(frames), lengths[order], item, frame]
        identity = bool((order == np.arange(len(order))).all())
        if not identity:  # item i's frames start at its rows' place in the group-ordered packing
            at = np.empty(len(order), np.int64)
            at[order] = np.cumsum(f) - f
            parts.append(np.repeat(at - (np.cumsum(frames) - frames), frames) + np.arange(item.size))
        meta = host_to_device(torch.from_numpy(np.concatenate(parts).astype(np.int64)), device)  # one copy
        b, t = len(waves), item.size
        return EncoderBatch(
            host_to_device(inputs, device),
            meta[: b + 1].to(torch.int32),
            int(frames.max()),
            input_lengths=meta[b + 1 : 2 * b + 1],
            pack_index=meta[2 * b + 1 : 2 * b + 1 + 2 * t].view(2, t),
            pack_order=None if identity else meta[2 * b + 1 + 2 * t :],
            front_end_groups=[tuple(g) for g in groups],
        )

    # ---- the pieces around the layer stacks (encdec_models/base.py runs the stacks) ---------------
    def encoder_layers(self):
        return self.encoder.layers

    def embed_encoder(self, batch: EncoderBatch) -> torch.Tensor:
        return self.packed_frames(batch)

    def packed_frames(self, batch: EncoderBatch) -> torch.Tensor:
        """The front end over the batch's groups -> every item's valid frames packed in the items'
        order [T, d]; no host sync."""
        enc = self.encoder
        parts, s, r, t = [], 0, 0, 0
        for rows, width, frames in batch.front_end_groups:
            waves = batch.inputs[s : s + rows * width].view(rows, width)
            y = enc.front_end(waves, batch.input_lengths[r : r + rows])  # [rows, d, L]
            item, frame = batch.pack_index[:, t : t + frames]
            parts.append(y[item, :, frame])  # [frames, d]: the group's valid frames, packed
            s, r, t = s + rows * width, r + rows, t + frames
        x = parts[0] if len(parts) == 1 else torch.cat(parts)
        if batch.pack_order is not None:  # back to the items' order
            x = x.index_select(0, batch.pack_order)
        return x

    def encoder_layer_args(self, batch: EncoderBatch, x) -> tuple:
        positions = packed_positions(batch.cu_seqlens, x.shape[0])  # a frame's index in its clip
        return (batch.cu_seqlens, batch.max_seqlen, self.enc_rope.rows(positions))

    def finish_encoder(self, x, residual) -> torch.Tensor:
        return final_norm(self.encoder.layer_norm, x, residual)

    def embed_decoder(self, tokens, positions) -> torch.Tensor:
        return self.decoder.embed_tokens(tokens)

    def decoder_layer_args(self, meta: AttentionMetadata, positions, x) -> tuple:
        return (meta, self.dec_rope.rows(positions))

    def decoder_head(self, x, residual, meta: AttentionMetadata, out=None) -> torch.Tensor:
        x = final_norm(self.decoder.norm, x, residual, meta.logits_indices)
        return logits_into(x, self.proj_out.weight, out)
