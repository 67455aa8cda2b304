"""Triton paged decode attention (``paged_attention``) and the K/V cache store (``store_kv``).

Same signatures and semantics as the references in ``encdec_kernels/reference.py`` (the test
oracle). Shapes: Tq = packed query tokens, H = heads, D = head dim, B = sequences, NB = cache
blocks, BS = cache block size, S = KV splits, NBK = T5 buckets. Softmax and split-KV: see
``common.py``.

- One kernel body serves decoder self-attention (``IS_CAUSAL``) and cross-attention. When
  B * H is small next to the SM count it splits the key range over several programs and
  ``common.merge_splits_kernel`` merges the partial results.
- T5 relative position bias without per-call host work (the kernel is CUDA-graph captured): a
  cached int32 table maps each distance in ``[-max_distance, max_distance]`` to its bucket (the
  reference formula itself, bit-exact; buckets saturate beyond), the kernel clamps the distance
  and reads ``table[h, bucket]`` from ``RelBias.table``.
- On CPU tensors (``TRITON_INTERPRET=1``, the tests) fixed small tiles are used so small test
  shapes still exercise several tiles. The kernels are not autotuned.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from encdec_kernels.checks import (
    CACHE_DTYPES,
    check_head_dim,
    check_rel_bias,
    check_scale,
    check_scales,
    check_tables,
    check_tensor,
)
from encdec_kernels.common import (
    LOG2E,
    MIN_DOT,
    NEG_INIT,
    dot_precision,
    load_rows,
    merge_splits_kernel,
    num_kv_splits,
    quantize_rows,
    scores,
    softmax_update,
    tile_dim,
)
from encdec_kernels.pdl import pdl_launch
from encdec_kernels.reference import relative_position_bucket

__all__ = ["paged_attention", "store_kv"]

# Tiles used on CPU tensors (Triton interpreter). Small, so tests on small shapes cover the
# multi-tile paths; tests may patch this dict.
INTERPRET_PAGED_TILES = {"BLOCK_N": 16}
# One query per sequence (plain decode): True = pad the query tile to 16 rows and use tl.dot
# (tensor cores, K/V loads pipelined through shared memory with cp.async); False =
# broadcast-multiply in registers.
SINGLE_QUERY_DOT = True


# Device code. Kept out of ruff format: Triton kernels read better with packed argument lists.
# fmt: off


@triton.jit
def _bucket_bias(table_row, lut_center, q_pos, k_pos, max_dist):
    """T5 bias [len(q_pos), len(k_pos)] = table_row[bucket(k - q)]: lut_center[d] is the bucket
    of distance d for |d| <= max_dist; buckets saturate beyond, so the distance is clamped."""
    rel = tl.minimum(tl.maximum(k_pos[None, :] - q_pos[:, None], -max_dist), max_dist)
    return tl.load(table_row + tl.load(lut_center + rel))


@triton.jit
def _paged_tiles(acc, m_i, l_i, q, k_base, v_base, bt_row, stride_kb, stride_ks, stride_vb, stride_vs,
                 ks_base, vs_base, stride_sb, stride_ss,
                 table_row, lut_center, max_dist, q_pos, bias_q_pos, seq_len, lo, hi, scale, exp2_scale,
                 window, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr,
                 HAS_WINDOW: tl.constexpr,
                 USE_DOT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_N: tl.constexpr, CACHE_BLOCK: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 FP8: tl.constexpr):
    """Key tiles [lo, hi) of one query tile, keys gathered through the block table. FP8: the
    caches hold e4m3 values with a float32 scale per (token, head) row (ks_base / vs_base); the fp8
    tiles convert exactly to q's dtype, a key's scale multiplies its score column and a value's
    scale its row (dequantized in registers)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        if MASKED:
            blk = tl.load(bt_row + cols // CACHE_BLOCK, mask=cols < seq_len, other=0)
        else:
            blk = tl.load(bt_row + cols // CACHE_BLOCK)
        blk = blk.to(tl.int64)  # block * stride exceeds int32 for large caches
        slot = cols % CACHE_BLOCK
        k_ptrs = k_base + (blk * stride_kb + slot * stride_ks)[:, None] + offs_d[None, :]
        k = load_rows(k_ptrs, cols, seq_len, offs_d, MASKED, HEAD_DIM, BLOCK_D)
        if FP8:
            s_off = blk * stride_sb + slot * stride_ss
            if MASKED:
                k_sc = tl.load(ks_base + s_off, mask=cols < seq_len, other=0.0)
                v_sc = tl.load(vs_base + s_off, mask=cols < seq_len, other=0.0)
            else:
                k_sc = tl.load(ks_base + s_off)
                v_sc = tl.load(vs_base + s_off)
            s = scores(q, k.to(q.dtype), USE_DOT, DOT_PRECISION) * k_sc[None, :]
        else:
            s = scores(q, k, USE_DOT, DOT_PRECISION)
        if HAS_BIAS:  # natural units: scale * q.k + bias (exp2_scale is then LOG2E)
            s = tl.fma(s, scale, _bucket_bias(table_row, lut_center, bias_q_pos, cols, max_dist))
        if MASKED:
            keep = cols[None, :] < seq_len
            if IS_CAUSAL:
                keep = keep & (cols[None, :] <= q_pos[:, None])
            if HAS_WINDOW:  # sliding window: keys window or more positions before the query are masked
                keep = keep & (cols[None, :] > q_pos[:, None] - window)
            s = tl.where(keep, s, float("-inf"))
        v_ptrs = v_base + (blk * stride_vb + slot * stride_vs)[:, None] + offs_d[None, :]
        v = load_rows(v_ptrs, cols, seq_len, offs_d, MASKED, HEAD_DIM, BLOCK_D)
        if FP8:
            v = (v.to(tl.float32) * v_sc[:, None]).to(q.dtype)
        acc, m_i, l_i = softmax_update(acc, m_i, l_i, s, exp2_scale, v, USE_DOT, DOT_PRECISION)
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["num_q_tiles", "num_splits", "window"])
def _paged_attn_kernel(
    Q, K_CACHE, V_CACHE, Out, BLOCK_TABLES, SEQ_LENS, CU_SEQLENS_Q,
    K_SCALES, V_SCALES,  # fp8 caches (FP8): float32 scales [NB, BS, H], one per (token, head) row
    TABLE, LUT,  # T5 bias: RelBias.table [H, NBK] float32, bucket of each distance [2 * max_dist + 1] int32
    O_PART, LSE_PART,  # split partials [Tq, H, S, BLOCK_D] / [Tq, H, S] float32 (only if IS_SPLIT)
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_sb, stride_ss, stride_sh,
    stride_bt, stride_table_h,
    num_heads, num_q_tiles, num_splits, max_dist, scale, exp2_scale, window,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    CACHE_BLOCK: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_WINDOW: tl.constexpr,
    SINGLE_QUERY: tl.constexpr,
    IS_SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr, FP8: tl.constexpr, PDL: tl.constexpr,
):
    # Axis 0: (query tile, head, sequence), query tiles fastest; axis 1: key split.
    if PDL:  # encdec_kernels/pdl.py: the next kernel may launch; q and the new K/V are ready after the wait
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    pid = tl.program_id(0)
    split = tl.program_id(1)
    tile_q = pid % num_q_tiles
    off_h = (pid // num_q_tiles) % num_heads
    off_b = pid // (num_q_tiles * num_heads)
    USE_DOT: tl.constexpr = BLOCK_Q >= MIN_DOT

    q_start = tl.load(CU_SEQLENS_Q + off_b)
    q_len = tl.load(CU_SEQLENS_Q + off_b + 1) - q_start
    m0 = tile_q * BLOCK_Q
    if m0 >= q_len:
        return
    seq_len = tl.load(SEQ_LENS + off_b)
    row0 = q_start.to(tl.int64)

    offs_q = m0 + tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, BLOCK_D)
    q_ptrs = Q + row0 * stride_qt + off_h * stride_qh + offs_q[:, None] * stride_qt + offs_d[None, :]
    q = load_rows(q_ptrs, offs_q, q_len, offs_d, True, HEAD_DIM, BLOCK_D)
    q_pos = seq_len - q_len + offs_q  # position of each query among the keys (causal)
    if SINGLE_QUERY:  # one query per sequence (plain decode): one bias row, broadcast over the tile
        bias_q_pos = tl.zeros([1], dtype=tl.int32) + (seq_len - 1)
    else:
        bias_q_pos = q_pos

    # Keys this query tile may see: [0, hi); of those, [0, full_hi) need no mask.
    if IS_CAUSAL:
        hi = tl.maximum(tl.minimum(seq_len, seq_len - q_len + m0 + BLOCK_Q), 0)
        full_hi = (tl.maximum(tl.minimum(seq_len, seq_len - q_len + m0 + 1), 0) // BLOCK_N) * BLOCK_N
    else:
        hi = seq_len
        full_hi = (seq_len // BLOCK_N) * BLOCK_N
    # A causal sliding window (keys q - k < window): no row of the tile sees keys before its first
    # row's window, whole tiles from lo on; every tile is masked.
    lo = 0
    if HAS_WINDOW:
        lo = (tl.maximum(seq_len - q_len + m0 - window + 1, 0) // BLOCK_N) * BLOCK_N
        full_hi = lo
    # This split's share of [lo, hi): whole tiles, the last split takes the ragged end.
    chunk = tl.cdiv(tl.cdiv(tl.maximum(hi - lo, 0), num_splits), BLOCK_N) * BLOCK_N
    lo_s = tl.minimum(lo + split * chunk, hi)
    hi_s = tl.minimum(lo_s + chunk, hi)
    mid_s = tl.maximum(lo_s, tl.minimum(hi_s, full_hi))

    k_base = K_CACHE + off_h * stride_kh
    v_base = V_CACHE + off_h * stride_vh
    ks_base = K_SCALES + off_h * stride_sh
    vs_base = V_SCALES + off_h * stride_sh
    bt_row = BLOCK_TABLES + off_b.to(tl.int64) * stride_bt
    table_row = TABLE + off_h * stride_table_h
    lut_center = LUT + max_dist
    m_i = tl.full([BLOCK_Q], NEG_INIT, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_Q], dtype=tl.float32)
    acc = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32)
    acc, m_i, l_i = _paged_tiles(acc, m_i, l_i, q, k_base, v_base, bt_row, stride_kb, stride_ks, stride_vb,
                                 stride_vs, ks_base, vs_base, stride_sb, stride_ss, table_row, lut_center,
                                 max_dist, q_pos, bias_q_pos, seq_len,
                                 lo_s, mid_s, scale, exp2_scale, window, False, IS_CAUSAL, HAS_BIAS,
                                 HAS_WINDOW, USE_DOT, HEAD_DIM, BLOCK_D, BLOCK_N, CACHE_BLOCK, DOT_PRECISION,
                                 FP8)
    acc, m_i, l_i = _paged_tiles(acc, m_i, l_i, q, k_base, v_base, bt_row, stride_kb, stride_ks, stride_vb,
                                 stride_vs, ks_base, vs_base, stride_sb, stride_ss, table_row, lut_center,
                                 max_dist, q_pos, bias_q_pos, seq_len,
                                 mid_s, hi_s, scale, exp2_scale, window, True, IS_CAUSAL, HAS_BIAS,
                                 HAS_WINDOW, USE_DOT, HEAD_DIM, BLOCK_D, BLOCK_N, CACHE_BLOCK, DOT_PRECISION,
                                 FP8)

    # Rows without any key (empty split, or seq_len == 0 padding) give 0 and lse = -inf.
    has_keys = l_i > 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    row_mask = offs_q < q_len
    if not IS_SPLIT:
        o_ptrs = Out + row0 * stride_ot + off_h * stride_oh + offs_q[:, None] * stride_ot + offs_d[None, :]
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_mask[:, None] & (offs_d[None, :] < HEAD_DIM))
    else:
        lse = tl.where(has_keys, m_i + tl.math.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        part_row = ((row0 + offs_q) * num_heads + off_h) * num_splits + split  # [Tq, H, S] flat index
        tl.store(LSE_PART + part_row, lse, mask=row_mask)
        tl.store(O_PART + part_row[:, None] * BLOCK_D + offs_d[None, :], out, mask=row_mask[:, None])


@triton.jit
def _store_kv_kernel(K, V, K_CACHE, V_CACHE, SLOTS, K_SCALES, V_SCALES, stride_kt, stride_kh, stride_vt,
                     stride_vh, stride_sb, stride_ss, stride_sh, block_size, num_heads,
                     HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, FP8: tl.constexpr,
                     PDL: tl.constexpr):
    """One program per token: copy its [H, D] K and V rows into cache slot SLOTS[t] (-1 = skip).
    FP8: each (token, head) row is quantized to e4m3 with its own scale (written to the [NB, BS, H]
    float32 K_SCALES / V_SCALES at their strides)."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(SLOTS + t)
    if slot < 0:
        return
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < num_heads) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(K + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(V + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    dst = slot * num_heads * HEAD_DIM + offs_h[:, None] * HEAD_DIM + offs_d[None, :]  # caches are contiguous
    if FP8:
        k, k_sc = quantize_rows(k)
        v, v_sc = quantize_rows(v)
        at = (slot // block_size) * stride_sb + (slot % block_size) * stride_ss + offs_h * stride_sh
        tl.store(K_SCALES + at, k_sc, mask=offs_h < num_heads)
        tl.store(V_SCALES + at, v_sc, mask=offs_h < num_heads)
    tl.store(K_CACHE + dst, k.to(K_CACHE.dtype.element_ty), mask=mask)
    tl.store(V_CACHE + dst, v.to(V_CACHE.dtype.element_ty), mask=mask)


# fmt: on


@functools.lru_cache(maxsize=64)
def _bucket_lut(
    num_buckets: int, max_distance: int, bidirectional: bool, device: torch.device
) -> torch.Tensor:
    """Bucket of every distance -max_distance..max_distance: [2 * max_distance + 1] int32, computed
    by the reference formula itself (bit-exact on this device). Beyond +-max_distance buckets
    saturate, so clamping the distance is exact. Cached: create it before any CUDA-graph capture
    (one warm-up call of paged_attention per RelBias config)."""
    rel = torch.arange(-max_distance, max_distance + 1, device=device)
    return relative_position_bucket(rel, num_buckets, max_distance, bidirectional).to(torch.int32)


def _paged_block_n(block_d: int) -> int:
    # 64 keys per tile: [64, D] K and V tiles keep 16 KB (D = 64, bf16) in flight per program;
    # halve for D > 128 so the fp32 products stay in registers.
    return 64 if block_d <= 128 else 32


def paged_attention(
    q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, max_seqlen_q, *, scale, causal, rel_bias=None,
    window=None, return_lse=False, k_scales=None, v_scales=None,
):  # fmt: skip
    """Decoder attention over a paged cache: 1..k query tokens per sequence.

    q: [Tq, H, D] packed (any token/head strides, last dim contiguous); sequence b owns
    q[cu_seqlens_q[b]:cu_seqlens_q[b+1]]. k_cache, v_cache: [NB, BS, H, D] contiguous, BS a
    power of two; block_tables: [B, max_blocks] int32; seq_lens: [B] int32 = number of keys of
    sequence b (already including the new tokens for self-attention), at most max_blocks * BS;
    cu_seqlens_q: [B+1] int32; max_seqlen_q: python int >= every query count.
    causal=True (self-attention): the i-th of q_len queries sits at position seq_len - q_len + i
    and sees keys at positions <= its own. causal=False (cross-attention): all seq_len keys.
    rel_bias: T5 bias on key_pos - query_pos. window (causal only): a sliding window, keys ``window``
    or more positions before the query are masked. scale: python float > 0. fp8 (e4m3) caches come
    with k_scales, v_scales: [NB, BS, H] float32 with the same strides, each block's dense (token- or
    head-major), one scale per (token, head) row; the kernel reads the fp8 values and dequantizes
    in registers. Returns a new [Tq, H, D] tensor; with
    return_lse, (out, lse [Tq, H] float32: the natural log of each query and head's softmax sum,
    from the split partials, which this path always writes). No host sync: safe inside CUDA-graph
    capture after one warm-up call per configuration (compiles the kernels, caches the T5 bucket
    table).
    """
    check_tensor("q", q, 3)
    check_tensor("k_cache", k_cache, 4, CACHE_DTYPES, device=q.device, contiguous=True)
    check_tensor("v_cache", v_cache, 4, CACHE_DTYPES, device=q.device, contiguous=True)
    h, d = q.shape[1:]
    check_scales(k_cache, k_scales, "k", contiguous=True)
    check_scales(v_cache, v_scales, "v", contiguous=True)
    if k_scales is not None and k_scales.stride() != v_scales.stride():
        raise ValueError("k_scales and v_scales must have the same strides")
    want = torch.float8_e4m3fn if k_scales is not None else q.dtype
    if k_cache.shape != v_cache.shape or k_cache.dtype != want or v_cache.dtype != want:
        raise ValueError(
            f"k_cache and v_cache must share shape and the dtype {want}, got "
            f"{tuple(k_cache.shape)} {k_cache.dtype} and {tuple(v_cache.shape)} {v_cache.dtype}"
        )
    if tuple(k_cache.shape[2:]) != (h, d):
        raise ValueError(f"cache heads/head dim {tuple(k_cache.shape[2:])} do not match q's {(h, d)}")
    bs = k_cache.shape[1]
    if bs < 1 or bs & (bs - 1):
        raise ValueError(f"cache block size must be a power of two, got {bs}")
    check_head_dim(d)
    check_tables(block_tables, seq_lens, cu_seqlens_q, max_seqlen_q, q.device)
    check_scale(scale)
    check_rel_bias(rel_bias, h, q.device)
    if window is not None and (
        not causal or isinstance(window, bool) or not isinstance(window, int) or window < 1
    ):
        raise ValueError(
            f"window must be a positive int of causal attention, got {window!r} (causal={causal})"
        )
    return _launch_paged(
        q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, max_seqlen_q, scale, causal, rel_bias,
        return_lse=return_lse, window=window, k_scales=k_scales, v_scales=v_scales,
    )  # fmt: skip


def _launch_paged(
    q,
    k_cache,
    v_cache,
    block_tables,
    seq_lens,
    cu_seqlens_q,
    max_seqlen_q,
    scale,
    causal,
    rel_bias,
    num_splits=None,
    block_n=None,
    num_warps=None,
    num_stages=None,
    return_lse=False,
    window=None,
    k_scales=None,
    v_scales=None,
):
    """paged_attention without the input checks; num_splits, block_n, num_warps, num_stages
    override the built-in choices (tests and benchmarks)."""
    tq, h, d = q.shape
    out = torch.empty((tq, h, d), device=q.device, dtype=q.dtype)
    num_seqs = block_tables.shape[0]
    if tq == 0 or num_seqs == 0 or max_seqlen_q == 0:
        return (out, torch.full((tq, h), float("-inf"), device=q.device)) if return_lse else out
    if rel_bias is None:
        table = lut = torch.empty((1, 1), device=q.device, dtype=torch.float32)  # never read
        max_dist = 0
    else:
        table, max_dist = rel_bias.table, rel_bias.max_distance
        lut = _bucket_lut(rel_bias.num_buckets, max_dist, bool(rel_bias.bidirectional), q.device)
    block_d = tile_dim(d)
    # A tl.dot-able query tile of 16..64 rows; one query row: 16 (SINGLE_QUERY_DOT) or 1 (the
    # broadcast-multiply path).
    block_q = min(64, max(MIN_DOT.value, triton.next_power_of_2(max_seqlen_q)))
    if max_seqlen_q == 1 and not SINGLE_QUERY_DOT:
        block_q = 1
    # Launch shape (chosen with benchmarks/sweep_kernels.py): query tiles of <= 16 rows take 2 warps
    # and 2 stages, larger tiles (k > 16 queries) 4 warps and 3 stages.
    num_q_tiles = triton.cdiv(max_seqlen_q, block_q)
    if block_n is None:
        block_n = _paged_block_n(block_d) if q.is_cuda else INTERPRET_PAGED_TILES["BLOCK_N"]
    if num_splits is None:
        num_splits = num_kv_splits(
            num_seqs * h * num_q_tiles, block_tables.shape[1] * k_cache.shape[1], block_n, q.device
        )
    split = num_splits > 1 or return_lse  # the log-sum-exp comes from the split partials (one split or more)
    if split:
        o_part = torch.empty((tq, h, num_splits, block_d), device=q.device, dtype=torch.float32)
        lse_part = torch.empty((tq, h, num_splits), device=q.device, dtype=torch.float32)
    else:
        o_part = lse_part = out  # unused
    has_bias = rel_bias is not None
    fp8 = k_scales is not None
    if not fp8:
        k_scales = v_scales = table  # never read
    # fmt: off
    _paged_attn_kernel[(num_q_tiles * h * num_seqs, num_splits)](
        q, k_cache, v_cache, out, block_tables, seq_lens, cu_seqlens_q, k_scales, v_scales, table, lut,
        o_part, lse_part,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        *(k_scales.stride() if fp8 else (0, 0, 1)),  # scales [NB, BS, H], a block's token- or head-major
        block_tables.stride(0), table.stride(0),
        h, num_q_tiles, num_splits, max_dist, float(scale),
        LOG2E if has_bias else float(scale) * LOG2E,  # exp2_scale: with bias the scores are scaled first
        int(window or 0),
        HEAD_DIM=d, BLOCK_D=block_d, BLOCK_Q=block_q, BLOCK_N=block_n, CACHE_BLOCK=k_cache.shape[1],
        IS_CAUSAL=bool(causal), HAS_BIAS=has_bias, HAS_WINDOW=window is not None,
        SINGLE_QUERY=max_seqlen_q == 1 and has_bias,
        IS_SPLIT=split, DOT_PRECISION=dot_precision(q.dtype), FP8=fp8,
        num_warps=num_warps or (2 if block_q <= MIN_DOT.value else 4),
        num_stages=num_stages or (2 if block_q <= MIN_DOT.value else 3),  # prefetch depth of the K/V loads
        **pdl_launch(q),
    )
    if split:
        merge_splits_kernel[(tq * h, 1)](
            o_part, lse_part, out, out.stride(0), out.stride(1), h, num_splits, block_d,
            HEAD_DIM=d, BLOCK_D=block_d, BLOCK_S=max(16, triton.next_power_of_2(num_splits)),  # few compiles
            num_warps=1 if block_d <= 64 else 2,  # one (token, head) row of D floats per program
            **pdl_launch(q),
        )
    # fmt: on
    if return_lse:  # partials are log2 of each split's sum: natural log of the whole sum
        return out, torch.logsumexp(lse_part * math.log(2.0), dim=-1)
    return out


def store_kv(k, v, k_cache, v_cache, slot_mapping, k_scales=None, v_scales=None):
    """Write new K/V rows into cache slots (in place).

    k, v: [N, H, D] (any token/head strides, last dim contiguous); k_cache, v_cache:
    [NB, BS, H, D] contiguous; slot_mapping: [N] int64, slot = block * BS + offset, -1 = skip.
    Values are cast to the cache dtype; fp8 (e4m3) caches: each (token, head) row is quantized
    with its own scale, written to k_scales / v_scales [NB, BS, H] float32, each block's dense
    (token-major, or head-major as the engine's pool keeps them: ``KVPool``).
    """
    check_tensor("k", k, 3)
    check_tensor("v", v, 3, device=k.device, first="k")
    check_tensor("k_cache", k_cache, 4, CACHE_DTYPES, device=k.device, contiguous=True, first="k")
    check_tensor("v_cache", v_cache, 4, CACHE_DTYPES, device=k.device, contiguous=True, first="k")
    check_scales(k_cache, k_scales, "k", contiguous=True)
    check_scales(v_cache, v_scales, "v", contiguous=True)
    if k_scales is not None and k_scales.stride() != v_scales.stride():
        raise ValueError("k_scales and v_scales must have the same strides")
    if v.shape != k.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if v_cache.shape != k_cache.shape or k_cache.shape[2:] != k.shape[1:]:
        raise ValueError(
            f"caches must be [NB, BS, H={k.shape[1]}, D={k.shape[2]}] and alike, got "
            f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if not isinstance(slot_mapping, torch.Tensor):
        raise ValueError(f"slot_mapping must be a torch.Tensor, got {type(slot_mapping).__name__}")
    if slot_mapping.dtype != torch.int64 or slot_mapping.shape != (k.shape[0],):
        raise ValueError(
            f"slot_mapping must be an int64 tensor of shape [N={k.shape[0]}], "
            f"got {slot_mapping.dtype} {tuple(slot_mapping.shape)}"
        )
    if slot_mapping.device != k.device:
        raise ValueError(f"slot_mapping is on {slot_mapping.device} but k is on {k.device}")
    if not slot_mapping.is_contiguous():
        raise ValueError("slot_mapping must be contiguous; call .contiguous() on it")
    n, h, d = k.shape
    if n == 0:
        return
    block_h, block_d = triton.next_power_of_2(h), triton.next_power_of_2(d)
    fp8 = k_scales is not None
    if not fp8:
        k_scales = v_scales = slot_mapping  # never read
    # fmt: off
    _store_kv_kernel[(n,)](
        k, v, k_cache, v_cache, slot_mapping, k_scales, v_scales, k.stride(0), k.stride(1), v.stride(0),
        v.stride(1), *(k_scales.stride() if fp8 else (0, 0, 0)), k_cache.shape[1], h,
        HEAD_DIM=d, BLOCK_H=block_h, BLOCK_D=block_d, FP8=fp8,
        num_warps=max(1, min(8, block_h * block_d // 256)),  # ~256 elements (8 per thread) per warp
        **pdl_launch(k),
    )
    # fmt: on
