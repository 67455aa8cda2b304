"""The T5 family on the shared layers: T5 v1.0, T5 v1.1 / Flan-T5, mT5.

Against the BART family: RMSNorm without bias, pre-norm, no biases anywhere, no attention scaling
(scale 1.0), head size ``d_kv`` independent of d_model / num_heads, no absolute positions but a
relative position bias: a [num_buckets, H] table owned by layer 0 of each stack and used by every
layer of that stack (bidirectional buckets in the encoder, causal ones in decoder
self-attention, none in cross-attention). The kernels compute the bucket in-kernel from a
``encdec_kernels.RelBias``.

v1.0: ReLU MLP, lm_head tied to the embedding and decoder output scaled by d_model**-0.5 first.
v1.1 / Flan-T5 / mT5: gated-GELU (``gelu_new``) MLP, their own lm_head, no output scaling.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from encdec_kernels import RelBias
from encdec_models.base import AttentionMetadata, CacheSpec, EncoderBatch
from encdec_models.layers import DecoderLayer, EncoderLayer, LayerConfig, Norm, final_norm
from encdec_models.text import TextEncDecModel

# T5 has no absolute positions; the relative bias extends to any length. This only bounds what a
# request may ask for (the engine checks prompt + max_new_tokens against it).
MAX_POSITIONS = 16384

# HF sub-layer index inside a block -> our module, per stack
_SUBLAYERS = {
    "encoder": {0: "self_attn", 1: "mlp"},
    "decoder": {0: "self_attn", 1: "encoder_attn", 2: "mlp"},
}
_NORMS = {
    "self_attn": "self_attn_layer_norm",
    "encoder_attn": "encoder_attn_layer_norm",
    "mlp": "final_layer_norm",
}
_PROJ = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "out_proj"}
_MLP = {"wi": "fc1", "wi_0": "fc1", "wi_1": "up", "wo": "fc2"}
_BLOCK_RE = re.compile(r"^(encoder|decoder)\.block\.(\d+)\.layer\.(\d+)\.(.+)$")


class T5Stack(nn.Module):
    """Relative bias table, layers and final RMSNorm of one side."""

    def __init__(self, cfg, lc: LayerConfig, layers: nn.ModuleList, bidirectional: bool):
        super().__init__()
        self.relative_attention_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)
        self.layers = layers
        self.layer_norm = Norm(cfg.d_model, "rms", cfg.layer_norm_epsilon)
        self.num_buckets = cfg.relative_attention_num_buckets
        self.max_distance = cfg.relative_attention_max_distance
        self.bidirectional = bidirectional
        self.rel_bias: RelBias | None = None  # set by post_load

    def make_rel_bias(self) -> None:
        table = self.relative_attention_bias.weight.t().float().contiguous()  # [H, num_buckets]
        self.rel_bias = RelBias(table, self.num_buckets, self.max_distance, self.bidirectional)


class T5(TextEncDecModel):
    """T5 v1.0, v1.1, Flan-T5 and mT5 (``T5ForConditionalGeneration`` / ``MT5ForConditionalGeneration``)."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        lc = LayerConfig(
            d_model=cfg.d_model,
            num_heads=cfg.num_heads,
            head_dim=cfg.d_kv,
            d_ff=cfg.d_ff,
            activation=cfg.dense_act_fn,
            gated=cfg.is_gated_act,
            pre_norm=True,
            norm="rms",
            norm_eps=cfg.layer_norm_epsilon,
            bias=False,
            scale=1.0,
        )
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = T5Stack(cfg, lc, nn.ModuleList(EncoderLayer(lc) for _ in range(cfg.num_layers)), True)
        self.decoder = T5Stack(
            cfg, lc, nn.ModuleList(DecoderLayer(lc) for _ in range(cfg.num_decoder_layers)), False
        )
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        # transformers ties lm_head to the embedding unless the checkpoint stores a different one
        self.tied_weights = {"lm_head.weight": "shared.weight"}
        # v1.0 rescales the decoder output before its tied lm_head. transformers 5 records this as
        # ``scale_decoder_outputs``; older configs say it with ``tie_word_embeddings``. mT5 never does.
        scale = cfg.model_type == "t5" and getattr(cfg, "scale_decoder_outputs", cfg.tie_word_embeddings)
        self.output_scale = cfg.d_model**-0.5 if scale else 1.0
        self.cache_spec = CacheSpec(cfg.num_decoder_layers, cfg.num_heads, cfg.d_kv, cfg.d_model)
        self.max_target_positions = self.max_source_positions = MAX_POSITIONS
        self.source_vocab_size = self.vocab_size = cfg.vocab_size

    @classmethod
    def check_dtype(cls, dtype: torch.dtype) -> None:
        if dtype == torch.float16:
            raise ValueError("T5 overflows in float16; use bfloat16 or float32")

    # HF "encoder.block.0.layer.0.SelfAttention.q.weight" -> "encoder.layers.0.self_attn.q_proj.weight",
    # "decoder.block.1.layer.2.DenseReluDense.wi_0.weight" -> "decoder.layers.1.mlp.fc1.weight", ...
    def rename(self, name: str) -> str | None:
        if name in ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
            return "shared.weight"
        if name == "lm_head.weight":
            return name
        if name.endswith(".final_layer_norm.weight"):  # "encoder.final_layer_norm.weight"
            return name.replace(".final_layer_norm.", ".layer_norm.")
        m = _BLOCK_RE.match(name)
        if m is None:
            return None
        stack, block, sub, rest = m[1], m[2], int(m[3]), m[4]
        part = _SUBLAYERS[stack].get(sub)
        if part is None:
            return None
        if rest.endswith("relative_attention_bias.weight"):
            # only self-attention of block 0 owns a table (decoder EncDecAttention may carry an unused one)
            return f"{stack}.relative_attention_bias.weight" if part == "self_attn" and block == "0" else None
        layer = f"{stack}.layers.{block}"
        if rest == "layer_norm.weight":
            return f"{layer}.{_NORMS[part]}.weight"
        module, _, param = rest.rpartition(".")  # "SelfAttention.q", "weight"
        kind, _, proj = module.partition(".")  # "SelfAttention", "q"
        if kind in ("SelfAttention", "EncDecAttention") and proj in _PROJ:
            return f"{layer}.{part}.{_PROJ[proj]}.{param}"
        if kind == "DenseReluDense" and proj in _MLP:
            return f"{layer}.mlp.{_MLP[proj]}.{param}"
        return None

    def post_load(self) -> None:
        self.encoder.make_rel_bias()
        self.decoder.make_rel_bias()
        self.tie_equal_weights()

    def decoder_layers(self):
        return self.decoder.layers

    def encoder_layers(self):
        return self.encoder.layers

    def embed_encoder(self, batch: EncoderBatch) -> torch.Tensor:
        """batch.inputs: [T] packed token ids -> [T, d]."""
        return self.shared(batch.inputs)

    def encoder_layer_args(self, batch: EncoderBatch, x) -> tuple:
        return (batch.cu_seqlens, batch.max_seqlen, self.encoder.rel_bias)

    def finish_encoder(self, x, residual) -> torch.Tensor:
        return final_norm(self.encoder.layer_norm, x, residual)

    def embed_decoder(self, tokens, positions) -> torch.Tensor:
        """Positions are implicit (relative bias over the cache)."""
        return self.shared(tokens)

    def decoder_layer_args(self, meta: AttentionMetadata, positions, x) -> tuple:
        return (meta, self.decoder.rel_bias)

    def decoder_head(self, x, residual, meta: AttentionMetadata, out=None) -> torch.Tensor:
        x = final_norm(self.decoder.layer_norm, x, residual, meta.logits_indices)
        if self.output_scale != 1.0:
            x = x * self.output_scale
        return self.lm_logits(x, out)
