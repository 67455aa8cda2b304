"""Triton attention over packed variable-length sequences (encoder / prefill): ``varlen_attention``.

Same signature and semantics as the reference in ``encdec_kernels/reference.py`` (the test
oracle). Shapes: T = packed tokens, H = heads, D = head dim, B = sequences. Softmax: see
``common.py``.

- One program per (query tile, head, sequence); key tiles inside the sequence and before the
  causal diagonal run without masks, the rest masked.
- T5 relative position bias, no L x L tensor anywhere: the host gathers, once per call, a
  per-head table of the bias of every distance the kernel can meet, ``[H, 2 * W + 1, 2]``
  float32 with ``W >= max_seqlen + BIAS_PAD`` and entry ``W + d`` = (bias(d), bias(d + 1)). A
  thread of a tensor-core tile holds pairs of adjacent keys, so the kernel reads both with one
  8-byte gather (``ld.global.nc.v2``, issued in place: a ``tl.load`` gather would be
  software-pipelined through shared memory, one 4-byte cp.async per score). No clamping: the
  table is wide enough.
- On CPU tensors (``TRITON_INTERPRET=1``, the tests) fixed small tiles are used so small test
  shapes still exercise several tiles; on CUDA the kernel is autotuned per (head dim, causal,
  bias, dtype, power-of-two bucket of max_seqlen): the first call per new key compiles and
  benchmarks every config, so warm the encoder up per bucket before timing it (it is not
  graph-captured). ``ENCDEC_AUTOTUNE=0`` skips the benchmarking and takes a fixed config per key
  (the GPU tests do).
- On Hopper, long non-causal sequences without bias go to the Gluon kernel of
  ``flash_hopper.py`` (from ``HOPPER_MIN_SEQLEN`` keys on).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from encdec_kernels.checks import check_head_dim, check_index, check_rel_bias, check_scale, check_tensor
from encdec_kernels.common import LOG2E, NEG_INIT, dot_precision, load_rows, scores, softmax_update, tile_dim
from encdec_kernels.reference import RelBias, relative_position_bucket

__all__ = ["varlen_attention"]

BIAS_PAD = 256  # bias table margin beyond max_seqlen: >= every BLOCK_M / BLOCK_N (ragged tile ends)
AUTOTUNE_ENV = "ENCDEC_AUTOTUNE"  # "0": varlen_attention takes the first candidate config, no benchmarking
# Tiles used on CPU tensors (Triton interpreter). Small, so tests on small shapes cover the
# multi-tile paths; tests may patch this dict.
INTERPRET_VARLEN_TILES = {"BLOCK_M": 16, "BLOCK_N": 16}
# The Hopper kernel (encdec_kernels/flash_hopper.py) takes sequences from this length on: its
# 192-row query tiles sit partly empty on short ones (T5's 260-440 tokens), which stay here;
# Whisper's 1500 go there.
HOPPER_MIN_SEQLEN = 1024


# Device code. Kept out of ruff format: Triton kernels read better with packed argument lists.
# fmt: off


@triton.jit
def _gather_pairs(ptrs, GATHER_ASM: tl.constexpr):
    """(ptrs[0], ptrs[1]) float32 at every 8-byte aligned pointer of ptrs.

    GATHER_ASM (compiled CUDA): one read-only ld.global.nc.v2 per pair, left where it is. Triton
    would software-pipeline a tl.load gather that feeds a tl.dot through shared memory (one
    4-byte cp.async per element). The interpreter cannot run PTX: two tl.load there.
    """
    if GATHER_ASM:
        lo, hi = tl.inline_asm_elementwise("ld.global.nc.v2.f32 {$0, $1}, [$2];", "=r,=r,l", [ptrs],
                                           dtype=(tl.float32, tl.float32), is_pure=True, pack=1)
    else:
        lo = tl.load(ptrs)
        hi = tl.load(ptrs + 1)
    return lo, hi


@triton.jit
def _pair_bias(pairs_center, q_pos, start_n, BLOCK_N: tl.constexpr, GATHER_ASM: tl.constexpr):
    """T5 bias [BLOCK_M, BLOCK_N] of keys start_n + j for query positions q_pos [BLOCK_M].

    pairs_center[2 * d + {0, 1}] = (bias(d), bias(d + 1)) for every distance d = key - query
    the tiles can meet (no clamping needed); even keys read both of a pair.
    """
    k_even = start_n + 2 * tl.arange(0, BLOCK_N // 2)
    lo, hi = _gather_pairs(pairs_center + 2 * (k_even[None, :] - q_pos[:, None]), GATHER_ASM)
    return tl.reshape(tl.join(lo, hi), (q_pos.shape[0], BLOCK_N))  # [M, N/2, 2] -> [M, N]: keys 2j, 2j+1


@triton.jit
def _varlen_tiles(acc, m_i, l_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, pairs_center, offs_m,
                  seq_len, lo, hi, scale, exp2_scale,
                  MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr,
                  GATHER_ASM: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Key tiles [lo, hi) of one query tile. MASKED: the tiles that cross the sequence end or
    the causal diagonal; the others run without masks."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = load_rows(k_ptrs + start_n * stride_kt, cols, seq_len, offs_d, MASKED, HEAD_DIM, BLOCK_D)
        s = scores(q, k, True, DOT_PRECISION)
        if HAS_BIAS:  # natural units: scale * q.k + bias (exp2_scale is then LOG2E)
            s = tl.fma(s, scale, _pair_bias(pairs_center, offs_m, start_n, BLOCK_N, GATHER_ASM))
        if MASKED:
            keep = cols[None, :] < seq_len
            if IS_CAUSAL:
                keep = keep & (cols[None, :] <= offs_m[:, None])
            s = tl.where(keep, s, float("-inf"))
        v = load_rows(v_ptrs + start_n * stride_vt, cols, seq_len, offs_d, MASKED, HEAD_DIM, BLOCK_D)
        acc, m_i, l_i = softmax_update(acc, m_i, l_i, s, exp2_scale, v, True, DOT_PRECISION)
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["max_seqlen", "seq_bucket", "bias_center"])
def _varlen_attn_kernel(
    Q, K, V, Out, CU_SEQLENS, BIAS,  # BIAS: [H, 2 * bias_center + 1, 2] float32 pairs (only with HAS_BIAS)
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_bias_h,
    num_heads, max_seqlen,
    seq_bucket,  # power-of-two bucket of max_seqlen: only an autotune key (long Whisper vs short T5)
    bias_center, scale, exp2_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr,
    GATHER_ASM: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program per (query tile, head, sequence); query tiles of one (sequence, head) are
    # adjacent so they share K/V in L2.
    pid = tl.program_id(0)
    num_m_tiles = tl.cdiv(max_seqlen, BLOCK_M)
    tile_m = pid % num_m_tiles
    off_h = (pid // num_m_tiles) % num_heads
    off_b = pid // (num_m_tiles * num_heads)

    seq_start = tl.load(CU_SEQLENS + off_b)
    seq_len = tl.load(CU_SEQLENS + off_b + 1) - seq_start
    m0 = tile_m * BLOCK_M
    if m0 >= seq_len:
        return
    row0 = seq_start.to(tl.int64)  # token offsets can exceed int32 range once multiplied by strides

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_ptrs = Q + row0 * stride_qt + off_h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :]
    q = load_rows(q_ptrs, offs_m, seq_len, offs_d, True, HEAD_DIM, BLOCK_D)
    k_ptrs = K + row0 * stride_kt + off_h * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :]
    v_ptrs = V + row0 * stride_vt + off_h * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :]
    pairs_center = BIAS + off_h * stride_bias_h + 2 * bias_center

    m_i = tl.full([BLOCK_M], NEG_INIT, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Keys [0, full_hi) need no mask: inside the sequence and (causal) at or before every query
    # of the tile. Keys [full_hi, hi) get masked.
    if IS_CAUSAL:
        hi = tl.minimum(seq_len, m0 + BLOCK_M)
        full_hi = (tl.minimum(seq_len, m0 + 1) // BLOCK_N) * BLOCK_N
    else:
        hi = seq_len
        full_hi = (seq_len // BLOCK_N) * BLOCK_N
    acc, m_i, l_i = _varlen_tiles(acc, m_i, l_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, pairs_center,
                                  offs_m, seq_len, 0, full_hi, scale, exp2_scale, False, IS_CAUSAL, HAS_BIAS,
                                  GATHER_ASM, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION)
    acc, m_i, l_i = _varlen_tiles(acc, m_i, l_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, pairs_center,
                                  offs_m, seq_len, full_hi, hi, scale, exp2_scale, True, IS_CAUSAL, HAS_BIAS,
                                  GATHER_ASM, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION)

    out = acc / l_i[:, None]  # every real query row sees at least key 0, so l_i > 0
    o_ptrs = Out + row0 * stride_ot + off_h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]
    o_mask = (offs_m[:, None] < seq_len) & (offs_d[None, :] < HEAD_DIM)
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=o_mask)


# fmt: on


# -- tile configs ------------------------------------------------------------------------------

# Candidates per head dim, H100-minded; every BLOCK_M, BLOCK_N <= BIAS_PAD. Picked from offline
# sm_90 compiles (triton 3.6, registers per thread without / with T5 bias): only configs that
# do not spill registers to local memory, since compile and autotune time grow with every one.
_Cfg = triton.Config
_VARLEN_CONFIGS_BY_D = {
    64: [  # BLOCK_D <= 64, 16-bit inputs
        _Cfg({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=4, num_stages=3),  # 252 / 255 regs
        _Cfg({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=4, num_stages=4),  # 252 / 255
        _Cfg({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),  # 127 / 127: 4 warpgroups per SM
        _Cfg({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=2),  # 196 / 246
        _Cfg({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=3),  # 198 / 246
        _Cfg({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=4, num_stages=4),  # 180 / 172
        _Cfg({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),  # 142 / 166: 3 CTAs per SM
        _Cfg({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=4, num_stages=3),  # 212 / 242
    ],
    128: [  # 128 x 64 with 4 warps spills 300+ bytes here
        _Cfg({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),  # 190 / 229
        _Cfg({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),  # 227 / 250
        _Cfg({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=8, num_stages=3),  # - / 162
        _Cfg({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=3),  # - / 176
    ],
    256: [
        _Cfg({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=8, num_stages=2),  # - / 182
        _Cfg({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=8, num_stages=2),  # - / 255
        _Cfg({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=8, num_stages=2),  # - / 253
    ],
}
# float32 inputs (exact "ieee" dots on CUDA cores, the exactness mode, not a speed target): one
# small tile; 32 x 32 needs 114 registers at D = 64, anything larger spills (D >= 128 always does).
_VARLEN_CONFIGS_FP32 = {
    64: [_Cfg({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=2)],
    256: [_Cfg({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4, num_stages=2)],
}
_VARLEN_CONFIGS = [
    c for table in (_VARLEN_CONFIGS_BY_D, _VARLEN_CONFIGS_FP32) for cs in table.values() for c in cs
]


def _varlen_configs_for(block_d: int, dtype: torch.dtype) -> list:
    """The autotune candidates for a head dim / dtype; the first is the ENCDEC_AUTOTUNE=0 config."""
    table = _VARLEN_CONFIGS_FP32 if dtype == torch.float32 else _VARLEN_CONFIGS_BY_D
    return table[min(d for d in table if d >= block_d)]


def _varlen_prune(configs, named_args, **kwargs):
    allowed = _varlen_configs_for(kwargs["BLOCK_D"], named_args["Q"].dtype)
    return [c for c in configs if any(c is a for a in allowed)]


_varlen_attn_tuned = triton.autotune(
    configs=_VARLEN_CONFIGS,
    key=["BLOCK_D", "IS_CAUSAL", "HAS_BIAS", "seq_bucket"],  # + every tensor's dtype (added by triton)
    prune_configs_by={"early_config_prune": _varlen_prune},
)(_varlen_attn_kernel)


def _seq_bucket(max_seqlen: int) -> int:
    """Autotune key for the sequence length: Whisper's 1500 -> 2048, T5's ~440 -> 512."""
    return min(max(triton.next_power_of_2(max_seqlen), 64), 16384)


def _ptx_gathers(q: torch.Tensor) -> bool:
    """Whether the bias pair gathers may use PTX (NVIDIA GPUs; not the interpreter, not ROCm)."""
    return q.is_cuda and torch.version.hip is None


def _autotune_enabled() -> bool:
    return os.environ.get(AUTOTUNE_ENV, "1") != "0"


# -- T5 bias table and launcher -----------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _pair_buckets(
    num_buckets: int, max_distance: int, bidirectional: bool, center: int, device: torch.device
) -> torch.Tensor:
    """[2 * center + 1, 2] int64: row e holds the buckets of distances e - center and e - center + 1
    (the reference formula, bit-exact on this device)."""
    rel = torch.arange(-center, center + 2, device=device)
    b = relative_position_bucket(rel, num_buckets, max_distance, bidirectional)
    return torch.stack((b[:-1], b[1:]), dim=1)


def _bias_center(max_seqlen: int) -> int:
    """Half width of the varlen bias table: every distance a tile can meet is within
    +-(max_seqlen + BIAS_PAD). A power of two, so few tables get cached."""
    return triton.next_power_of_2(max_seqlen + BIAS_PAD)


def _bias_pairs(rel_bias: RelBias, center: int) -> torch.Tensor:
    """Per-head bias of adjacent distance pairs: [H, 2 * center + 1, 2] float32 (natural units),
    entry center + d = (bias(d), bias(d + 1))."""
    rb = rel_bias
    idx = _pair_buckets(rb.num_buckets, rb.max_distance, bool(rb.bidirectional), center, rb.table.device)
    return rb.table[:, idx]


def varlen_attention(q, k, v, cu_seqlens, max_seqlen, *, scale, causal=False, rel_bias=None):
    """Attention over packed variable-length sequences (encoder / prefill).

    q, k, v: [T, H, D] (any token/head strides, last dim contiguous); cu_seqlens: [B+1] int32
    offsets; max_seqlen: python int >= every sequence length. Returns a new [T, H, D] tensor.
    causal: token i of a sequence sees tokens <= i. rel_bias: T5 bias (positions restart at 0
    in every sequence). scale: python float > 0.
    """
    check_tensor("q", q, 3)
    check_tensor("k", k, 3, device=q.device)
    check_tensor("v", v, 3, device=q.device)
    if k.shape != q.shape or v.shape != q.shape or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"q, k, v must share shape and dtype, got {tuple(q.shape)} {q.dtype}, "
            f"{tuple(k.shape)} {k.dtype}, {tuple(v.shape)} {v.dtype}"
        )
    check_index("cu_seqlens", cu_seqlens, 1, q.device)
    if cu_seqlens.numel() < 1:
        raise ValueError("cu_seqlens must have B + 1 >= 1 entries")
    if isinstance(max_seqlen, torch.Tensor) or not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise ValueError(f"max_seqlen must be a python int >= 0 (no device sync), got {max_seqlen!r}")
    check_scale(scale)
    check_head_dim(q.shape[2])
    check_rel_bias(rel_bias, q.shape[1], q.device)
    return _launch_varlen(q, k, v, cu_seqlens, max_seqlen, scale, causal, rel_bias)


def _launch_varlen(q, k, v, cu_seqlens, max_seqlen, scale, causal, rel_bias, config=None):
    """varlen_attention without the input checks. config: a triton.Config to launch instead of
    the autotuned (or ENCDEC_AUTOTUNE=0 default) one; CUDA only (tests, benchmarks). Without one,
    the Hopper kernel (encdec_kernels/flash_hopper.py) takes the long sequences it supports (unless it
    does not compile with the installed Triton: then this one)."""
    if config is None and max_seqlen >= HOPPER_MIN_SEQLEN and q.is_cuda:
        from encdec_kernels import flash_hopper  # imported on first use: Gluon is a large import

        if flash_hopper.supports(q, k, v, causal, rel_bias):
            out = flash_hopper.flash_attention(q, k, v, cu_seqlens, max_seqlen, scale)
            if out is not None:
                return out
    t, h, d = q.shape
    out = torch.empty((t, h, d), device=q.device, dtype=q.dtype)
    num_seqs = cu_seqlens.numel() - 1
    if t == 0 or num_seqs == 0 or max_seqlen == 0:
        return out
    center = _bias_center(max_seqlen)
    if rel_bias is None:
        bias = torch.empty((1, 1), device=q.device, dtype=torch.float32)  # never read
    else:
        bias = _bias_pairs(rel_bias, center)
    block_d = tile_dim(d)
    if not q.is_cuda:  # interpreter: the fixed small test tiles
        kernel, meta = _varlen_attn_kernel, dict(INTERPRET_VARLEN_TILES)
    elif config is not None:
        kernel, meta = _varlen_attn_kernel, config.all_kwargs()
    elif _autotune_enabled():
        kernel, meta = _varlen_attn_tuned, {}
    else:
        kernel, meta = _varlen_attn_kernel, _varlen_configs_for(block_d, q.dtype)[0].all_kwargs()

    def grid(m):
        return (triton.cdiv(max_seqlen, m["BLOCK_M"]) * h * num_seqs,)

    has_bias = rel_bias is not None
    # fmt: off
    kernel[grid](
        q, k, v, out, cu_seqlens, bias,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), bias.stride(0),
        h, max_seqlen, _seq_bucket(max_seqlen), center, float(scale),
        LOG2E if has_bias else float(scale) * LOG2E,  # exp2_scale: with bias the scores are scaled first
        HEAD_DIM=d, BLOCK_D=block_d, IS_CAUSAL=bool(causal), HAS_BIAS=has_bias, GATHER_ASM=_ptx_gathers(q),
        DOT_PRECISION=dot_precision(q.dtype), **meta,
    )
    # fmt: on
    return out
