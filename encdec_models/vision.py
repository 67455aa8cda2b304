"""Vision encoder/decoder models (transformers' ``VisionEncoderDecoderModel`` folders: TrOCR, Donut
and their kind): an image encoder whose output the text decoder cross-attends to.

Encoders:

| encoder        | how it runs                                                                     |
|----------------|---------------------------------------------------------------------------------|
| ViT, DeiT      | patch embedding, then the shared pre-norm ``EncoderLayer`` s on the packed      |
|                | encoder path (``encdec_kernels.varlen_attention``): every image of a batch is   |
|                | one sequence of (H/P)(W/P) + 1 (+1 DeiT) tokens                                 |
| Swin (Donut)   | ``encdec_models.swin``: windowed attention with a relative position bias and    |
|                | shifted-window masks, which the kernels do not cover: plain PyTorch (reference) |

Decoders: ``TrOCRForCausalLM``, ``BartForCausalLM``, ``MBartForCausalLM`` and ``RobertaForCausalLM``
(the BART family's decoder stack of ``encdec_models.bart``: post-norm TrOCR/BART, pre-norm mBART;
TrOCR's learned or fairseq-sinusoidal positions; RoBERTa's BERT-style post-norm layers, its token
type folded into the positions and its LM head's dense + GELU + LayerNorm), cross-attending to the
encoder output directly (``cross_attention_hidden_size``) or through ``enc_to_dec_proj`` when the
widths differ. The decoder prompt (the decoder start token, Donut's task prompt) comes from the
task layer.

Encoder inputs are pixel tensors [channels, height, width] already resized and normalised by the
model's own image processor (``encdec_cli.tasks.image_to_text``); every image of a model has the
same size, so every request has the same encoder length.
"""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from encdec_models.bart import VARIANTS, BartStack, Variant
from encdec_models.base import AttentionMetadata, CacheSpec, EncoderBatch, host_to_device, stack_to_device
from encdec_models.layers import DecoderLayer, EncoderLayer, LayerConfig, Norm, final_norm, run_layers
from encdec_models.text import TextEncDecModel

VIT_TYPES = ("vit", "deit")
SWIN_TYPES = ("donut-swin", "swin")
DECODER_TYPES = ("trocr", "bart", "mbart", "roberta")


def _pair(x) -> tuple[int, int]:
    return (int(x[0]), int(x[1])) if isinstance(x, (list, tuple)) else (int(x), int(x))


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or infinity in a host tensor. The sum (in float32 at least) is finite exactly when every
    value is, unless finite values overflow it; only then the element-wise scan runs. A vectorised
    sum is ~10-20x faster than ``isfinite(t).all()`` on a 768 x 768 image (float16: widened first,
    which beats summing with ``dtype=``)."""
    s = t.sum() if t.dtype in (torch.float32, torch.float64) else t.float().sum()
    return bool(torch.isfinite(s)) or bool(torch.isfinite(t).all())


def check_pixels(item, shape: tuple[int, int, int], values: bool = True) -> torch.Tensor:
    """An encoder input as a float CPU/GPU tensor of exactly ``shape`` [C, H, W] with finite values
    (host data is checked, unless ``values`` is False: ``prepare_encoder_batch`` takes items that
    ``encoder_length`` checked when the engine admitted them, and scanning a 768 x 768 image's
    values again costs milliseconds); ValueError otherwise, so that request alone fails."""
    if isinstance(item, np.ndarray):
        item = torch.from_numpy(item)
    if not torch.is_tensor(item) or not item.is_floating_point():
        raise ValueError(
            f"image input must be a float pixel tensor {list(shape)} (run the model's image processor), "
            f"got {type(item).__name__}"
        )
    if tuple(item.shape) != tuple(shape):
        raise ValueError(f"image input must be {list(shape)} pixels (C, H, W), got {list(item.shape)}")
    if values and item.device.type == "cpu" and not all_finite(item):
        raise ValueError("NaN or infinite values in the image input")
    return item


class ViTEncoder(nn.Module):
    """ViT / DeiT: a strided convolution cuts the image into patches, a class token (and DeiT's
    distillation token) is prepended, learned positions are added, then pre-norm layers."""

    def __init__(self, cfg):
        super().__init__()
        d = cfg.hidden_size
        self.image_size, patch = _pair(cfg.image_size), _pair(cfg.patch_size)
        self.channels = cfg.num_channels
        self.patch = nn.Conv2d(cfg.num_channels, d, kernel_size=patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.distillation_token = nn.Parameter(torch.zeros(1, 1, d)) if cfg.model_type == "deit" else None
        grid = (self.image_size[0] // patch[0]) * (self.image_size[1] // patch[1])
        self.num_tokens = grid + 1 + (self.distillation_token is not None)
        self.position_embeddings = nn.Parameter(torch.zeros(1, self.num_tokens, d))
        heads = cfg.num_attention_heads
        # (qkv_bias=False checkpoints lack the q/k/v biases: the loader zeroes them)
        lc = LayerConfig.plain(d, heads, cfg.intermediate_size, cfg.hidden_act, cfg.layer_norm_eps)
        self.layers = nn.ModuleList(EncoderLayer(lc) for _ in range(cfg.num_hidden_layers))
        self.layernorm = Norm(d, "layer", cfg.layer_norm_eps)
        self.hidden_size = d

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.channels, *self.image_size)

    @staticmethod
    def rename(name: str) -> str | None:
        """A ViT/DeiT checkpoint name (without the ``encoder.`` prefix) -> ours."""
        if name.startswith("pooler.") or name.startswith("head"):
            return None
        name = name.replace("embeddings.patch_embeddings.projection.", "patch.")
        name = name.removeprefix("embeddings.")
        name = name.replace("encoder.layer.", "layers.")
        for theirs, ours in (
            (".attention.attention.query.", ".self_attn.q_proj."),
            (".attention.attention.key.", ".self_attn.k_proj."),
            (".attention.attention.value.", ".self_attn.v_proj."),
            (".attention.output.dense.", ".self_attn.out_proj."),
            (".intermediate.dense.", ".mlp.fc1."),
            (".output.dense.", ".mlp.fc2."),
            (".layernorm_before.", ".self_attn_layer_norm."),
            (".layernorm_after.", ".final_layer_norm."),
        ):
            name = name.replace(theirs, ours)
        return name

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """pixels [B, C, H, W] -> (hidden [B * N, d] packed, cu_seqlens [B+1], N)."""
        b = pixels.shape[0]
        x = self.patch(pixels).flatten(2).transpose(1, 2)  # [B, grid, d]
        special = [self.cls_token] + (
            [self.distillation_token] if self.distillation_token is not None else []
        )
        x = torch.cat([t.expand(b, -1, -1) for t in special] + [x], dim=1) + self.position_embeddings
        n = x.shape[1]
        cu = torch.arange(0, (b + 1) * n, n, dtype=torch.int32, device=x.device)
        x, residual = run_layers(self.layers, x.reshape(b * n, -1), cu, n)
        return final_norm(self.layernorm, x, residual), cu, n


class SiglipVisionEncoder(nn.Module):
    """SigLIP's vision tower (``SiglipVisionModel``: T5Gemma 2's, Gemma 3's): a strided convolution
    cuts the image into patches, learned positions are added (no class token), pre-norm layers on the
    packed encoder path, a final LayerNorm. The attention-pooling head is not needed (the language
    models read every patch) and not loaded. ``cfg``: the vision config's fields (a transformers
    config or a namespace)."""

    def __init__(self, cfg):
        super().__init__()
        d = cfg.hidden_size
        self.image_size, self.patch_size = cfg.image_size, cfg.patch_size
        self.channels = cfg.num_channels
        self.patch_embedding = nn.Conv2d(
            cfg.num_channels, d, kernel_size=cfg.patch_size, stride=cfg.patch_size
        )
        self.grid = cfg.image_size // cfg.patch_size
        self.position_embedding = nn.Embedding(self.grid * self.grid, d)
        heads = cfg.num_attention_heads
        lc = LayerConfig.plain(d, heads, cfg.intermediate_size, cfg.hidden_act, cfg.layer_norm_eps)
        self.layers = nn.ModuleList(EncoderLayer(lc) for _ in range(cfg.num_hidden_layers))
        self.post_layernorm = Norm(d, "layer", cfg.layer_norm_eps)
        self.hidden_size = d

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

    @staticmethod
    def rename(name: str) -> str | None:
        """A SiglipVisionModel checkpoint name (without its prefix; ``vision_model.`` optional) -> ours."""
        name = name.removeprefix("vision_model.")
        if name.startswith("head."):
            return None
        name = name.removeprefix("embeddings.").replace("encoder.layers.", "layers.")
        return name.replace(".layer_norm1.", ".self_attn_layer_norm.").replace(
            ".layer_norm2.", ".final_layer_norm."
        )

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, C, H, W] -> [B, grid * grid, d]."""
        b = pixels.shape[0]
        patches = self.patch_embedding(pixels).flatten(2).transpose(1, 2)  # [B, N, d], a view of [B, d, N]
        n = patches.shape[1]
        # the sum into token rows: ``patches + positions`` would keep the patches' transposed layout,
        # and the first layer's pending residual (x itself) reach the fused add-norm kernels strided
        x = torch.empty(b, n, patches.shape[2], device=patches.device, dtype=patches.dtype)
        torch.add(patches, self.position_embedding.weight, out=x)
        cu = torch.arange(0, (b + 1) * n, n, dtype=torch.int32, device=x.device)
        x, residual = run_layers(self.layers, x.reshape(b * n, -1), cu, n)
        return final_norm(self.post_layernorm, x, residual).view(b, n, -1)


_ROBERTA_NAMES = (
    ("decoder.roberta.embeddings.word_embeddings.", "decoder.embed_tokens."),
    ("decoder.roberta.embeddings.position_embeddings.", "decoder.embed_positions."),
    ("decoder.roberta.embeddings.token_type_embeddings.weight", "token_type"),
    ("decoder.roberta.embeddings.LayerNorm.", "decoder.layernorm_embedding."),
    ("decoder.roberta.encoder.layer.", "decoder.layers."),
    (".crossattention.self.query.", ".encoder_attn.q_proj."),
    (".crossattention.self.key.", ".encoder_attn.k_proj."),
    (".crossattention.self.value.", ".encoder_attn.v_proj."),
    (".crossattention.output.dense.", ".encoder_attn.out_proj."),
    (".crossattention.output.LayerNorm.", ".encoder_attn_layer_norm."),
    (".attention.self.query.", ".self_attn.q_proj."),
    (".attention.self.key.", ".self_attn.k_proj."),
    (".attention.self.value.", ".self_attn.v_proj."),
    (".attention.output.dense.", ".self_attn.out_proj."),
    (".attention.output.LayerNorm.", ".self_attn_layer_norm."),
    (".intermediate.dense.", ".mlp.fc1."),
    (".output.dense.", ".mlp.fc2."),
    (".output.LayerNorm.", ".final_layer_norm."),
    ("decoder.lm_head.dense.", "head.dense."),
    ("decoder.lm_head.layer_norm.", "head.layer_norm."),
    ("decoder.lm_head.decoder.weight", "lm_head.weight"),
)


def _roberta_name(name: str) -> str | None:
    """A RobertaForCausalLM decoder checkpoint name -> ours (None: not used)."""
    if name in ("decoder.lm_head.bias", "decoder.lm_head.decoder.bias"):
        return "logits_bias"
    if not name.startswith(("decoder.roberta.embeddings.", "decoder.roberta.encoder.", "decoder.lm_head.")):
        return None
    for theirs, ours in _ROBERTA_NAMES:
        name = name.replace(theirs, ours)
    return name


def _decoder_variant(cfg) -> Variant:
    if cfg.model_type == "trocr":
        return Variant(
            pre_norm=False,
            # TrOCR's fixed table is fairseq's: installed over the stack's below (fairseq_sinusoids)
            positions="learned" if cfg.use_learned_position_embeddings else "sinusoidal",
            layernorm_embedding=cfg.layernorm_embedding,
            final_norm=False,
        )
    return VARIANTS[cfg.model_type]


def fairseq_sinusoids(num_positions: int, dim: int, padding_idx: int) -> torch.Tensor:
    """[num_positions, dim] TrOCR's (fairseq's) sinusoidal positions for decoder positions 0, 1, ..:
    rows padding_idx + 1 + p of its table (sin of every frequency, then cos; frequencies spaced by
    log(10000) / (dim/2 - 1)), computed in float32 as transformers does. (transformers also skips pad
    tokens when it counts positions; a decoder sequence here counts every token.)"""
    half = dim // 2
    freq = torch.exp(torch.arange(half, dtype=torch.int64).float() * -(math.log(10000) / (half - 1)))
    pos = torch.arange(padding_idx + 1, padding_idx + 1 + num_positions, dtype=torch.int64).float()
    angle = pos[:, None] * freq[None]
    table = torch.cat([torch.sin(angle), torch.cos(angle)], dim=1)
    return torch.cat([table, torch.zeros(num_positions, 1)], dim=1) if dim % 2 else table


class VisionEncoderDecoder(TextEncDecModel):
    """transformers' ``VisionEncoderDecoderModel``: a ViT/DeiT/Swin encoder and a TrOCR/BART/mBART
    decoder (``config.encoder`` and ``config.decoder`` pick them)."""

    def __init__(self, cfg):
        super().__init__()
        enc_cfg, dec_cfg = cfg.encoder, cfg.decoder
        if enc_cfg.model_type in VIT_TYPES:
            self.encoder = ViTEncoder(enc_cfg)
        elif enc_cfg.model_type in SWIN_TYPES:
            from encdec_models.swin import SwinEncoder

            self.encoder = SwinEncoder(enc_cfg)
        else:
            raise ValueError(
                f"vision encoder {enc_cfg.model_type!r} is not supported; encdec runs "
                + ", ".join(VIT_TYPES + SWIN_TYPES)
            )
        if dec_cfg.model_type not in DECODER_TYPES:
            raise ValueError(
                f"decoder {dec_cfg.model_type!r} is not supported; encdec runs " + ", ".join(DECODER_TYPES)
            )
        self.config = cfg
        self.roberta = dec_cfg.model_type == "roberta"
        enc_d = self.encoder.hidden_size
        cross = getattr(dec_cfg, "cross_attention_hidden_size", None)
        if self.roberta:  # BERT-style post-norm layers: the BART layers with BERT's names and eps
            d, heads, n_layers = dec_cfg.hidden_size, dec_cfg.num_attention_heads, dec_cfg.num_hidden_layers
            lc = LayerConfig.plain(
                d,
                heads,
                dec_cfg.intermediate_size,
                dec_cfg.hidden_act,
                dec_cfg.layer_norm_eps,
                pre_norm=False,
            )
            # positions offset by padding_idx + 1 = 2 (RoBERTa's table includes the offset rows)
            variant = Variant(pre_norm=False, positions="learned", layernorm_embedding=True, final_norm=False)
            stack_cfg = SimpleNamespace(
                d_model=d, max_position_embeddings=dec_cfg.max_position_embeddings - 2
            )
            self.embed_scale = 1.0
        else:
            d, heads, n_layers = dec_cfg.d_model, dec_cfg.decoder_attention_heads, dec_cfg.decoder_layers
            variant = _decoder_variant(dec_cfg)
            lc = LayerConfig.layer_norm_style(dec_cfg, heads, dec_cfg.decoder_ffn_dim, variant.pre_norm)
            stack_cfg = dec_cfg
            self.embed_scale = math.sqrt(d) if dec_cfg.scale_embedding else 1.0
        # transformers projects the encoder output when the widths differ and the decoder does not
        # cross-attend to the encoder's width itself
        self.enc_to_dec_proj = nn.Linear(enc_d, d) if enc_d != d and cross is None else None
        lc = dataclasses.replace(lc, cross_d_model=cross or d)
        self.decoder = BartStack(stack_cfg, variant, nn.ModuleList(DecoderLayer(lc) for _ in range(n_layers)))
        self.decoder.embed_tokens = nn.Embedding(dec_cfg.vocab_size, d)
        self.lm_head = nn.Linear(d, dec_cfg.vocab_size, bias=False)
        self.head = self.logits_bias = None
        if self.roberta:  # token type 0 (folded into the positions at load), the LM head's transform
            self.decoder.layernorm_embedding.eps = dec_cfg.layer_norm_eps
            self.token_type = nn.Parameter(torch.zeros(dec_cfg.type_vocab_size, d))
            self.head = nn.ModuleDict(
                {"dense": nn.Linear(d, d), "layer_norm": Norm(d, "layer", dec_cfg.layer_norm_eps)}
            )
            self.logits_bias = nn.Parameter(torch.zeros(dec_cfg.vocab_size))
        tie = getattr(dec_cfg, "tie_word_embeddings", True) or getattr(cfg, "tie_word_embeddings", False)
        self.tied_weights = {"lm_head.weight": "decoder.embed_tokens.weight"} if tie else {}
        self.cache_spec = CacheSpec(n_layers, heads, d // heads, cross or d, d)
        self.max_target_positions = stack_cfg.max_position_embeddings
        self.max_source_positions = self.encoder.num_tokens
        self.vocab_size = self.source_vocab_size = dec_cfg.vocab_size

    # ---- weights --------------------------------------------------------------------------------
    def rename(self, name: str) -> str | None:
        if name.startswith("encoder."):
            ours = self.encoder.rename(name.removeprefix("encoder."))
            return None if ours is None else "encoder." + ours
        if name in ("decoder.output_projection.weight", "decoder.lm_head.weight"):
            return "lm_head.weight"
        if name.startswith("decoder.model.decoder."):
            name = "decoder." + name.removeprefix("decoder.model.decoder.")
            for fc in (".fc1.", ".fc2."):
                name = name.replace(fc, ".mlp" + fc)
            return name
        if name.startswith("enc_to_dec_proj."):
            return name
        if self.roberta:
            return _roberta_name(name)
        return None

    def post_load(self) -> None:
        if self.decoder.embed_positions is None:  # TrOCR's fixed sinusoidal positions
            pad = self.config.decoder.pad_token_id
            table = fairseq_sinusoids(*self.decoder.sinusoid.shape, 1 if pad is None else pad)
            self.decoder.sinusoid.copy_(table)
        if self.roberta:  # every decoder token has token type 0: its embedding joins every position's
            self.decoder.embed_positions.weight.data += self.token_type.data[0]
        self.tie_equal_weights()

    def decoder_layers(self):
        return self.decoder.layers

    # ---- encoder --------------------------------------------------------------------------------
    @property
    def image_shape(self) -> tuple[int, int, int]:
        """[C, H, W] of the pixel tensors the encoder takes."""
        return self.encoder.input_shape

    def encoder_length(self, item) -> int:
        check_pixels(item, self.image_shape)
        return self.encoder.num_tokens

    def prepare_encoder_batch(self, items, device) -> EncoderBatch:
        """items: pixel tensors [C, H, W] (their values checked by ``encoder_length``) -> inputs
        [B, C, H, W]; every image is num_tokens long."""
        pixels = [check_pixels(x, self.image_shape, values=False) for x in items]
        n = self.encoder.num_tokens
        cu = torch.arange(0, (len(items) + 1) * n, n, dtype=torch.int32)
        return EncoderBatch(
            inputs=stack_to_device(pixels, device),  # in the dtype given: fp16 moves half the bytes
            cu_seqlens=host_to_device(cu, device),
            max_seqlen=n,
        )

    # the whole image encoder is the embedding: its layers are no uniform stack to cut (Swin's stages
    # change the width), so pipeline stages split the decoder's layers only; stage 0 runs the encoder
    def encoder_layers(self):
        return ()

    def embed_encoder(self, batch: EncoderBatch) -> torch.Tensor:
        dtype = self.lm_head.weight.dtype
        hidden, _, _ = self.encoder(batch.inputs.to(dtype))
        return hidden if self.enc_to_dec_proj is None else self.enc_to_dec_proj(hidden)

    def finish_encoder(self, x, residual) -> torch.Tensor:
        return x

    # ---- decoder --------------------------------------------------------------------------------
    def embed_decoder(self, tokens, positions) -> torch.Tensor:
        dec = self.decoder
        return dec.embed(dec.embed_tokens(tokens) * self.embed_scale, positions)

    def decoder_head(self, x, residual, meta: AttentionMetadata, out=None) -> torch.Tensor:
        x = final_norm(self.decoder.layer_norm, x, residual, meta.logits_indices)
        if self.head is None:
            return self.lm_logits(x, out)
        x = self.head["layer_norm"](F.gelu(self.head["dense"](x)))
        return self.lm_logits(x, out).add_(self.logits_bias)
