"""Florence-2 (transformers' native ``florence2``): a DaViT image encoder whose image tokens, with the
task prompt's tokens, are the input of a BART encoder/decoder.

- Vision tower (DaViT): stages of a strided convolution (the patch embedding, with a LayerNorm
  before or after it) and blocks of a spatial block (depthwise convolution, window attention
  without position bias, MLP) and a channel block (depthwise convolution, attention across channel
  groups, MLP). Plain PyTorch (the reference path: window and channel attention are not what the
  engine's kernels compute); the norms (the convolutions' residual adds fused in) and MLPs are the
  shared layers. Laid out for the GPU: activations stay token rows [B, H, W, C] (channels-last) from
  the first convolution's output on, which the convolutions read and write as channels-last NCHW
  views, so the stages need no permute copies; the channel attention is three batched GEMMs in
  channel-major layout (not attention kernels: its "head dim" is the token count); window partition
  is one copy and the reverse rides in the residual add.
- Projector: learned 2-D (row, column) position embeddings and the first 1-D cosine temporal
  embedding are added, the mean of all tokens is put before them as one more token, then a linear
  projection and a LayerNorm: (H/32)(W/32) + 1 image tokens of the language model's width.
- Language model: ``encdec_models.bart.Bart``. The encoder input is the processor's ``input_ids``
  (image placeholder tokens, then ``<s>`` prompt ``</s>``) whose placeholder embeddings are the
  image tokens; it runs packed through the shared encoder layers (varlen kernels), and the decoder
  is BART's.

Encoder inputs are dicts with ``pixel_values`` [C, H, W] (the model's image processor) and
``input_ids`` (its processor's prompt layout; ``encdec_cli.tasks.image_to_text`` builds both).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from encdec_models.bart import Bart
from encdec_models.base import AttentionMetadata, EncDecModel, EncoderBatch, host_to_device, stack_to_device
from encdec_models.layers import MLP, LayerConfig, Norm
from encdec_models.text import as_token_ids, packed_positions
from encdec_models.vision import check_pixels


@dataclass
class ImageTextBatch(EncoderBatch):
    """inputs: packed token ids [T] (image placeholders included); pixels: [B, C, H, W] (always given;
    a default only because EncoderBatch's last field has one)."""

    pixels: torch.Tensor = None


def _mlp(dim: int, ratio: float, activation: str) -> MLP:
    return MLP(LayerConfig.plain(dim, 1, int(dim * ratio), activation, 1e-5))


def _as_nchw(rows: torch.Tensor) -> torch.Tensor:
    """Token rows [B, H, W, C] (contiguous) as the channels-last NCHW view the convolutions take."""
    return rows.permute(0, 3, 1, 2)


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """An NCHW convolution output as token rows [B, H, W, C]: a view when it is channels-last (the
    convolutions keep their input's memory format), one copy otherwise."""
    return x.permute(0, 2, 3, 1).contiguous()


class ConvEmbed(nn.Module):
    def __init__(self, cfg, i: int):
        super().__init__()
        c_in = cfg.in_channels if i == 0 else cfg.embed_dim[i - 1]
        c_out = cfg.embed_dim[i]
        self.pre_norm = cfg.patch_prenorm[i]
        self.conv = nn.Conv2d(
            c_in,
            c_out,
            kernel_size=cfg.patch_size[i],
            stride=cfg.patch_stride[i],
            padding=cfg.patch_padding[i],
        )
        self.norm = Norm(c_in if self.pre_norm else c_out, "layer", 1e-5)

    def forward(self, x: torch.Tensor, pixels: bool = False) -> torch.Tensor:
        """x: token rows [B, H, W, C_in], or NCHW pixels (``pixels``: the first stage) -> token rows
        [B, H', W', C_out]. Pixels go into the convolution as NCHW, as transformers has them: a
        3-channel image is a poor channels-last layout for cuDNN; the output's one copy into rows
        is the only one of the stage."""
        if self.pre_norm:
            x = _as_nchw(self.norm(x.permute(0, 2, 3, 1) if pixels else x))
        elif not pixels:
            x = _as_nchw(x)
        x = _as_rows(self.conv(x))
        return x if self.pre_norm else self.norm(x)


# Window attention's SDPA backends: not cuDNN's, which builds an execution plan for every new shape
# (the window count follows the engine's encoder batch size, which varies from run to run), a cost
# paid inside the timed run; flash attention has none. The math fallback serves what flash refuses.
_WINDOW_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class WindowAttention(nn.Module):
    def __init__(self, dim: int, heads: int, window: int, qkv_bias: bool):
        super().__init__()
        self.h, self.window = heads, window
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """x: normed token rows [B, H, W, C]; residual [B, H, W, C] (contiguous, updated in place)
        -> residual + attention(x).

        One copy cuts the windows out ([windows, ws * ws, C]); q, k and v are strided views of the
        qkv projection, which the attention kernels take as they are; the windows go back in place
        inside the residual add (no copy of their own). Padded positions are zeros before qkv
        (their keys and values are qkv's bias), as in transformers."""
        b, h, w, c = x.shape
        ws = self.window
        padded = bool(h % ws or w % ws)
        if padded:
            x = F.pad(x, (0, 0, 0, -w % ws, 0, -h % ws))
        hp, wp = x.shape[1], x.shape[2]
        nh, nw = hp // ws, wp // ws
        x = x.view(b, nh, ws, nw, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)
        n, t, _ = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.h, c // self.h).permute(2, 0, 3, 1, 4)
        with sdpa_kernel(_WINDOW_BACKENDS):
            o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, c)
        o = self.proj(o).view(b, nh, nw, ws, ws, c).permute(0, 1, 3, 2, 4, 5)  # [B, nh, ws, nw, ws, C]
        if padded:
            return residual.add_(o.reshape(b, hp, wp, c)[:, :h, :w])
        residual.view(b, nh, ws, nw, ws, c).add_(o)
        return residual


class ChannelAttention(nn.Module):
    """Attention across channel groups: each group's channels are the queries and keys, the tokens
    their features (scale: tokens**-0.5).

    Computed channel-major with batched matmuls (no attention kernel: the "head dim" is the token
    count, which flash/cuDNN refuse and the math fallback pays for in copies): q, k, v = W x^T + b
    as [B, C, N] (one GEMM each, x^T a transposed view), so every (image, group) is a contiguous
    [C/g, N] slice; scores [C/g, C/g] = q k^T, softmax, o = attn v; the output projection reads
    o^T (a transposed view) and adds into the residual in its GEMM."""

    def __init__(self, dim: int, groups: int, qkv_bias: bool):
        super().__init__()
        self.groups = groups
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """x: normed tokens [B, N, C]; residual [B, N, C] -> residual + attention(x)."""
        b, n, c = x.shape
        g = self.groups
        xt = x.transpose(1, 2)  # [B, C, N], a view
        w = self.qkv.weight.view(3, c, c)
        bias = self.qkv.bias
        qkv = []
        for i in range(3):
            wi = w[i].expand(b, c, c)
            if bias is None:
                qkv.append(torch.bmm(wi, xt))
            else:
                qkv.append(torch.baddbmm(bias[i * c : (i + 1) * c, None].expand(b, c, n), wi, xt))
        q, k, v = (t.view(b * g, c // g, n) for t in qkv)
        scores = torch.bmm(q, k.transpose(1, 2)) * n**-0.5  # [B g, C/g, C/g]
        attn = scores.softmax(dim=-1)
        o = torch.bmm(attn, v).view(b, c, n)
        out = torch.baddbmm(residual, o.transpose(1, 2), self.proj.weight.t().expand(b, c, c))
        return out.add_(self.proj.bias)


class _Block(nn.Module):
    """conv1 residual, attention (pre-norm) residual, conv2 residual, MLP (pre-norm) residual.

    Activations stay token rows [B, H, W, C] (channels-last): the depthwise convolutions read them
    as channels-last NCHW views and write channels-last, so no permute copies; each convolution's
    residual add is fused into the next LayerNorm (``Norm.add``)."""

    def __init__(self, cfg, dim: int, attn: nn.Module, attn_name: str):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)
        self.norm1 = Norm(dim, "layer", 1e-5)
        setattr(self, attn_name, attn)
        self._attn_name = attn_name
        self.conv2 = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)
        self.norm2 = Norm(dim, "layer", 1e-5)
        self.ffn = _mlp(dim, cfg.mlp_ratio, cfg.activation_function)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: token rows [B, H, W, C] -> the same."""
        b, h, w, c = x.shape
        y, t = self.norm1.add(_as_rows(self.conv1(_as_nchw(x))), x)
        if self._attn_name == "window_attn":
            t = self.window_attn(y, t)
        else:
            t = self.channel_attn(y.view(b, h * w, c), t.view(b, h * w, c)).view(b, h, w, c)
        y, t = self.norm2.add(_as_rows(self.conv2(_as_nchw(t))), t)
        return t + self.ffn(y)


class DaViTBlock(nn.Module):
    def __init__(self, cfg, i: int):
        super().__init__()
        dim = cfg.embed_dim[i]
        self.spatial_block = _Block(
            cfg, dim, WindowAttention(dim, cfg.num_heads[i], cfg.window_size, cfg.qkv_bias), "window_attn"
        )
        self.channel_block = _Block(
            cfg, dim, ChannelAttention(dim, cfg.num_groups[i], cfg.qkv_bias), "channel_attn"
        )

    def forward(self, x):
        return self.channel_block(self.spatial_block(x))


class VisionTower(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.convs = nn.ModuleList(ConvEmbed(cfg, i) for i in range(len(cfg.embed_dim)))
        self.blocks = nn.ModuleList(
            nn.ModuleList(DaViTBlock(cfg, i) for _ in range(cfg.depths[i])) for i in range(len(cfg.embed_dim))
        )

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, C, H, W] -> the last stage's token rows [B, H', W', C'] (channels-last from
        the first convolution's output on)."""
        x = pixels.to(self.convs[0].conv.weight.dtype, memory_format=torch.contiguous_format)
        for i, (conv, blocks) in enumerate(zip(self.convs, self.blocks)):
            x = conv(x, pixels=i == 0)
            for block in blocks:
                x = block(x)
        return x


class Projector(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        v = cfg.vision_config
        c = v.embed_dim[-1]
        self.row_embeddings = nn.Embedding(v.max_position_embeddings, c // 2)
        self.column_embeddings = nn.Embedding(v.max_position_embeddings, c - c // 2)
        self.image_projection = nn.Linear(c, v.projection_dim, bias=False)
        self.image_proj_norm = Norm(v.projection_dim, "layer", 1e-5)
        temporal = torch.zeros(c)
        temporal[1::2] = 1.0  # the first cosine temporal embedding: sin(0) at even, cos(0) at odd features
        self.register_buffer("temporal", temporal, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: token rows [B, H, W, C] -> [B, H * W + 1, projection_dim]."""
        b, h, w, c = x.shape
        col = self.column_embeddings(torch.arange(w, device=x.device))
        row = self.row_embeddings(torch.arange(h, device=x.device))
        pos = torch.cat([col[None].expand(h, -1, -1), row[:, None].expand(-1, w, -1)], dim=-1)  # [H, W, C]
        t = ((x + pos) + self.temporal.to(x.dtype)).view(b, h * w, c)
        t = torch.cat([t.mean(dim=1, keepdim=True), t], dim=1)
        return self.image_proj_norm(self.image_projection(t))


class Florence2(EncDecModel):
    """transformers' ``Florence2ForConditionalGeneration``."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        v = cfg.vision_config
        self.vision_tower = VisionTower(v)
        self.multi_modal_projector = Projector(cfg)
        self.language_model = Bart(cfg.text_config)
        self.image_token_id = cfg.image_token_id
        self.channels = v.in_channels
        self.strides = list(zip(v.patch_size, v.patch_stride, v.patch_padding))
        lm = self.language_model
        self.cache_spec = lm.cache_spec
        self.max_target_positions, self.max_source_positions = (
            lm.max_target_positions,
            lm.max_source_positions,
        )
        self.vocab_size = lm.vocab_size

    def image_tokens(self, height: int, width: int) -> int:
        """Image tokens of an image of height x width pixels: the last stage's grid, plus one."""
        for k, stride, pad in self.strides:
            height, width = (height + 2 * pad - k) // stride + 1, (width + 2 * pad - k) // stride + 1
        return height * width + 1

    def encoder_activation_bytes(self, tokens: int) -> int:
        """The vision tower's stages dominate: stage i's grid has (product of the later patch
        strides)^2 token rows per image token, of embed_dim[i] channels, and its MLP's hidden
        (mlp_ratio wider) is live with about four more such tensors (bf16)."""
        v = self.config.vision_config
        per_token, later = 0, 1
        for i in reversed(range(len(v.embed_dim))):
            per_token = max(per_token, later * later * v.embed_dim[i] * (v.mlp_ratio + 4) * 2)
            later *= self.strides[i][1]
        return max(EncDecModel.encoder_activation_bytes(self, tokens), int(tokens * per_token))

    # ---- weights --------------------------------------------------------------------------------
    def rename(self, name: str) -> str | None:
        name = name.removeprefix("model.")
        if name.startswith("language_model."):
            ours = self.language_model.rename(name.removeprefix("language_model."))
            return None if ours is None else "language_model." + ours
        if name == "lm_head.weight":
            return "language_model.lm_head.weight"
        if name.startswith("multi_modal_projector."):
            if "visual_temporal_embed" in name:
                return None  # a fixed table; its first row is the buffer ``temporal``
            return name.replace("image_position_embed.", "")
        return name if name.startswith("vision_tower.") else None

    def fill_missing(self, name: str) -> bool:
        return name.startswith("language_model.") and self.language_model.fill_missing(
            name.removeprefix("language_model.")
        )

    def post_load(self) -> None:
        self.language_model.post_load()
        temporal = torch.zeros_like(self.multi_modal_projector.temporal)
        temporal[1::2] = 1.0
        self.multi_modal_projector.temporal.copy_(temporal)

    def decoder_layers(self):
        return self.language_model.decoder_layers()

    # ---- encoder --------------------------------------------------------------------------------
    def _parts(self, item, values: bool = True) -> tuple[torch.Tensor, np.ndarray]:
        if not isinstance(item, dict) or "pixel_values" not in item or "input_ids" not in item:
            raise ValueError(
                "a Florence-2 encoder input is a dict with pixel_values [C, H, W] and input_ids (the "
                f"processor's prompt with its image tokens), got {type(item).__name__}"
            )
        pixels = item["pixel_values"]
        shape = tuple(getattr(pixels, "shape", ()))
        if len(shape) != 3 or shape[0] != self.channels or min(shape[1:]) < 32:
            raise ValueError(f"pixel_values must be [{self.channels}, H, W] (H, W >= 32), got {list(shape)}")
        pixels = check_pixels(pixels, shape, values)
        ids = as_token_ids(item["input_ids"])
        n_image, expected = int((ids == self.image_token_id).sum()), self.image_tokens(*shape[1:])
        if n_image != expected:
            raise ValueError(
                f"input_ids hold {n_image} image tokens; a {shape[1]} x {shape[2]} image makes {expected}"
            )
        return pixels, ids

    def encoder_length(self, item) -> int:
        _, ids = self._parts(item)
        if len(ids) > self.max_source_positions:
            raise ValueError(
                f"{len(ids)} encoder tokens; this model takes at most {self.max_source_positions}"
            )
        if ids.min() < 0 or ids.max() >= self.language_model.source_vocab_size:
            raise ValueError("input_ids hold a token id outside the model's vocabulary")
        return len(ids)

    def prepare_encoder_batch(self, items, device) -> ImageTextBatch:
        """The items' pixel values were checked by ``encoder_length`` (the engine's admission)."""
        parts = [self._parts(x, values=False) for x in items]
        lens = [len(ids) for _, ids in parts]
        ids = torch.from_numpy(np.concatenate([ids for _, ids in parts]))
        cu = torch.tensor([0, *np.cumsum(lens)], dtype=torch.int32)
        if len({tuple(p.shape) for p, _ in parts}) > 1:
            raise ValueError("the images of one encoder batch must have one size (the image processor's)")
        return ImageTextBatch(
            inputs=host_to_device(ids, device),
            cu_seqlens=host_to_device(cu, device),
            max_seqlen=max(lens),
            pixels=stack_to_device([p for p, _ in parts], device),  # as given: fp16 moves half the bytes
        )

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, C, H, W] -> image tokens [B, N, d_model]."""
        return self.multi_modal_projector(self.vision_tower(pixels))

    # ---- the pieces around the language model's layer stacks (base.py runs the stacks) ---------
    def encoder_layers(self):
        return self.language_model.encoder_layers()

    def embed_encoder(self, batch: ImageTextBatch) -> torch.Tensor:
        """The prompt's token embeddings with the image tokens in place of the placeholders (the
        vision tower runs here: on stage 0 of a pipeline)."""
        lm = self.language_model
        x = lm.shared(batch.inputs) * lm.embed_scale
        image = self.image_features(batch.pixels)
        x = x.masked_scatter(
            (batch.inputs == self.image_token_id)[:, None], image.reshape(-1, image.shape[-1])
        )
        return lm.encoder.embed(x, packed_positions(batch.cu_seqlens, batch.inputs.shape[0]))

    def finish_encoder(self, x, residual) -> torch.Tensor:
        return self.language_model.finish_encoder(x, residual)

    def embed_decoder(self, tokens, positions) -> torch.Tensor:
        return self.language_model.embed_decoder(tokens, positions)

    def decoder_head(self, x, residual, meta: AttentionMetadata, out=None) -> torch.Tensor:
        return self.language_model.decoder_head(x, residual, meta, out)
