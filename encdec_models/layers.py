"""Layers shared by every model family: attention (encoder / decoder self / cross), MLP, norms,
and the pre-/post-norm encoder and decoder layers built from them.

Parameter names follow the BART/Whisper checkpoints (``self_attn``, ``encoder_attn``,
``*_layer_norm``); other families rename at load time (see ``encdec_models/loading.py``). q/k/v are
fused into ``qkv_proj`` and cross-attention k/v into ``kv_proj`` at load time.
Shapes: T = packed tokens of a step, d = d_model, H = heads, D = head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

import encdec_kernels
from encdec_kernels import RelBias
from encdec_models.base import AttentionMetadata, layer_boundary_hook, run_layers  # noqa: F401 (re-exported)


@dataclass(frozen=True)
class LayerConfig:
    """What distinguishes the families' transformer layers."""

    d_model: int
    num_heads: int
    head_dim: int
    d_ff: int
    activation: str  # transformers ACT2FN name: "gelu", "relu", "gelu_new", ...
    gated: bool  # T5 v1.1: act(fc1(x)) * up(x)
    pre_norm: bool  # Whisper, mBART, Pegasus, T5: x + f(norm(x)); BART, Marian: norm(x + f(x))
    norm: str  # "layer" or "rms"
    norm_eps: float
    bias: bool  # q/v/out projections and MLP carry biases (all but T5)
    scale: float  # softmax scale: head_dim**-0.5, or 1.0 for T5
    softcap: float | None = None  # Gemma: attention scores become softcap * tanh(scores / softcap)
    sandwich: bool = False  # Gemma: x + post_norm(f(pre_norm(x))) (a norm after each sub-layer too)
    cross_d_model: int | None = None  # width of the encoder output cross-attention reads (default d_model)
    mlp_bias: bool | None = None  # the MLP's biases when they differ from the attention's (Moonshine)
    qk_norm: bool = False  # Gemma 3: an RMSNorm over each head's query and key (before rotary)

    @classmethod
    def layer_norm_style(cls, cfg, heads: int, ffn: int, pre_norm: bool) -> LayerConfig:
        """Whisper and BART-family layers (transformers config fields): LayerNorm (eps 1e-5),
        biases, head_dim**-0.5 scaling, the config's activation."""
        return cls.plain(cfg.d_model, heads, ffn, cfg.activation_function, 1e-5, pre_norm)

    @classmethod
    def plain(
        cls, d: int, heads: int, ffn: int, activation: str, eps: float, pre_norm: bool = True
    ) -> LayerConfig:
        """A BERT/ViT-style layer of width d: LayerNorm with ``eps``, biases, an ungated MLP of
        width ``ffn``, head_dim**-0.5 scaling."""
        head_dim = d // heads
        return cls(
            d_model=d,
            num_heads=heads,
            head_dim=head_dim,
            d_ff=ffn,
            activation=activation,
            gated=False,
            pre_norm=pre_norm,
            norm="layer",
            norm_eps=eps,
            bias=True,
            scale=head_dim**-0.5,
        )


class Norm(nn.Module):
    """LayerNorm or T5 RMSNorm; ``add`` fuses the residual sum."""

    def __init__(self, d: int, kind: str, eps: float):
        super().__init__()
        self.kind, self.eps = kind, eps
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d)) if kind == "layer" else None

    def forward(self, x):
        x = x.contiguous()  # the kernels take rows; the vision encoders hand in permuted views
        if self.kind == "rms":
            return encdec_kernels.rms_norm(x, self.weight, self.eps)
        return encdec_kernels.layer_norm(x, self.weight, self.bias, self.eps)

    def linear(self, x, residual, linear: nn.Linear, activation: str | None = None, kv_store=None):
        """(act(linear(norm(x + residual))), x + residual) in one kernel (``encdec_kernels.norm_gemv``):
        a few rows, residual None for norm(x); ``kv_store``: see ``Attention.kv_store``."""
        return encdec_kernels.norm_gemv(
            x,
            residual,
            self.weight,
            self.bias,
            self.eps,
            self.kind == "rms",
            linear.weight,
            linear.bias,
            activation,
            kv_store,
        )

    def add(self, x, residual):
        """(norm(x + residual), x + residual); strided x or residual (a layer stack's first residual
        is its input) are taken as forward takes them (a copy only when not contiguous)."""
        x, residual = x.contiguous(), residual.contiguous()
        if self.kind == "rms":
            return encdec_kernels.add_rms_norm(x, residual, self.weight, self.eps)
        return encdec_kernels.add_layer_norm(x, residual, self.weight, self.bias, self.eps)


@dataclass(frozen=True)
class Rotary:
    """Rotary position embedding of a step's tokens over each head's full width D: cos, sin [T, D]
    and ``partner`` [D], the feature each feature turns with. The first R <= D features turn (partial
    rotary: the rest have cos 1 and sin 0, so they pass unchanged); layouts: "rotate half" (Llama,
    Gemma: feature i pairs with i + R/2) or interleaved (Moonshine: feature 2i pairs with 2i + 1).
    ``sin`` carries the sign of the partner's term, so x turned is x * cos + x[partner] * sin: q
    and k of a layer turn together in four elementwise kernels, with the roundings of transformers'
    (q * cos) + (rotate(q) * sin) (the sign flip is exact). Passed to attention in the
    position-bias slot."""

    cos: torch.Tensor
    sin: torch.Tensor
    partner: torch.Tensor

    @classmethod
    def at(
        cls,
        inv_freq: torch.Tensor,
        positions: torch.Tensor,
        dtype: torch.dtype,
        interleaved: bool = False,
        head_dim: int | None = None,
    ) -> Rotary:
        """inv_freq [R/2] float32, positions [T] -> the rotary of those positions (angles in float32,
        as transformers computes them, cos and sin then cast to ``dtype``); head_dim D >= R (None: R)."""
        freqs = positions.float()[:, None] * inv_freq[None, :]
        emb = freqs.repeat_interleave(2, dim=-1) if interleaved else torch.cat((freqs, freqs), dim=-1)
        r = emb.shape[-1]
        d = head_dim or r
        i = torch.arange(d, device=emb.device)
        if interleaved:
            partner, first = torch.where(i < r, i ^ 1, i), i % 2 == 0
        else:
            h = r // 2
            partner, first = torch.where(i < h, i + h, torch.where(i < r, i - h, i)), i < h
        cos, sin = F.pad(emb.cos(), (0, d - r), value=1.0), F.pad(emb.sin(), (0, d - r))
        return cls(cos.to(dtype), torch.where(first, -sin, sin).to(dtype), partner)

    @classmethod
    def table(cls, inv_freq, max_positions: int, dtype, interleaved: bool = False, head_dim=None) -> Rotary:
        """The rotary of positions 0 .. max_positions - 1, computed once: ``rows`` then gathers a
        step's (the same values as ``at``, in two gathers instead of a dozen kernels a step)."""
        positions = torch.arange(max_positions, device=inv_freq.device)
        return cls.at(inv_freq, positions, dtype, interleaved, head_dim)

    def rows(self, positions: torch.Tensor) -> Rotary:
        """This table's rotary at ``positions`` [T]."""
        return Rotary(self.cos[positions], self.sin[positions], self.partner)

    def _turn(self, qk: torch.Tensor):
        """qk [T, 2, H, D] -> q, k turned."""
        cos, sin = self.cos[:, None, None], self.sin[:, None, None]
        return (qk * cos + qk.index_select(-1, self.partner) * sin).unbind(1)

    def split(self, qkv: torch.Tensor, h: int, d: int):
        """qkv [T, 3 * H * D] -> (q, k turned; v), each [T, H, D] (views)."""
        x = qkv.view(-1, 3, h, d)
        return (*self._turn(x[:, :2]), x[:, 2])

    def apply(self, q: torch.Tensor, k: torch.Tensor):
        """q, k [T, H, D] (e.g. after per-head norms) -> turned."""
        return self._turn(torch.stack((q, k), 1))


def masked_group_norm(x: torch.Tensor, lengths: torch.Tensor, norm: nn.GroupNorm) -> torch.Tensor:
    """``norm`` (a GroupNorm) of each item of a padded batch over its own valid positions only:
    x [B, C, L], item b valid at positions < lengths[b] ([B] on x's device). The valid positions
    equal ``norm`` run on each item alone (statistics in float32, as torch's GroupNorm keeps them
    for half inputs); the padded positions come out finite and meaningless. No host sync.

    Few passes over x: per-position sums and sums of squares over each group's channels, taken
    around a pivot (each group's mean at the first position: no cancellation when the values sit
    far from zero), masked and summed over positions, then one per-(item, channel) scale and shift."""
    b, c, n = x.shape
    g, cg = norm.num_groups, c // norm.num_groups
    pivot = x[:, :, :1].float().view(b, g, cg).mean(-1)  # [B, G]
    xc = x.view(b, g, cg, n) - pivot[..., None, None]  # float32 (type promotion), one kernel
    valid = (torch.arange(n, device=x.device) < lengths[:, None])[:, None]  # [B, 1, L]
    count = (lengths.float() * cg)[:, None]  # [B, 1]
    mean = (xc.sum(2) * valid).sum(-1) / count  # [B, G], around the pivot
    var = (torch.linalg.vector_norm(xc, dim=2).square() * valid).sum(-1) / count - mean.square()
    scale = torch.rsqrt(var.clamp_min(0) + norm.eps)[..., None].expand(b, g, cg)  # [B, G, C/G]
    if norm.affine:
        scale = scale * norm.weight.float().view(g, cg)
    shift = -mean[..., None] * scale
    if norm.affine:
        shift = shift + norm.bias.float().view(g, cg)
    return torch.addcmul(shift.reshape(b, c, 1), xc.view(b, c, n), scale.reshape(b, c, 1)).to(x.dtype)


def repeat_kv_heads(w: torch.Tensor, n_rep: int, head_dim: int) -> torch.Tensor:
    """A grouped-query K or V projection (weight [kv_heads * D, d] or bias) with each K/V head
    repeated for its n_rep query heads (transformers' repeat_kv order), so the caches and kernels
    see plain multi-head attention."""
    if n_rep == 1:
        return w
    return w.view(-1, head_dim, *w.shape[1:]).repeat_interleave(n_rep, 0).reshape(-1, *w.shape[1:])


def _split_position(pos):
    """(rotary or None, T5 bias or None) from the position slot of a layer call."""
    return (pos, None) if isinstance(pos, Rotary) else (None, pos)


def _few_rows(x) -> bool:
    """Whether x [M, d] runs the Triton few-row kernels (``encdec_kernels.gemv``): batch-1 decoding
    and its speculative verification (K + 1 rows) on CUDA, decode steps of a few sequences, where
    cuBLAS leaves most SMs idle. Everything else takes cuBLAS / the CPU path."""
    return (
        x.dim() == 2
        and 1 <= x.shape[0] <= encdec_kernels.GEMV_MAX_ROWS
        and x.shape[1] <= (encdec_kernels.GEMV_MAX_K if x.shape[0] == 1 else encdec_kernels.GEMV_ROWS_MAX_K)
        and encdec_kernels.use_triton(x)
    )


class Linear(nn.Linear):
    """nn.Linear whose calls of a few rows on CUDA run ``encdec_kernels.gemv``."""

    def forward(self, x):
        if _few_rows(x):
            return encdec_kernels.gemv(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def norm_linear(norm: Norm, x, residual, linear: nn.Linear, kv_store=None):
    """(linear(norm(x + residual)), x + residual) of a pre-norm block (residual None: the first
    layer, norm(x) and x); one kernel for a few rows (up to GEMV_MAX_ROWS) on CUDA. ``kv_store``
    (only where ``Attention.kv_store`` gave one, which implies the few-row path): that kernel
    also writes the step's K/V rows into the cache."""
    if _few_rows(x):
        return norm.linear(x, residual, linear, kv_store=kv_store)
    h, residual = _pre_norm(norm, x, residual)
    return linear(h), residual


class Attention(nn.Module):
    """Multi-head attention in one of four roles: encoder self, decoder self (paged), cross, and
    merged (T5Gemma 2: decoder self and cross in one softmax, one set of projections)."""

    def __init__(self, cfg: LayerConfig, cross: bool = False, merged: bool = False):
        super().__init__()
        self.h, self.d, self.scale = cfg.num_heads, cfg.head_dim, cfg.scale
        self.softcap = cfg.softcap
        # per layer: sliding window (keys this far away or more are masked; encoder: int or (before, after))
        self.window: int | tuple[int, int] | None = None
        self.rope_kind: str | None = None  # the rotary this layer takes of a {kind: Rotary} position argument
        self.merged = merged
        if cfg.qk_norm:
            self.q_norm = Norm(cfg.head_dim, cfg.norm, cfg.norm_eps)
            self.k_norm = Norm(cfg.head_dim, cfg.norm, cfg.norm_eps)
        else:
            self.q_norm = self.k_norm = None
        inner = cfg.num_heads * cfg.head_dim
        if cross:
            self.q_proj = Linear(cfg.d_model, inner, bias=cfg.bias)
            self.kv_proj = Linear(cfg.cross_d_model or cfg.d_model, 2 * inner, bias=cfg.bias)
        else:
            self.qkv_proj = Linear(cfg.d_model, 3 * inner, bias=cfg.bias)
        self.out_proj = Linear(inner, cfg.d_model, bias=cfg.bias)
        self.k_cache = self.v_cache = None  # [NB, BS, H, D] views bound by the engine
        self.cross_rows = None  # cross, absorbed: encoder-output rows [C, NB, BS, d] (bind_cache)
        # fp8 pools: float32 scales, one per cached (token, head) row [NB, BS, H] / encoder row [C, NB, RC]
        self.k_scales = self.v_scales = self.row_scales = None

    def _head_norm(self, norm: Norm | None, x):
        """x [T, H, D] with Gemma 3's per-head RMSNorm (None: unchanged)."""
        return x if norm is None else norm(x.reshape(-1, self.d)).view(x.shape)

    def _qkv(self, qkv, pos):
        """qkv [T, 3 * H * D] -> (q, k, v [T, H, D], T5 bias or None): q and k after the per-head
        norms and the rotary of ``pos`` (a Rotary, a {kind: Rotary} of which this layer takes
        ``rope_kind``'s, a T5 bias or None). Without head norms q and k turn together as they are
        split from qkv."""
        if isinstance(pos, dict):
            pos = pos[self.rope_kind]
        rotary, rel_bias = _split_position(pos)
        if rotary is not None and self.q_norm is None:
            return (*rotary.split(qkv, self.h, self.d), rel_bias)
        q, k, v = qkv.view(-1, 3, self.h, self.d).unbind(1)
        q, k = self._head_norm(self.q_norm, q), self._head_norm(self.k_norm, k)
        if rotary is not None:
            q, k = rotary.apply(q, k)
        return q, k, v, rel_bias

    def _scales(self) -> dict:
        """The fp8 cache's scales for the kernels (none for a cache in the model's dtype)."""
        return {} if self.k_scales is None else {"k_scales": self.k_scales, "v_scales": self.v_scales}

    def _extra(self) -> dict:
        """Sliding window / soft-capping keywords for the kernels (none for the other models)."""
        if self.window is None and self.softcap is None:
            return {}
        return {"window": self.window, "softcap": self.softcap}

    def encoder(self, x, cu_seqlens, max_seqlen, rel_bias: RelBias | Rotary | None = None):
        """x: [T, d] packed encoder tokens -> [T, d]. rel_bias: T5's bias or rotary positions."""
        q, k, v, rel_bias = self._qkv(self.qkv_proj(x), rel_bias)
        o = encdec_kernels.varlen_attention(
            q, k, v, cu_seqlens, max_seqlen,
            scale=self.scale, causal=False, rel_bias=rel_bias, **self._extra(),
        )  # fmt: skip
        return self.out_proj(o.reshape(-1, self.h * self.d))

    def kv_store(self, x, meta: AttentionMetadata, pos) -> tuple | None:
        """(k_cache, v_cache, slot_mapping) for the qkv projection's one-row kernel to write this
        step's K/V rows into the cache itself (one kernel fewer a layer: ``decoder_self(...,
        stored=True)``, as ``decoder_self_pre_norm`` does), or None: only for x on the few-row
        path, a cache of 16-bit or float32 rows (fp8 rows take a scale over a whole row) and K/V
        that leave the projection as they are cached (no per-head norms, no rotary); not with
        ENCDEC_GEMV_KV_STORE=0."""
        if (
            self.k_cache is None
            or not encdec_kernels.GEMV_KV_STORE
            or self.k_scales is not None
            or self.q_norm is not None
            or self.merged
            or isinstance(pos, (Rotary, dict))
            or not _few_rows(x)
        ):
            return None
        from encdec_kernels.linear import GEMV_ROWS  # (the few-row path: Triton is there)

        if x.shape[0] > GEMV_ROWS:  # more rows take the tensor-core kernel, which stores nothing
            return None
        return self.k_cache, self.v_cache, meta.slot_mapping

    def decoder_self_pre_norm(self, norm: Norm, x, residual, meta: AttentionMetadata, rel_bias=None):
        """A pre-norm decoder layer's self-attention block: (decoder_self(qkv_proj(norm(x +
        residual))), x + residual), the norm and the projection one kernel on the few-row path,
        which also writes the new K/V rows where ``kv_store`` allows (no ``store_kv`` then)."""
        store = self.kv_store(x, meta, rel_bias)
        qkv, residual = norm_linear(norm, x, residual, self.qkv_proj, store)
        return self.decoder_self(qkv, meta, rel_bias, stored=store is not None), residual

    def decoder_self(self, qkv, meta: AttentionMetadata, rel_bias: RelBias | None = None, stored=False):
        """qkv: [Tq, 3 * H * D] = qkv_proj of the new decoder tokens; writes their K/V to the paged
        cache (unless the projection did: ``stored``), attends causally -> [Tq, d]."""
        q, k, v, rel_bias = self._qkv(qkv, rel_bias)
        if not stored:
            encdec_kernels.store_kv(
                k, v, self.k_cache, self.v_cache, meta.slot_mapping, self.k_scales, self.v_scales
            )
        o = encdec_kernels.paged_attention(
            q,
            self.k_cache,
            self.v_cache,
            meta.self_attn.block_tables,
            meta.self_attn.seq_lens,
            meta.cu_seqlens_q,
            meta.max_seqlen_q,
            scale=self.scale,
            causal=True,
            rel_bias=rel_bias,
            **self._extra(),
            **self._scales(),
        )
        return self.out_proj(o.reshape(-1, self.h * self.d))

    def cross(self, q, meta: AttentionMetadata):
        """q: [Tq, H * D] = q_proj of the decoder tokens; attends to the request's cross K/V
        (written once by ``write_cross``) -> [Tq, d]. With ``cross_rows`` bound, it attends to the
        request's encoder output rows e instead: per head h the query moves to model space,
        q Wk_h (the key bias only shifts a row's scores), attends over e (keys and values at
        once), and the result moves back through Wv_h (+ bv_h: the weights sum to 1)."""
        q = q.view(-1, self.h, self.d)
        cu, most = meta.queries(meta.cross_attn)
        if self.cross_rows is not None:
            if self.softcap is not None:
                raise ValueError("absorbed cross-attention has no score soft-capping; use per-layer K/V")
            w = self.kv_proj.weight.view(2, self.h, self.d, -1)  # [K|V, H, D, d]
            qe = torch.bmm(q.transpose(0, 1), w[0])  # [H, Tq, d]
            o = encdec_kernels.shared_kv_attention(
                qe.transpose(0, 1),
                self.cross_rows,
                meta.cross_attn.block_tables,
                meta.cross_attn.seq_lens,
                cu,
                most,
                scale=self.scale,
                row_scales=self.row_scales,
            ).transpose(0, 1)  # [H, Tq, d]
            if self.kv_proj.bias is None:
                ov = torch.bmm(o, w[1].transpose(1, 2))
            else:
                ov = torch.baddbmm(self.kv_proj.bias.view(2, self.h, 1, self.d)[1], o, w[1].transpose(1, 2))
            return self.out_proj(ov.transpose(0, 1).reshape(-1, self.h * self.d))
        o = encdec_kernels.paged_attention(
            q,
            self.k_cache,
            self.v_cache,
            meta.cross_attn.block_tables,
            meta.cross_attn.seq_lens,
            cu,
            most,
            scale=self.scale,
            causal=False,
            **self._extra(),
            **self._scales(),
        )
        return self.out_proj(o.reshape(-1, self.h * self.d))

    def decoder_merged(self, qkv, meta: AttentionMetadata, pos):
        """T5Gemma 2's merged attention. qkv: [Tq, 3 * H * D] = qkv_proj of the new decoder tokens;
        their K/V go to the paged self cache. Each query attends with one softmax over the request's
        encoder keys (the cross cache, written by ``write_cross`` with the same K/V projections) and
        its own causal (sliding-window) keys: computed as the two usual paged attentions, each
        returning its log-sum-exp, merged by their shares of the joint softmax sum -> [Tq, d]."""
        q, k, v, _ = self._qkv(qkv, pos)
        encdec_kernels.store_kv(
            k, v, self.k_cache, self.v_cache, meta.slot_mapping, self.k_scales, self.v_scales
        )
        args = (q, self.k_cache, self.v_cache)
        o_self, lse_self = encdec_kernels.paged_attention(
            *args, meta.self_attn.block_tables, meta.self_attn.seq_lens, meta.cu_seqlens_q,
            meta.max_seqlen_q, scale=self.scale, causal=True, window=self.window, return_lse=True,
            **self._scales(),
        )  # fmt: skip
        o_cross, lse_cross = encdec_kernels.paged_attention(
            *args, meta.cross_attn.block_tables, meta.cross_attn.seq_lens, *meta.queries(meta.cross_attn),
            scale=self.scale, causal=False, return_lse=True, **self._scales(),
        )  # fmt: skip
        o = encdec_kernels.merge_attention(o_self, lse_self, o_cross, lse_cross)
        return self.out_proj(o.reshape(-1, self.h * self.d))

    def write_cross(self, hidden, slot_mapping):
        """hidden: [T_enc, d] encoder output; slot_mapping: [T_enc] cross-cache slots. Merged
        attention projects the encoder output with its own K/V projections and key norm (no rotary)."""
        if self.merged:
            inner = self.h * self.d
            bias = None if self.qkv_proj.bias is None else self.qkv_proj.bias[inner:]
            k, v = F.linear(hidden, self.qkv_proj.weight[inner:], bias).view(-1, 2, self.h, self.d).unbind(1)
            k = self._head_norm(self.k_norm, k)
        else:
            k, v = self.kv_proj(hidden).view(-1, 2, self.h, self.d).unbind(1)
        encdec_kernels.store_kv(k, v, self.k_cache, self.v_cache, slot_mapping, self.k_scales, self.v_scales)


class MLP(nn.Module):
    """fc2(act(fc1(x))), or fc2(act(fc1(x)) * up(x)) when gated."""

    def __init__(self, cfg: LayerConfig):
        super().__init__()
        bias = cfg.bias if cfg.mlp_bias is None else cfg.mlp_bias
        self.fc1 = Linear(cfg.d_model, cfg.d_ff, bias=bias)
        self.up = Linear(cfg.d_model, cfg.d_ff, bias=bias) if cfg.gated else None
        self.fc2 = Linear(cfg.d_ff, cfg.d_model, bias=bias)
        self.activation = cfg.activation
        self.act = ACT2FN[cfg.activation]

    def forward(self, x):
        h = self.act(self.fc1(x))
        if self.up is not None:
            h = h * self.up(x)
        return self.fc2(h)

    def after_norm(self, norm: Norm, x, residual):
        """(mlp(norm(x + residual)), x + residual) of a pre-norm block; for a few rows on CUDA
        the norm, fc1 and its activation are one kernel."""
        if self.up is None and self.activation in encdec_kernels.GEMV_ACTIVATIONS and _few_rows(x):
            h, residual = norm.linear(x, residual, self.fc1, self.activation)
            return self.fc2(h), residual
        h, residual = _pre_norm(norm, x, residual)
        return self(h), residual


class EncoderLayer(nn.Module):
    def __init__(self, cfg: LayerConfig):
        super().__init__()
        self.pre_norm = cfg.pre_norm
        self.self_attn = Attention(cfg)
        self.self_attn_layer_norm = Norm(cfg.d_model, cfg.norm, cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.final_layer_norm = Norm(cfg.d_model, cfg.norm, cfg.norm_eps)
        self.sandwich = cfg.sandwich
        if cfg.sandwich:  # the norms after each sub-layer
            self.post_self_attn_layer_norm = Norm(cfg.d_model, cfg.norm, cfg.norm_eps)
            self.post_mlp_layer_norm = Norm(cfg.d_model, cfg.norm, cfg.norm_eps)

    def forward(self, x, cu_seqlens, max_seqlen, rel_bias=None, residual=None):
        """(x, residual) [T, d] -> (x, residual): see ``run_layers``."""
        if self.sandwich:  # Gemma: x + post(f(pre(x))); the sum is whole again after each layer
            x = x if residual is None else x + residual
            a = self.self_attn.encoder(self.self_attn_layer_norm(x), cu_seqlens, max_seqlen, rel_bias)
            x = x + self.post_self_attn_layer_norm(a)
            return x + self.post_mlp_layer_norm(self.mlp(self.final_layer_norm(x))), None
        if self.pre_norm:
            h, residual = _pre_norm(self.self_attn_layer_norm, x, residual)
            a = self.self_attn.encoder(h, cu_seqlens, max_seqlen, rel_bias)
            h, residual = self.final_layer_norm.add(a, residual)
            return self.mlp(h), residual
        a = self.self_attn.encoder(x, cu_seqlens, max_seqlen, rel_bias)
        x = self.self_attn_layer_norm.add(a, x)[0]
        return self.final_layer_norm.add(self.mlp(x), x)[0], None


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LayerConfig):
        super().__init__()
        self.pre_norm = cfg.pre_norm
        self.self_attn = Attention(cfg)
        self.self_attn_layer_norm = Norm(cfg.d_model, cfg.norm, cfg.norm_eps)
        self.encoder_attn = Attention(cfg, cross=True)
        self.encoder_attn_layer_norm = Norm(cfg.d_model, cfg.norm, cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.final_layer_norm = Norm(cfg.d_model, cfg.norm, cfg.norm_eps)
        self.sandwich = cfg.sandwich
        if cfg.sandwich:  # the norms after each sub-layer
            self.post_self_attn_layer_norm = Norm(cfg.d_model, cfg.norm, cfg.norm_eps)
            self.post_encoder_attn_layer_norm = Norm(cfg.d_model, cfg.norm, cfg.norm_eps)
            self.post_mlp_layer_norm = Norm(cfg.d_model, cfg.norm, cfg.norm_eps)

    def forward(self, x, meta: AttentionMetadata, rel_bias=None, residual=None):
        """(x, residual) [Tq, d] new decoder tokens -> (x, residual): see ``run_layers``."""
        sa, ca = self.self_attn, self.encoder_attn
        if self.sandwich:  # Gemma: x + post(f(pre(x))) for each sub-layer
            x = x if residual is None else x + residual
            a = sa.decoder_self(sa.qkv_proj(self.self_attn_layer_norm(x)), meta, rel_bias)
            x = x + self.post_self_attn_layer_norm(a)
            a = ca.cross(ca.q_proj(self.encoder_attn_layer_norm(x)), meta)
            x = x + self.post_encoder_attn_layer_norm(a)
            return x + self.post_mlp_layer_norm(self.mlp(self.final_layer_norm(x))), None
        if self.pre_norm:
            a, residual = sa.decoder_self_pre_norm(self.self_attn_layer_norm, x, residual, meta, rel_bias)
            q, residual = norm_linear(self.encoder_attn_layer_norm, a, residual, ca.q_proj)
            return self.mlp.after_norm(self.final_layer_norm, ca.cross(q, meta), residual)
        x = self.self_attn_layer_norm.add(sa.decoder_self(sa.qkv_proj(x), meta, rel_bias), x)[0]
        x = self.encoder_attn_layer_norm.add(ca.cross(ca.q_proj(x), meta), x)[0]
        return self.final_layer_norm.add(self.mlp(x), x)[0], None


class MergedDecoderLayer(nn.Module):
    """T5Gemma 2's decoder layer: Gemma's sandwich norms around one merged attention (decoder self
    and cross, ``Attention.decoder_merged``) and the MLP. The cross cache of layer i holds the encoder
    output's K/V under this attention's projections, so ``encoder_attn`` (what the engine binds the
    cross cache to and writes it through) is the same module as ``self_attn``."""

    def __init__(self, cfg: LayerConfig):
        super().__init__()
        self.self_attn = Attention(cfg, merged=True)
        self.self_attn_layer_norm = Norm(cfg.d_model, cfg.norm, cfg.norm_eps)
        self.post_self_attn_layer_norm = Norm(cfg.d_model, cfg.norm, cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.final_layer_norm = Norm(cfg.d_model, cfg.norm, cfg.norm_eps)
        self.post_mlp_layer_norm = Norm(cfg.d_model, cfg.norm, cfg.norm_eps)

    @property
    def encoder_attn(self) -> Attention:
        return self.self_attn

    def forward(self, x, meta: AttentionMetadata, pos=None, residual=None):
        """(x, residual) [Tq, d] new decoder tokens -> (x, None): see ``run_layers``."""
        x = x if residual is None else x + residual
        a = self.self_attn.decoder_merged(self.self_attn.qkv_proj(self.self_attn_layer_norm(x)), meta, pos)
        x = x + self.post_self_attn_layer_norm(a)
        return x + self.post_mlp_layer_norm(self.mlp(self.final_layer_norm(x))), None


def _pre_norm(norm: Norm, x, residual):
    """(norm(x + residual), x + residual); the first layer has no pending residual."""
    return (norm(x), x) if residual is None else norm.add(x, residual)


def logits_into(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [N, d] @ weight [V, d]^T: F.linear's product, written into ``out`` [N, V] when given (a
    CUDA graph's shared output, ``engine/cuda_graphs.py``: no copy into it after the step)."""
    return F.linear(x, weight) if out is None else torch.mm(x, weight.t(), out=out)


def final_norm(norm: Norm | None, x, residual, rows=None) -> torch.Tensor:
    """norm(x + residual) of the given rows (all when ``rows`` is None); residual may be None, and
    without a norm the plain sum."""
    if rows is not None:
        x = x[rows]
        residual = None if residual is None else residual[rows]
    if norm is None:
        return x if residual is None else x + residual
    return norm(x) if residual is None else norm.add(x, residual)[0]
