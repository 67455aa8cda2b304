"""The Swin image encoder of Donut (transformers' ``donut-swin``), in plain PyTorch.

Stages of pre-norm blocks over a grid of patches; each block attends within windows of
``window_size`` x ``window_size`` patches, with a learned bias per head indexed by the relative
position of the two patches, and every second block shifts the windows by half a window
(cyclically, with a mask keeping patches from different image regions apart). Between stages a
patch merging layer halves the grid and doubles the width. The biases and masks differ per window
and per block, which the engine's packed attention kernels do not cover: this encoder runs on the
reference path (``torch.nn.functional.scaled_dot_product_attention`` over the windows), on any
device. The MLPs and norms are the shared layers of ``encdec_models.layers``.

The rules follow transformers' modeling_donut_swin.py: a stage whose grid is no larger than the
window takes one window of the grid's size and no shift; grids are padded to whole windows (and to
even sizes before merging).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from encdec_models.layers import MLP, LayerConfig, Norm


def _pair(x) -> tuple[int, int]:
    return (int(x[0]), int(x[1])) if isinstance(x, (list, tuple)) else (int(x), int(x))


def relative_position_index(window: int) -> torch.Tensor:
    """[window², window²] index into the bias table of each (query, key) patch pair of a window."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def windows_of(x: torch.Tensor, window: int) -> torch.Tensor:
    """[B, H, W, C] -> [B * (H/w) * (W/w), w * w, C]."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c).transpose(2, 3)
    return x.reshape(-1, window * window, c)


def merge_windows(x: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """The inverse of :func:`windows_of`: [B * nW, w * w, C] -> [B, H, W, C]."""
    c = x.shape[-1]
    x = x.view(-1, h // window, w // window, window, window, c).transpose(2, 3)
    return x.reshape(-1, h, w, c)


def shift_mask(h: int, w: int, window: int, shift: int, device) -> torch.Tensor:
    """[nW, w², w²] additive mask of shifted windows: -100 between patches of different regions."""
    hr = (torch.arange(h, device=device) >= h - window).long() + (
        torch.arange(h, device=device) >= h - shift
    ).long()
    wr = (torch.arange(w, device=device) >= w - window).long() + (
        torch.arange(w, device=device) >= w - shift
    ).long()
    regions = (hr[:, None] * 3 + wr[None, :]).float()[None, :, :, None]  # [1, H, W, 1]
    r = windows_of(regions, window).squeeze(-1)  # [nW, w²]
    return torch.where(r[:, None, :] != r[:, :, None], -100.0, 0.0)


class WindowAttention(nn.Module):
    def __init__(self, dim: int, heads: int, window: int, qkv_bias: bool):
        super().__init__()
        self.h, self.d = heads, dim // heads
        self.qkv_proj = nn.Linear(dim, 3 * dim, bias=True)  # qkv_bias=False: the loader zeroes the bias
        self.out_proj = nn.Linear(dim, dim)
        self.bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        self.window = window

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x: [N windows, w², C]; mask: [nW, w², w²] (windows of one image, repeated per image) or None."""
        n, t, c = x.shape
        q, k, v = self.qkv_proj(x).view(n, t, 3, self.h, self.d).permute(2, 0, 3, 1, 4)  # each [N, H, t, D]
        index = relative_position_index(self.window).to(x.device)
        bias = self.bias_table[index.view(-1)].view(t, t, self.h).permute(2, 0, 1).to(x.dtype)  # [H, t, t]
        if mask is None:
            attn_bias = bias[None]
        else:
            nw = mask.shape[0]
            attn_bias = (bias[None, None] + mask[None, :, None].to(x.dtype)).expand(n // nw, -1, -1, -1, -1)
            attn_bias = attn_bias.reshape(n, self.h, t, t)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias)
        return self.out_proj(o.transpose(1, 2).reshape(n, t, c))


class SwinBlock(nn.Module):
    def __init__(self, cfg, dim: int, heads: int, shift: int):
        super().__init__()
        self.window, self.shift = cfg.window_size, shift
        self.norm1 = Norm(dim, "layer", cfg.layer_norm_eps)
        self.self_attn = WindowAttention(dim, heads, cfg.window_size, cfg.qkv_bias)
        self.norm2 = Norm(dim, "layer", cfg.layer_norm_eps)
        self.mlp = MLP(
            LayerConfig.plain(dim, heads, int(cfg.mlp_ratio * dim), cfg.hidden_act, cfg.layer_norm_eps)
        )

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """x: [B, H * W, C]."""
        h, w = hw
        window, shift = self.window, self.shift
        if min(h, w) <= window:  # one window covers the grid's short side: no shift
            window, shift = min(h, w), 0
        if window != self.window:
            raise ValueError(
                f"a Swin stage of {h} x {w} patches is smaller than its {self.window}-patch window; "
                "transformers cannot run this configuration either"
            )
        b, _, c = x.shape
        y = self.norm1(x).view(b, h, w, c)
        pad_b, pad_r = -h % window, -w % window
        y = F.pad(y, (0, 0, 0, pad_r, 0, pad_b))
        hp, wp = h + pad_b, w + pad_r
        if shift:
            y = torch.roll(y, shifts=(-shift, -shift), dims=(1, 2))
        mask = shift_mask(hp, wp, window, shift, x.device) if shift else None
        y = merge_windows(self.self_attn(windows_of(y, window), mask), window, hp, wp)
        if shift:
            y = torch.roll(y, shifts=(shift, shift), dims=(1, 2))
        x = x + y[:, :h, :w].reshape(b, h * w, c)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = Norm(4 * dim, "layer", 1e-5)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        h, w = hw
        b, _, c = x.shape
        x = F.pad(x.view(b, h, w, c), (0, 0, 0, w % 2, 0, h % 2))
        x = torch.cat([x[:, r::2, col::2] for col in range(2) for r in range(2)], dim=-1)
        return self.reduction(self.norm(x.reshape(b, -1, 4 * c)))


class SwinStage(nn.Module):
    def __init__(self, cfg, dim: int, depth: int, heads: int, downsample: bool):
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinBlock(cfg, dim, heads, 0 if i % 2 == 0 else cfg.window_size // 2) for i in range(depth)
        )
        self.downsample = PatchMerging(dim) if downsample else None


class SwinEncoder(nn.Module):
    """Donut's Swin encoder: pixels [B, C, H, W] -> the last stage's patches [B * N, C_last] packed."""

    def __init__(self, cfg):
        super().__init__()
        self.image_size, patch = _pair(cfg.image_size), _pair(cfg.patch_size)
        self.channels = cfg.num_channels
        d = cfg.embed_dim
        self.patch = nn.Conv2d(cfg.num_channels, d, kernel_size=patch, stride=patch)
        self.patch_norm = Norm(d, "layer", 1e-5)
        self.grid = (-(-self.image_size[0] // patch[0]), -(-self.image_size[1] // patch[1]))
        n_stages = len(cfg.depths)
        if getattr(cfg, "use_absolute_embeddings", False):  # transformers' Donut cannot run these either
            raise ValueError("Swin encoders with absolute position embeddings are not supported")
        self.stages = nn.ModuleList(
            SwinStage(cfg, d * 2**i, cfg.depths[i], cfg.num_heads[i], i < n_stages - 1)
            for i in range(n_stages)
        )
        self.hidden_size = d * 2 ** (n_stages - 1)
        h, w = self.grid
        for _ in range(n_stages - 1):
            h, w = (h + 1) // 2, (w + 1) // 2
        self.num_tokens = h * w

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.channels, *self.image_size)

    @staticmethod
    def rename(name: str) -> str | None:
        """A donut-swin checkpoint name (without the ``encoder.`` prefix) -> ours."""
        if name.endswith("relative_position_index") or name.startswith("pooler"):
            return None
        for theirs, ours in (
            ("embeddings.patch_embeddings.projection.", "patch."),
            ("embeddings.norm.", "patch_norm."),
            ("encoder.layers.", "stages."),
            (".layernorm_before.", ".norm1."),
            (".layernorm_after.", ".norm2."),
            (".attention.self.relative_position_bias_table", ".self_attn.bias_table"),
            (".attention.self.query.", ".self_attn.q_proj."),
            (".attention.self.key.", ".self_attn.k_proj."),
            (".attention.self.value.", ".self_attn.v_proj."),
            (".attention.output.dense.", ".self_attn.out_proj."),
            (".intermediate.dense.", ".mlp.fc1."),
            (".output.dense.", ".mlp.fc2."),
        ):
            name = name.replace(theirs, ours)
        return name

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """pixels [B, C, H, W] -> (hidden [B * N, C_last] packed, cu_seqlens [B+1], N)."""
        ph, pw = self.patch.kernel_size
        pixels = F.pad(pixels, (0, -pixels.shape[-1] % pw, 0, -pixels.shape[-2] % ph))
        x = self.patch(pixels)
        hw = (x.shape[2], x.shape[3])
        x = self.patch_norm(x.flatten(2).transpose(1, 2))
        for stage in self.stages:
            for block in stage.blocks:
                x = block(x, hw)
            if stage.downsample is not None:
                x = stage.downsample(x, hw)
                hw = ((hw[0] + 1) // 2, (hw[1] + 1) // 2)
        b, n, c = x.shape
        cu = torch.arange(0, (b + 1) * n, n, dtype=torch.int32, device=x.device)
        return x.reshape(b * n, c), cu, n
