"""The BART family in one implementation: BART, mBART, Marian, Pegasus, M2M100 / NLLB-200.

What differs between them (checked against transformers' modeling files):

| family        | layers | positions                         | layernorm_embedding | final norms |
|---------------|--------|-----------------------------------|---------------------|-------------|
| BART          | post   | learned, ids offset by 2          | yes                 | no          |
| mBART         | pre    | learned, ids offset by 2          | yes                 | yes         |
| Marian        | post   | sinusoidal, sin / cos halves      | no                  | no          |
| Pegasus       | pre    | sinusoidal, sin / cos halves      | no                  | yes         |
| M2M100 / NLLB | pre    | fairseq sinusoidal, from pad + 1  | no                  | yes         |

M2M100's fairseq table (NLLB-200 is the same ``m2m_100`` model) puts position i at row
``pad_token_id + 1 + i`` and a pad token at the all-zero row ``pad_token_id``, computed in float32
as transformers does (frequencies exp(-k log(10000) / (dim/2 - 1)), sin half then cos half). An
encoder token's position counts only the non-pad tokens before it; a decoder token's is its index.

Common to all, from the config: token embeddings scaled by sqrt(d_model) when
``scale_embedding``, the activation function, ``final_logits_bias`` added to the logits, an
lm_head tied to the decoder embedding unless the checkpoint stores its own. Marian may keep
separate encoder/decoder embeddings (``share_encoder_decoder_embeddings=False``, with its own
``decoder_vocab_size``). Decoder positions are each token's index in its decoder sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from encdec_models.base import AttentionMetadata, CacheSpec, EncoderBatch
from encdec_models.layers import DecoderLayer, EncoderLayer, LayerConfig, Norm, final_norm
from encdec_models.text import TextEncDecModel, packed_positions

LEARNED_POSITION_OFFSET = 2  # BART/mBART position ids start at 2 (a fairseq leftover)


@dataclass(frozen=True)
class Variant:
    pre_norm: bool  # x + f(norm(x)) (mBART, Pegasus, M2M100) instead of norm(x + f(x))
    positions: str  # "learned" (offset 2), "sinusoidal" (Marian/Pegasus) or "fairseq" (M2M100)
    layernorm_embedding: bool  # LayerNorm right after token + position embedding
    final_norm: bool  # LayerNorm after the last layer of each stack


VARIANTS = {
    "bart": Variant(pre_norm=False, positions="learned", layernorm_embedding=True, final_norm=False),
    "mbart": Variant(pre_norm=True, positions="learned", layernorm_embedding=True, final_norm=True),
    "marian": Variant(pre_norm=False, positions="sinusoidal", layernorm_embedding=False, final_norm=False),
    "pegasus": Variant(pre_norm=True, positions="sinusoidal", layernorm_embedding=False, final_norm=True),
    "m2m_100": Variant(pre_norm=True, positions="fairseq", layernorm_embedding=False, final_norm=True),
}


def sinusoidal_table(num_positions: int, dim: int) -> torch.Tensor:
    """[num_positions, dim] float32 Marian/Pegasus table: sin of every frequency in the first half,
    cos in the second (not interleaved); feature j has angle pos / 10000**(2*(j//2)/dim).
    Computed in float64 with numpy exactly as transformers does, then rounded to float32."""
    pos = np.arange(num_positions, dtype=np.float64)[:, None]
    j = np.arange(dim)
    angle = pos / np.power(10000, 2 * (j // 2) / dim)  # [P, dim]
    half = (dim + 1) // 2
    out = torch.empty(num_positions, dim, dtype=torch.float32)
    out[:, :half] = torch.from_numpy(np.sin(angle[:, 0::2]))
    out[:, half:] = torch.from_numpy(np.cos(angle[:, 1::2]))
    return out


def fairseq_sinusoidal_table(num_positions: int, dim: int, padding_idx: int) -> torch.Tensor:
    """[num_positions, dim] float32 M2M100 / NLLB table, exactly as transformers computes it (in
    float32 torch): row ``padding_idx`` is zero; sequence index i reads row padding_idx + 1 + i."""
    half = dim // 2
    step = math.log(10000) / (half - 1)
    freq = torch.exp(torch.arange(half, dtype=torch.int64).float() * -step)
    angle = torch.arange(num_positions, dtype=torch.int64).float().unsqueeze(1) * freq.unsqueeze(0)
    out = torch.cat([torch.sin(angle), torch.cos(angle)], dim=1).view(num_positions, -1)
    if dim % 2 == 1:
        out = torch.cat([out, torch.zeros(num_positions, 1)], dim=1)
    out[padding_idx, :] = 0
    return out


def nonpad_positions(ids: torch.Tensor, cu_seqlens: torch.Tensor, pad: int) -> torch.Tensor:
    """[T] index of every packed token among the non-pad tokens of its sequence (fairseq's encoder
    positions; a pad token's own value is not used)."""
    count = (ids != pad).long().cumsum(0)
    cu = cu_seqlens.long()
    before = torch.cat([count.new_zeros(1), count])[cu[:-1]]
    return count - torch.repeat_interleave(before, cu[1:] - cu[:-1], output_size=ids.shape[0]) - 1


class BartStack(nn.Module):
    """Positions, optional embedding/final norms and the layers of one side (encoder or decoder)."""

    def __init__(self, cfg, variant: Variant, layers: nn.ModuleList):
        super().__init__()
        d, n_pos = cfg.d_model, cfg.max_position_embeddings
        self.positions = variant.positions
        self.padding_idx = cfg.pad_token_id if variant.positions == "fairseq" else None
        if variant.positions == "learned":
            self.embed_positions = nn.Embedding(n_pos + LEARNED_POSITION_OFFSET, d)
        else:  # fixed table, computed by ``post_load`` (the model is built on the meta device)
            self.embed_positions = None
            rows = n_pos if self.padding_idx is None else n_pos + self.padding_idx + 1
            self.register_buffer("sinusoid", torch.empty(rows, d), persistent=False)
        self.layernorm_embedding = Norm(d, "layer", 1e-5) if variant.layernorm_embedding else None
        self.layers = layers
        self.layer_norm = Norm(d, "layer", 1e-5) if variant.final_norm else None

    def make_table(self) -> None:
        if self.embed_positions is not None:
            return
        rows, d = self.sinusoid.shape
        if self.padding_idx is None:
            self.sinusoid.copy_(sinusoidal_table(rows, d))
        else:
            self.sinusoid.copy_(fairseq_sinusoidal_table(rows, d, self.padding_idx))

    def embed(
        self, tokens: torch.Tensor, positions: torch.Tensor, ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """tokens: [T, d] scaled token embeddings of the token ids ``ids`` [T] (needed by the fairseq
        positions only: a pad token reads their zero row); positions: [T] index in the sequence -> [T, d]."""
        if self.embed_positions is not None:
            x = tokens + self.embed_positions(positions + LEARNED_POSITION_OFFSET)
        elif self.padding_idx is not None:  # fairseq: a pad token reads the zero row
            pad = self.padding_idx
            x = tokens + self.sinusoid[torch.where(ids == pad, pad, positions + (pad + 1))]
        else:
            x = tokens + self.sinusoid[positions]
        return x if self.layernorm_embedding is None else self.layernorm_embedding(x)


class Bart(TextEncDecModel):
    """BART, mBART, Marian, Pegasus and M2M100 / NLLB-200 (``config.model_type`` picks the variant)."""

    def __init__(self, cfg):
        super().__init__()
        if cfg.model_type not in VARIANTS:
            raise ValueError(
                f"model_type {cfg.model_type!r} is not in the BART family ({', '.join(VARIANTS)})"
            )
        self.config = cfg
        self.variant = v = VARIANTS[cfg.model_type]
        d = cfg.d_model
        self.embed_scale = math.sqrt(d) if cfg.scale_embedding else 1.0
        # Marian may keep separate encoder/decoder vocabularies; the others always share one.
        self.shared_vocab = getattr(cfg, "share_encoder_decoder_embeddings", True)
        dec_vocab = cfg.vocab_size if self.shared_vocab else (cfg.decoder_vocab_size or cfg.vocab_size)
        self.shared = nn.Embedding(cfg.vocab_size, d)  # encoder (and, when shared, decoder) tokens
        enc_lc = LayerConfig.layer_norm_style(
            cfg, cfg.encoder_attention_heads, cfg.encoder_ffn_dim, v.pre_norm
        )
        dec_lc = LayerConfig.layer_norm_style(
            cfg, cfg.decoder_attention_heads, cfg.decoder_ffn_dim, v.pre_norm
        )
        self.encoder = BartStack(
            cfg, v, nn.ModuleList(EncoderLayer(enc_lc) for _ in range(cfg.encoder_layers))
        )
        self.decoder = BartStack(
            cfg, v, nn.ModuleList(DecoderLayer(dec_lc) for _ in range(cfg.decoder_layers))
        )
        if not self.shared_vocab:
            self.decoder.embed_tokens = nn.Embedding(dec_vocab, d)
        self.lm_head = nn.Linear(d, dec_vocab, bias=False)
        self.final_logits_bias = nn.Parameter(torch.zeros(1, dec_vocab))  # [1, V], as transformers stores it
        dec_embed = "shared.weight" if self.shared_vocab else "decoder.embed_tokens.weight"
        self.tied_weights = {"lm_head.weight": dec_embed} if cfg.tie_word_embeddings else {}
        heads = cfg.decoder_attention_heads
        self.cache_spec = CacheSpec(cfg.decoder_layers, heads, d // heads, d)
        self.max_target_positions = self.max_source_positions = cfg.max_position_embeddings
        self.source_vocab_size = cfg.vocab_size
        self.vocab_size = dec_vocab

    # HF "model.encoder.layers.0.fc1.weight" -> "encoder.layers.0.mlp.fc1.weight"; the embedding
    # aliases "model.shared" / "model.{encoder,decoder}.embed_tokens" -> "shared".
    def rename(self, name: str) -> str | None:
        name = name.removeprefix("model.")
        if name in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
            return "shared.weight" if self.shared_vocab or name.startswith("encoder.") else name
        if name.endswith("embed_positions.weight") and self.variant.positions != "learned":
            return None  # fixed sinusoidal table, computed in post_load
        for fc in (".fc1.", ".fc2."):
            name = name.replace(fc, ".mlp" + fc)
        return name

    def fill_missing(self, name: str) -> bool:
        if name == "final_logits_bias":  # optional in transformers checkpoints: zero
            self.final_logits_bias.data.zero_()
            return True
        return super().fill_missing(name)

    def post_load(self) -> None:
        for stack in (self.encoder, self.decoder):
            stack.make_table()
        self.tie_equal_weights()

    def decoder_layers(self):
        return self.decoder.layers

    def encoder_layers(self):
        return self.encoder.layers

    def embed_encoder(self, batch: EncoderBatch) -> torch.Tensor:
        """batch.inputs: [T] packed token ids -> [T, d]."""
        enc = self.encoder
        if enc.padding_idx is None:
            positions = packed_positions(batch.cu_seqlens, batch.inputs.shape[0])
        else:  # fairseq counts the non-pad tokens: a pad inside an input shifts the rest back
            positions = nonpad_positions(batch.inputs, batch.cu_seqlens, enc.padding_idx)
        return enc.embed(self.shared(batch.inputs) * self.embed_scale, positions, batch.inputs)

    def finish_encoder(self, x, residual) -> torch.Tensor:
        return final_norm(self.encoder.layer_norm, x, residual)

    def embed_decoder(self, tokens, positions) -> torch.Tensor:
        """tokens, positions: [Tq] new tokens and their index in their decoder sequence."""
        dec = self.decoder
        embed = self.shared if self.shared_vocab else dec.embed_tokens
        return dec.embed(embed(tokens) * self.embed_scale, positions, tokens)

    def decoder_head(self, x, residual, meta: AttentionMetadata, out=None) -> torch.Tensor:
        x = final_norm(self.decoder.layer_norm, x, residual, meta.logits_indices)
        return self.lm_logits(x, out).add_(self.final_logits_bias)
