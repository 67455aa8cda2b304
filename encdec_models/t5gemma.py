"""T5Gemma (``T5GemmaForConditionalGeneration``, transformers ``t5gemma``) on the shared layers.

Gemma-2-style stacks on both sides, checked against transformers' modeling file:
- RMSNorm computed as norm(x) * (1 + w): the offset is folded into our weights at load time;
  a norm before and after every sub-layer ("sandwich", ``LayerConfig.sandwich``), a final norm;
- rotary positions (rotate-half, ``rope_theta``) in encoder and decoder self-attention (the
  ``layers.Rotary`` of each step's positions), none in cross-attention;
- grouped-query attention: K/V heads are repeated to the query heads at load time (each cached
  token then holds every head's K/V, as the kernels expect);
- attention scores scaled by ``query_pre_attn_scalar**-0.5`` and soft-capped
  (``attn_logit_softcapping``), logits soft-capped (``final_logit_softcapping``);
- token embeddings times sqrt(hidden_size), gated GELU-tanh MLP, no biases (``attention_bias``);
- ``layer_types``: "sliding_attention" layers see keys at most ``sliding_window`` positions away
  (decoder: causal, q - k < window; encoder: bidirectional, |q - k| <= window); cross-attention
  stays full. Sliding windows and soft-capping run on the reference attention (the Triton kernels
  lack them: ``encdec_kernels`` logs it once on CUDA).
Encoder and decoder may differ in width; cross-attention projects the encoder's width. The decoder
starts from ``bos_token_id``. T5Gemma 2 (``t5gemma2``) is ``t5gemma2.py``.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from encdec_models.base import AttentionMetadata, CacheSpec, EncoderBatch
from encdec_models.layers import (
    DecoderLayer,
    EncoderLayer,
    LayerConfig,
    Norm,
    Rotary,
    final_norm,
    logits_into,
    repeat_kv_heads,
)
from encdec_models.text import TextEncDecModel, packed_positions

_LAYER_RE = re.compile(r"^model\.(encoder|decoder)\.layers\.(\d+)\.(.+)$")
_RENAME = {
    "self_attn.o_proj": "self_attn.out_proj",
    "cross_attn.q_proj": "encoder_attn.q_proj",
    "cross_attn.k_proj": "encoder_attn.k_proj",
    "cross_attn.v_proj": "encoder_attn.v_proj",
    "cross_attn.o_proj": "encoder_attn.out_proj",
    "mlp.gate_proj": "mlp.fc1",
    "mlp.up_proj": "mlp.up",
    "mlp.down_proj": "mlp.fc2",
    "pre_self_attn_layernorm": "self_attn_layer_norm",
    "post_self_attn_layernorm": "post_self_attn_layer_norm",
    "pre_cross_attn_layernorm": "encoder_attn_layer_norm",
    "post_cross_attn_layernorm": "post_encoder_attn_layer_norm",
    "pre_feedforward_layernorm": "final_layer_norm",
    "post_feedforward_layernorm": "post_mlp_layer_norm",
}
_KV_RE = re.compile(r"\.(self_attn|cross_attn)\.(k|v)_proj\.(weight|bias)$")


def gemma_layer_config(cfg, **extra) -> LayerConfig:
    """A Gemma-style layer (gated MLP, RMSNorm before and after each block) of a T5Gemma (2) stack's
    config; ``extra``: LayerConfig fields that differ (T5Gemma 2: per-head q/k norms, no capping)."""
    fields = dict(
        d_model=cfg.hidden_size,
        num_heads=cfg.num_attention_heads,
        head_dim=cfg.head_dim,
        d_ff=cfg.intermediate_size,
        activation=cfg.hidden_activation,
        gated=True,
        pre_norm=True,
        norm="rms",
        norm_eps=cfg.rms_norm_eps,
        bias=cfg.attention_bias,
        scale=cfg.query_pre_attn_scalar**-0.5,
        softcap=getattr(cfg, "attn_logit_softcapping", None),
        sandwich=True,
    )
    return LayerConfig(**{**fields, **extra})


class T5GemmaStack(nn.Module):
    """Token embedding, rotary frequencies, layers (with their sliding windows) and final norm."""

    def __init__(self, cfg, layers: nn.ModuleList, causal: bool):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = layers
        self.norm = Norm(cfg.hidden_size, "rms", cfg.rms_norm_eps)
        self.embed_scale = cfg.hidden_size**0.5
        self.rope_theta = float((cfg.rope_parameters or {}).get("rope_theta", 10000.0))
        self.head_dim = cfg.head_dim
        self.register_buffer("inv_freq", torch.empty(cfg.head_dim // 2), persistent=False)
        types = list(cfg.layer_types or ["full_attention"] * len(layers))
        for layer, kind in zip(layers, types, strict=True):
            if kind == "sliding_attention" and cfg.sliding_window is not None:
                # kernels mask keys ``window`` or more positions away: causal q - k < W, encoder |q - k| <= W
                layer.self_attn.window = cfg.sliding_window if causal else cfg.sliding_window + 1

    def make_inv_freq(self) -> None:
        d = self.head_dim
        exponent = torch.arange(0, d, 2, dtype=torch.int64).to(torch.float) / d
        self.inv_freq.copy_(1.0 / (self.rope_theta**exponent))

    def rotary(self, positions: torch.Tensor, dtype) -> Rotary:
        return Rotary.at(self.inv_freq, positions, dtype)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(tokens)
        return x * torch.tensor(self.embed_scale, dtype=x.dtype)


class GemmaStackHooks:
    """The pieces around the layer stacks (encdec_models/base.py runs the stacks) of T5Gemma and
    T5Gemma 2: stacks with ``embed``, ``rotary(positions, dtype)`` and ``norm``; an lm_head with
    optional final logit soft-capping (``logit_softcap``)."""

    family = "T5Gemma"

    def set_shapes(self, enc, dec) -> None:
        """From the encoder and decoder text configs: grouped-query repeats, head dims, the cache's
        shape, position limits, vocabularies."""
        self.n_rep = {
            "encoder": enc.num_attention_heads // enc.num_key_value_heads,
            "decoder": dec.num_attention_heads // dec.num_key_value_heads,
        }
        self.head_dims = {"encoder": enc.head_dim, "decoder": dec.head_dim}
        self.cache_spec = CacheSpec(
            dec.num_hidden_layers, dec.num_attention_heads, dec.head_dim, enc.hidden_size, dec.hidden_size
        )
        self.max_source_positions = enc.max_position_embeddings
        self.max_target_positions = dec.max_position_embeddings
        self.source_vocab_size = enc.vocab_size
        self.vocab_size = dec.vocab_size

    @classmethod
    def check_dtype(cls, dtype: torch.dtype) -> None:
        if dtype == torch.float16:
            raise ValueError(f"{cls.family} overflows in float16; use bfloat16 or float32")

    def gemma_parts(self) -> list[nn.Module]:
        """The modules whose RMSNorms are Gemma's (T5Gemma 2's SigLIP tower has LayerNorms of its own)."""
        return [self.encoder, self.decoder]

    def post_load(self) -> None:
        with torch.no_grad():  # Gemma's RMSNorm scales by (1 + w): fold the 1 into the weights
            for module in (m for part in self.gemma_parts() for m in part.modules()):
                if isinstance(module, Norm):
                    module.weight.add_(1.0)
        for stack in (self.encoder, self.decoder):
            stack.make_inv_freq()
        self.tie_equal_weights()

    def decoder_layers(self):
        return self.decoder.layers

    def encoder_layers(self):
        return self.encoder.layers

    def embed_encoder(self, batch: EncoderBatch) -> torch.Tensor:
        """batch.inputs: [T] packed token ids -> [T, d_encoder]."""
        return self.encoder.embed(batch.inputs)

    def encoder_layer_args(self, batch: EncoderBatch, x) -> tuple:
        rope = self.encoder.rotary(packed_positions(batch.cu_seqlens, x.shape[0]), x.dtype)
        return (batch.cu_seqlens, batch.max_seqlen, rope)

    def finish_encoder(self, x, residual) -> torch.Tensor:
        return final_norm(self.encoder.norm, x, residual)

    def embed_decoder(self, tokens, positions) -> torch.Tensor:
        """tokens, positions: [Tq] new tokens and their index in the decoder sequence."""
        return self.decoder.embed(tokens)

    def decoder_layer_args(self, meta: AttentionMetadata, positions, x) -> tuple:
        return (meta, self.decoder.rotary(positions, x.dtype))

    def decoder_head(self, x, residual, meta: AttentionMetadata, out=None) -> torch.Tensor:
        x = final_norm(self.decoder.norm, x, residual, meta.logits_indices)
        logits = logits_into(x, self.lm_head.weight, out)
        if self.logit_softcap is not None:  # tanh(logits / cap) * cap, in place
            logits.div_(self.logit_softcap).tanh_().mul_(self.logit_softcap)
        return logits


class T5Gemma(GemmaStackHooks, TextEncDecModel):
    """T5Gemma encoder/decoder models (``config.encoder`` / ``config.decoder`` sub-configs)."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        enc, dec = cfg.encoder, cfg.decoder
        self.encoder = T5GemmaStack(
            enc,
            nn.ModuleList(EncoderLayer(gemma_layer_config(enc)) for _ in range(enc.num_hidden_layers)),
            False,
        )
        dec_lc = gemma_layer_config(dec, cross_d_model=enc.hidden_size)
        self.decoder = T5GemmaStack(
            dec, nn.ModuleList(DecoderLayer(dec_lc) for _ in range(dec.num_hidden_layers)), True
        )
        self.lm_head = nn.Linear(dec.hidden_size, dec.vocab_size, bias=False)
        tie = getattr(cfg, "tie_word_embeddings", True)
        self.tied_weights = {"lm_head.weight": "decoder.embed_tokens.weight"} if tie else {}
        self.logit_softcap = dec.final_logit_softcapping
        self.set_shapes(enc, dec)
        attn = [layer.self_attn for layer in [*self.encoder.layers, *self.decoder.layers]]
        self.cuda_graphs = not any(a.window is not None or a.softcap is not None for a in attn)

    def adapt_checkpoint(self, tensors):
        """Grouped-query K/V projections repeated to every query head (transformers' repeat_kv
        gives K/V head i to query heads i * n_rep .. (i + 1) * n_rep - 1)."""
        for name, w in tensors:
            m = _KV_RE.search(name)
            if m is not None:
                stack = "decoder" if ".decoder." in name else "encoder"
                n_rep, d = self.n_rep[stack], self.head_dims[stack]
                w = repeat_kv_heads(w, n_rep, d)
            yield name, w

    # HF "model.decoder.layers.0.cross_attn.q_proj.weight" -> "decoder.layers.0.encoder_attn.q_proj.weight"
    def rename(self, name: str) -> str | None:
        if name in ("lm_head.out_proj.weight", "lm_head.weight"):
            return "lm_head.weight"
        if name.startswith("model.") and name.endswith((".embed_tokens.weight", ".norm.weight")):
            return name.removeprefix("model.")
        m = _LAYER_RE.match(name)
        if m is None:
            return None
        stack, i, rest = m[1], m[2], m[3]
        for theirs, ours in _RENAME.items():
            if rest.startswith(theirs + "."):
                rest = ours + rest[len(theirs) :]
                break
        return f"{stack}.layers.{i}.{rest}"
