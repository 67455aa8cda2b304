"""Whisper (every size, including large-v3's 128 mel bins) on the shared layers."""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from encdec_models.audio import N_AUDIO_CTX, N_FRAMES, N_SAMPLES, SAMPLE_RATE, log_mel_spectrogram
from encdec_models.base import AttentionMetadata, CacheSpec, EncDecModel, EncoderBatch, host_to_device
from encdec_models.layers import DecoderLayer, EncoderLayer, LayerConfig, Norm, final_norm, logits_into


def _is_log_mel(item) -> bool:
    return torch.is_tensor(item) and item.dim() == 2


def _as_tensor(x) -> torch.Tensor:
    """A waveform (numpy array or list of numbers) as a float32 CPU tensor, sharing a float32
    array's memory (torch warns that a read-only array stays read-only: it is only read here)."""
    a = np.asarray(x, dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)


def _check_finite(x, what: str) -> None:
    """NaN or inf in an input would silently turn every encoder output into NaN."""
    if torch.is_tensor(x):
        if x.device.type == "cpu" and x.is_floating_point() and not bool(torch.isfinite(x).all()):
            raise ValueError(f"NaN or infinite values in the {what}")
    elif x.dtype.kind == "f" and not np.isfinite(x).all():
        raise ValueError(f"NaN or infinite values in the {what}")


class WhisperEncoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d = cfg.d_model
        self.conv1 = nn.Conv1d(cfg.num_mel_bins, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(cfg.max_source_positions, d)
        lc = LayerConfig.layer_norm_style(
            cfg, cfg.encoder_attention_heads, cfg.encoder_ffn_dim, pre_norm=True
        )
        self.layers = nn.ModuleList(EncoderLayer(lc) for _ in range(cfg.encoder_layers))
        self.layer_norm = Norm(d, "layer", 1e-5)


class WhisperDecoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.embed_positions = nn.Embedding(cfg.max_target_positions, cfg.d_model)
        lc = LayerConfig.layer_norm_style(
            cfg, cfg.decoder_attention_heads, cfg.decoder_ffn_dim, pre_norm=True
        )
        self.layers = nn.ModuleList(DecoderLayer(lc) for _ in range(cfg.decoder_layers))
        self.layer_norm = Norm(cfg.d_model, "layer", 1e-5)


class Whisper(EncDecModel):
    """Encoder inputs are 16 kHz mono waveforms (np/torch, at most 30 s) or log-mel features
    [n_mels, 3000]; the encoder computes log-mel on the engine's device."""

    absorb_cross_by_default = True  # 1500 encoder rows a request

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.encoder = WhisperEncoder(cfg)
        self.decoder = WhisperDecoder(cfg)
        heads = cfg.decoder_attention_heads
        self.cache_spec = CacheSpec(cfg.decoder_layers, heads, cfg.d_model // heads, cfg.d_model)
        self.max_target_positions = cfg.max_target_positions
        self.max_source_positions = N_AUDIO_CTX
        self.vocab_size = cfg.vocab_size
        self.n_mels = cfg.num_mel_bins

    # Weight names: HF "model.encoder.layers.0.fc1.weight" -> "encoder.layers.0.mlp.fc1.weight".
    @staticmethod
    def rename(name: str) -> str | None:
        if name.startswith("proj_out."):
            return None  # tied to decoder.embed_tokens
        name = name.removeprefix("model.")
        for fc in (".fc1.", ".fc2."):
            name = name.replace(fc, ".mlp" + fc)
        return name

    def decoder_layers(self):
        return self.decoder.layers

    def encoder_length(self, item) -> int:
        """Checks one encoder input: a 16 kHz mono waveform of at most 30 s (a 1-D numpy array,
        tensor or list of numbers) or log-mel features [n_mels, 3000] (a tensor), with finite
        values (checked for host data; a CUDA tensor is not read back, which would wait for the
        GPU). ValueError otherwise, so that request alone fails."""
        if _is_log_mel(item):
            if tuple(item.shape) != (self.n_mels, N_FRAMES):
                raise ValueError(
                    f"log-mel features must be [{self.n_mels}, {N_FRAMES}], got {list(item.shape)}"
                )
            _check_finite(item, "log-mel features")
            return N_AUDIO_CTX
        if torch.is_tensor(item):
            ok = item.dim() == 1 and not item.is_complex() and item.dtype != torch.bool
            shape = tuple(item.shape)
        elif isinstance(item, (str, bytes)) or not hasattr(item, "__len__"):
            raise ValueError(f"audio must be a waveform (a 1-D array of samples), got {type(item).__name__}")
        else:
            try:
                x = np.asarray(item)
            except (TypeError, ValueError):  # ragged nesting
                x = np.asarray(item, dtype=object)
            ok, shape = x.ndim == 1 and (x.dtype.kind in "fiu" or x.size == 0), x.shape
        if not ok:
            raise ValueError(
                f"audio must be a 1-D array of numbers (16 kHz mono) or log-mel [{self.n_mels}, {N_FRAMES}], "
                f"got shape {list(shape)}"
            )
        if shape[0] > N_SAMPLES:
            raise ValueError(
                f"audio of {shape[0] / SAMPLE_RATE:.1f} s is longer than one 30 s window; "
                "encdec transcribe (or tasks.transcribe.Transcriber) windows long audio"
            )
        _check_finite(item if torch.is_tensor(item) else x, "audio")
        return N_AUDIO_CTX

    def prepare_encoder_batch(self, items, device) -> EncoderBatch:
        """items: waveforms (<= 30 s) or precomputed log-mel [n_mels, 3000], in any mix."""
        device = torch.device(device)
        mel = [_is_log_mel(x) for x in items]
        if all(mel):
            inputs = host_to_device(torch.stack([x.float() for x in items]), device)
        else:
            waves = [x for x, m in zip(items, mel, strict=True) if not m]
            host = torch.empty((len(waves), N_SAMPLES), pin_memory=device.type == "cuda")
            for i, x in enumerate(waves):  # torch's copies: several threads for these MB-sized rows
                x = x.detach().cpu().float() if torch.is_tensor(x) else _as_tensor(x)
                host[i, : len(x)].copy_(x)
                host[i, len(x) :].zero_()
            inputs = host_to_device(host, device)
            if any(mel):  # a mix: the waveforms' log-mel here, beside the given features
                computed = iter(self.features(inputs))
                inputs = torch.stack(
                    [host_to_device(x.float(), device) if m else next(computed) for x, m in zip(items, mel)]
                )
        cu = torch.arange(0, len(items) + 1, dtype=torch.int32, device=device) * N_AUDIO_CTX
        return EncoderBatch(inputs=inputs, cu_seqlens=cu, max_seqlen=N_AUDIO_CTX)

    def graph_encoder_batch(self, device) -> EncoderBatch:
        """One silent 30 s waveform: the shape of every waveform batch of one item."""
        return self.prepare_encoder_batch([np.zeros(N_SAMPLES, np.float32)], device)

    def features(self, inputs: torch.Tensor) -> torch.Tensor:
        """[B, N_SAMPLES] waveforms or [B, n_mels, 3000] features -> [B, n_mels, 3000]."""
        if inputs.dim() == 3:
            return inputs
        return log_mel_spectrogram(inputs, self.n_mels)

    def encoder_layers(self):
        return self.encoder.layers

    def embed_encoder(self, batch: EncoderBatch) -> torch.Tensor:
        enc = self.encoder
        dtype = enc.conv1.weight.dtype
        x = self.features(batch.inputs).to(dtype)
        x = F.gelu(enc.conv1(x))
        x = F.gelu(enc.conv2(x)).transpose(1, 2)  # [B, 1500, d]
        x = x + enc.embed_positions.weight[: x.shape[1]]
        return x.reshape(-1, x.shape[-1]).contiguous()  # [B*1500, d]

    def finish_encoder(self, x, residual) -> torch.Tensor:
        return final_norm(self.encoder.layer_norm, x, residual)

    def embed_decoder(self, tokens, positions) -> torch.Tensor:
        dec = self.decoder
        return dec.embed_tokens(tokens) + dec.embed_positions(positions)

    def decoder_head(self, x, residual, meta: AttentionMetadata, out=None) -> torch.Tensor:
        dec = self.decoder
        x = final_norm(dec.layer_norm, x, residual, meta.logits_indices)
        return logits_into(x, dec.embed_tokens.weight, out)

    def teacher_forced(
        self, tokens: torch.Tensor, enc: torch.Tensor, heads: dict[int, list[int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder over whole [B, T] token sequences attending to ``enc`` [B, S, d], in plain
        PyTorch on this model's own layers (no cache, no kernels): the logits [B, T, V] and the
        cross-attention logits of the given heads ({layer: [head, ...]}) [B, n, T, S], for word
        alignment (the kernels return no attention weights)."""
        dec = self.decoder
        B, T = tokens.shape
        x = dec.embed_tokens(tokens) + dec.embed_positions(torch.arange(T, device=tokens.device))
        d = x.shape[-1]
        kept = []

        def norm(mod, y):
            return mod(y.reshape(-1, d)).view(y.shape)

        for li, layer in enumerate(dec.layers):
            sa, ca = layer.self_attn, layer.encoder_attn
            h, hd = sa.h, sa.d
            q, k, v = sa.qkv_proj(norm(layer.self_attn_layer_norm, x)).view(B, T, 3, h, hd).unbind(2)
            a = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=sa.scale
            )  # [B, H, T, D]
            x = x + sa.out_proj(a.transpose(1, 2).reshape(B, T, h * hd))
            q = ca.q_proj(norm(layer.encoder_attn_layer_norm, x)).view(B, T, h, hd).transpose(1, 2)
            kc, vc = ca.kv_proj(enc).view(B, enc.shape[1], 2, h, hd).unbind(2)
            kc, vc = kc.transpose(1, 2), vc.transpose(1, 2)  # [B, H, S, D]
            if li in heads:
                sel = heads[li]
                kept.append((q[:, sel].float() @ kc[:, sel].float().transpose(-1, -2)) * ca.scale)
            a = F.scaled_dot_product_attention(q, kc, vc, scale=ca.scale)
            x = x + ca.out_proj(a.transpose(1, 2).reshape(B, T, h * hd))
            x = x + layer.mlp(norm(layer.final_layer_norm, x))
        x = norm(dec.layer_norm, x)
        return F.linear(x, dec.embed_tokens.weight), torch.cat(kept, dim=1)
