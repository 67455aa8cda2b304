"""Triton attention kernels: varlen encoder/prefill attention, paged decode attention, KV store.

Same signatures and semantics as the references in ``encdec_kernels/reference.py`` (the test oracle).
Shapes: T = packed tokens, H = heads, D = head dim, B = sequences, NB = cache blocks,
BS = cache block size, S = KV splits, NBK = T5 buckets.

Design notes
- Softmax runs online (flash attention) in base 2. Raw scores s are turned into log2 units by
  one FMA together with the max subtraction, ``exp2(s * exp2_scale - m)``, so ``scale`` must be
  > 0; statistics and the output accumulator are float32.
- T5 relative position bias, no L x L tensor anywhere:
  - ``varlen_attention`` (compute-bound): the host gathers, once per call, a per-head table of
    the bias of every distance the kernel can meet, ``[H, 2 * W + 1, 2]`` float32 with
    ``W >= max_seqlen + BIAS_PAD`` and entry ``W + d`` = (bias(d), bias(d + 1)). A thread of a
    tensor-core tile holds pairs of adjacent keys, so the kernel reads both with one 8-byte
    gather (``ld.global.nc.v2``, issued in place: a ``tl.load`` gather would be software-
    pipelined through shared memory one 4-byte cp.async per score, which made the T5 encoder
    4.3x slower than without bias). No clamping: the table is wide enough.
  - ``paged_attention`` (memory-bound, CUDA-graph captured): no per-call host work. A cached
    int32 table maps each distance in ``[-max_distance, max_distance]`` to its bucket (the
    reference formula itself, bit-exact; buckets saturate beyond), the kernel clamps the distance
    and reads ``table[h, bucket]`` from ``RelBias.table``.
- ``paged_attention`` serves decoder self-attention (``IS_CAUSAL``) and cross-attention with
  one kernel body. When B * H is small next to the SM count it splits the key range over
  several programs (flash-decoding) and a second kernel merges the partial results. Every
  launch parameter derives from tensor shapes and python ints, never from tensor values, so
  it can be captured in a CUDA graph.
- On CPU tensors (``TRITON_INTERPRET=1``, the tests) fixed small tiles are used so small test
  shapes still exercise several tiles; on CUDA ``varlen_attention`` is autotuned per (head dim,
  causal, bias, dtype, power-of-two bucket of max_seqlen): the first call per new key compiles
  and benchmarks every config, so warm the encoder up per bucket before timing it (it is not
  graph-captured). ``ENCDEC_AUTOTUNE=0`` skips the benchmarking and takes a fixed config per key
  (the GPU tests do). The decode kernels are not autotuned.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from encdec_kernels.checks import check_tensor
from encdec_kernels.pdl import pdl_launch
from encdec_kernels.reference import RelBias, relative_position_bucket

__all__ = ["varlen_attention", "paged_attention", "shared_kv_attention", "store_kv", "store_rows"]

LOG2E = 1.4426950408889634  # 1 / ln(2): softmax in base 2, exp(x) == exp2(x * LOG2E)
NEG_INIT = tl.constexpr(-1.0e30)  # finite start for the running max: fully masked tiles never give inf - inf
MIN_DOT = tl.constexpr(16)  # tl.dot needs every tile dim >= 16
MAX_HEAD_DIM = 256  # largest head dim the tiles are sized for (one [BLOCK, D] tile per operand)
BIAS_PAD = 256  # varlen bias table margin beyond max_seqlen: >= every BLOCK_M / BLOCK_N (ragged tile ends)
AUTOTUNE_ENV = "ENCDEC_AUTOTUNE"  # "0": varlen_attention takes the first candidate config, no benchmarking

# Tiles used on CPU tensors (Triton interpreter). Small, so tests on small shapes cover the
# multi-tile paths; tests may patch these dicts.
INTERPRET_VARLEN_TILES = {"BLOCK_M": 16, "BLOCK_N": 16}
INTERPRET_PAGED_TILES = {"BLOCK_N": 16}

# Split-KV (flash-decoding) heuristic, see _num_kv_splits.
SPLIT_PROGRAMS_PER_SM = 4  # split until ~4 programs per SM run: batch-1 Whisper cross = 24 splits x 20 heads
SPLIT_MAX = 64  # at most 64 splits (the merge reads all partials of a row as one tile)
# One query per sequence (plain decode): True = pad the query tile to 16 rows and use tl.dot
# (tensor cores, K/V loads pipelined through shared memory with cp.async; measured faster on an
# H100: cross b256 k=1 96% vs 90% of copy bandwidth); False = broadcast-multiply in registers.
SINGLE_QUERY_DOT = True
# varlen_attention takes the Hopper kernel (encdec_kernels/flash_hopper.py) from this longest sequence on:
# on T5's 260-440 tokens this module's kernel is faster (0.147 ms against 0.18-0.20 ms: short
# sequences leave the 192-row query tiles partly empty), on Whisper's 1500 that one is.
HOPPER_MIN_SEQLEN = 1024
# shared_kv_attention: (token, head) query rows per program, key rows per tile, and launch shape.
# A program holds BLOCK_R x d_model float32 accumulators (80 registers per thread at d 1280 with 8
# warps), so one or two programs fill an SM: split the keys until about SHARED_SPLIT_PER_SM run.
SHARED_KV_TILES = {"BLOCK_R": 32, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2}
INTERPRET_SHARED_KV_TILES = {"BLOCK_R": 16, "BLOCK_N": 16}
SHARED_SPLIT_PER_SM = 2
SHARED_SPLIT_MAX = 32


# --------------------------------------------------------------------------------------
# Device code. Kept out of ruff format: Triton kernels read better with packed argument lists.
# --------------------------------------------------------------------------------------
# fmt: off


@triton.jit
def _load_rows(ptrs, rows, n_rows, offs_d, MASK_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_D: tl.constexpr):
    """Load a [rows, BLOCK_D] tile; rows >= n_rows (if MASK_ROWS) and padded dims read as 0."""
    # constexpr branches only (no early returns: the compiler would still type-check the rest)
    if MASK_ROWS:
        if BLOCK_D == HEAD_DIM:
            x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        else:
            x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    elif BLOCK_D == HEAD_DIM:
        x = tl.load(ptrs)
    else:
        x = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    return x


@triton.jit
def _scores(q, k, USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """q [BLOCK_M, BLOCK_D] . k [BLOCK_N, BLOCK_D]^T -> [BLOCK_M, BLOCK_N] float32 (unscaled).

    Without USE_DOT (a single query row, BLOCK_M == 1) a broadcast multiply + row sum.
    """
    if USE_DOT:
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    else:
        s = tl.sum(k.to(tl.float32) * q.to(tl.float32), 1)[None, :]
    return s


@triton.jit
def _softmax_update(acc, m_i, l_i, s, exp2_scale, v, USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One online-softmax step. s: [BLOCK_M, BLOCK_N] scores (-inf = masked), s * exp2_scale
    (> 0) in log2 units; m_i, l_i in log2 units; v [BLOCK_N, BLOCK_D]. Returns (acc, m_i, l_i)."""
    m_new = tl.maximum(m_i, tl.max(s, 1) * exp2_scale)
    p = tl.math.exp2(tl.fma(s, exp2_scale, -m_new[:, None]))  # scale folded into the max subtraction
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if USE_DOT:
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    else:
        BLOCK_N: tl.constexpr = v.shape[0]
        acc += tl.sum(tl.reshape(p, (BLOCK_N, 1)) * v.to(tl.float32), 0)[None, :]
    return acc, m_new, l_i


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
def _bucket_bias(table_row, lut_center, q_pos, k_pos, max_dist):
    """T5 bias [len(q_pos), len(k_pos)] = table_row[bucket(k - q)]: lut_center[d] is the bucket
    of distance d for |d| <= max_dist; buckets saturate beyond, so the distance is clamped."""
    rel = tl.minimum(tl.maximum(k_pos[None, :] - q_pos[:, None], -max_dist), max_dist)
    return tl.load(table_row + tl.load(lut_center + rel))


# -- varlen (encoder / prefill) attention ------------------------------------------------------


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
        k = _load_rows(k_ptrs + start_n * stride_kt, cols, seq_len, offs_d, MASKED, HEAD_DIM, BLOCK_D)
        s = _scores(q, k, True, DOT_PRECISION)
        if HAS_BIAS:  # natural units: scale * q.k + bias (exp2_scale is then LOG2E)
            s = tl.fma(s, scale, _pair_bias(pairs_center, offs_m, start_n, BLOCK_N, GATHER_ASM))
        if MASKED:
            keep = cols[None, :] < seq_len
            if IS_CAUSAL:
                keep = keep & (cols[None, :] <= offs_m[:, None])
            s = tl.where(keep, s, float("-inf"))
        v = _load_rows(v_ptrs + start_n * stride_vt, cols, seq_len, offs_d, MASKED, HEAD_DIM, BLOCK_D)
        acc, m_i, l_i = _softmax_update(acc, m_i, l_i, s, exp2_scale, v, True, DOT_PRECISION)
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
    q = _load_rows(q_ptrs, offs_m, seq_len, offs_d, True, HEAD_DIM, BLOCK_D)
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


# -- paged decode attention (self: causal, cross: not) + split-KV merge ------------------------


@triton.jit
def _paged_tiles(acc, m_i, l_i, q, k_base, v_base, bt_row, stride_kb, stride_ks, stride_vb, stride_vs,
                 table_row, lut_center, max_dist, q_pos, bias_q_pos, seq_len, lo, hi, scale, exp2_scale,
                 MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr,
                 USE_DOT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_N: tl.constexpr, CACHE_BLOCK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Key tiles [lo, hi) of one query tile, keys gathered through the block table."""
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
        k = _load_rows(k_ptrs, cols, seq_len, offs_d, MASKED, HEAD_DIM, BLOCK_D)
        s = _scores(q, k, USE_DOT, DOT_PRECISION)
        if HAS_BIAS:  # natural units: scale * q.k + bias (exp2_scale is then LOG2E)
            s = tl.fma(s, scale, _bucket_bias(table_row, lut_center, bias_q_pos, cols, max_dist))
        if MASKED:
            keep = cols[None, :] < seq_len
            if IS_CAUSAL:
                keep = keep & (cols[None, :] <= q_pos[:, None])
            s = tl.where(keep, s, float("-inf"))
        v_ptrs = v_base + (blk * stride_vb + slot * stride_vs)[:, None] + offs_d[None, :]
        v = _load_rows(v_ptrs, cols, seq_len, offs_d, MASKED, HEAD_DIM, BLOCK_D)
        acc, m_i, l_i = _softmax_update(acc, m_i, l_i, s, exp2_scale, v, USE_DOT, DOT_PRECISION)
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["num_q_tiles", "num_splits"])
def _paged_attn_kernel(
    Q, K_CACHE, V_CACHE, Out, BLOCK_TABLES, SEQ_LENS, CU_SEQLENS_Q,
    TABLE, LUT,  # T5 bias: RelBias.table [H, NBK] float32, bucket of each distance [2 * max_dist + 1] int32
    O_PART, LSE_PART,  # split partials [Tq, H, S, BLOCK_D] / [Tq, H, S] float32 (only if IS_SPLIT)
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_bt, stride_table_h,
    num_heads, num_q_tiles, num_splits, max_dist, scale, exp2_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    CACHE_BLOCK: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, SINGLE_QUERY: tl.constexpr,
    IS_SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr, PDL: tl.constexpr,
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
    q = _load_rows(q_ptrs, offs_q, q_len, offs_d, True, HEAD_DIM, BLOCK_D)
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
    # This split's share of [0, hi): whole tiles, the last split takes the ragged end.
    chunk = tl.cdiv(tl.cdiv(hi, num_splits), BLOCK_N) * BLOCK_N
    lo_s = tl.minimum(split * chunk, hi)
    hi_s = tl.minimum(lo_s + chunk, hi)
    mid_s = tl.maximum(lo_s, tl.minimum(hi_s, full_hi))

    k_base = K_CACHE + off_h * stride_kh
    v_base = V_CACHE + off_h * stride_vh
    bt_row = BLOCK_TABLES + off_b.to(tl.int64) * stride_bt
    table_row = TABLE + off_h * stride_table_h
    lut_center = LUT + max_dist
    m_i = tl.full([BLOCK_Q], NEG_INIT, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_Q], dtype=tl.float32)
    acc = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32)
    acc, m_i, l_i = _paged_tiles(acc, m_i, l_i, q, k_base, v_base, bt_row, stride_kb, stride_ks, stride_vb,
                                 stride_vs, table_row, lut_center, max_dist, q_pos, bias_q_pos, seq_len,
                                 lo_s, mid_s, scale, exp2_scale, False, IS_CAUSAL, HAS_BIAS, USE_DOT,
                                 HEAD_DIM, BLOCK_D, BLOCK_N, CACHE_BLOCK, DOT_PRECISION)
    acc, m_i, l_i = _paged_tiles(acc, m_i, l_i, q, k_base, v_base, bt_row, stride_kb, stride_ks, stride_vb,
                                 stride_vs, table_row, lut_center, max_dist, q_pos, bias_q_pos, seq_len,
                                 mid_s, hi_s, scale, exp2_scale, True, IS_CAUSAL, HAS_BIAS, USE_DOT,
                                 HEAD_DIM, BLOCK_D, BLOCK_N, CACHE_BLOCK, DOT_PRECISION)

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


@triton.jit(do_not_specialize=["num_splits"])
def _merge_splits_kernel(O_PART, LSE_PART, Out, stride_ot, stride_oh, num_heads, num_splits, part_stride,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
                         PDL: tl.constexpr):
    """Merge the S = num_splits <= BLOCK_S partial results of one (token, head), columns
    [BLOCK_D * axis 1, + BLOCK_D): weights exp2(lse_s - max lse). A partial row holds part_stride
    floats."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    pid = tl.program_id(0).to(tl.int64)  # = token * H + head
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    s_mask = offs_s < num_splits
    d_mask = offs_d < HEAD_DIM
    lse = tl.load(LSE_PART + pid * num_splits + offs_s, mask=s_mask, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # no keys at all: every weight is 0, output 0
    w = tl.math.exp2(lse - m)
    parts = tl.load(O_PART + (pid * num_splits + offs_s)[:, None] * part_stride + offs_d[None, :],
                    mask=s_mask[:, None] & d_mask[None, :], other=0.0)
    denom = tl.sum(w, 0)
    out = tl.sum(parts * w[:, None], 0) / tl.where(denom > 0.0, denom, 1.0)
    token = pid // num_heads
    head = pid % num_heads
    tl.store(Out + token * stride_ot + head * stride_oh + offs_d, out.to(Out.dtype.element_ty), mask=d_mask)


# -- shared-K/V attention (absorbed cross-attention) --------------------------------------------


@triton.jit(do_not_specialize=["num_groups", "num_splits"])
def _shared_kv_kernel(
    Q, ROWS, Out, BLOCK_TABLES, SEQ_LENS, CU_SEQLENS_Q, O_PART, LSE_PART,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_rc, stride_rb, stride_rr, stride_bt,
    num_heads, num_groups, num_splits, exp2_scale,
    D_MODEL: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    ROWS_PER_CHUNK: tl.constexpr, ROWS_PER_BLOCK: tl.constexpr, IS_SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """BLOCK_R (token, head) query rows of one sequence against its key rows [lo, hi) of this
    split; a key row is its value row too. Columns [0, D0) and [D0, D0 + D1) are two tiles (d_model
    need not be a power of two: 1280 = 1024 + 256). (Computing s^T = e q^T and o^T = e^T p^T
    instead was no faster in any config swept on an H100; encdec_kernels/shared_kv_hopper.py is the fast
    path on Hopper.)"""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    group = pid % num_groups
    off_b = pid // num_groups
    q_start = tl.load(CU_SEQLENS_Q + off_b)
    n_rows = (tl.load(CU_SEQLENS_Q + off_b + 1) - q_start) * num_heads
    r0 = group * BLOCK_R
    if r0 >= n_rows:
        return
    seq_len = tl.load(SEQ_LENS + off_b)
    offs_r = r0 + tl.arange(0, BLOCK_R)
    row_ok = offs_r < n_rows
    tok = (q_start + offs_r // num_heads).to(tl.int64)
    head = offs_r % num_heads
    q_rows = Q + tok * stride_qt + head * stride_qh
    offs_0 = tl.arange(0, D0)
    offs_1 = D0 + tl.arange(0, D1 if D1 > 0 else 16)
    d1_ok = offs_1 < D_MODEL
    q0 = tl.load(q_rows[:, None] + offs_0[None, :], mask=row_ok[:, None], other=0.0)  # [R, D0]
    acc0 = tl.zeros([BLOCK_R, D0], dtype=tl.float32)
    if D1 > 0:
        q1 = tl.load(q_rows[:, None] + offs_1[None, :], mask=row_ok[:, None] & d1_ok[None, :], other=0.0)
        acc1 = tl.zeros([BLOCK_R, D1], dtype=tl.float32)

    chunk = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    lo = tl.minimum(split * chunk, seq_len)
    hi = tl.minimum(lo + chunk, seq_len)
    bt_row = BLOCK_TABLES + off_b.to(tl.int64) * stride_bt
    offs_n = tl.arange(0, BLOCK_N)
    m_i = tl.full([BLOCK_R], NEG_INIT, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < hi
        blk = tl.load(bt_row + cols // ROWS_PER_BLOCK, mask=col_ok, other=0).to(tl.int64)
        r = cols % ROWS_PER_BLOCK
        key_rows = ROWS + (r // ROWS_PER_CHUNK).to(tl.int64) * stride_rc + blk * stride_rb
        key_rows += (r % ROWS_PER_CHUNK) * stride_rr
        e0 = tl.load(key_rows[:, None] + offs_0[None, :], mask=col_ok[:, None], other=0.0)  # [N, D0]
        if D1 > 0:
            e1 = tl.load(key_rows[:, None] + offs_1[None, :], mask=col_ok[:, None] & d1_ok[None, :],
                         other=0.0)
        s = tl.dot(q0, tl.trans(e0), input_precision=DOT_PRECISION)  # [R, N]
        if D1 > 0:
            s = tl.dot(q1, tl.trans(e1), s, input_precision=DOT_PRECISION)
        s = tl.where(col_ok[None, :], s * exp2_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc0 = tl.dot(p.to(e0.dtype), e0, acc0 * alpha[:, None], input_precision=DOT_PRECISION)
        if D1 > 0:
            acc1 = tl.dot(p.to(e1.dtype), e1, acc1 * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    has_keys = l_i > 0.0
    inv_l = 1.0 / tl.where(has_keys, l_i, 1.0)
    out0 = acc0 * inv_l[:, None]
    if D1 > 0:
        out1 = acc1 * inv_l[:, None]
    if not IS_SPLIT:
        o_rows = Out + tok * stride_ot + head * stride_oh
        tl.store(o_rows[:, None] + offs_0[None, :], out0.to(Out.dtype.element_ty), mask=row_ok[:, None])
        if D1 > 0:
            tl.store(o_rows[:, None] + offs_1[None, :], out1.to(Out.dtype.element_ty),
                     mask=row_ok[:, None] & d1_ok[None, :])
    else:
        lse = tl.where(has_keys, m_i + tl.math.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        part_row = (tok * num_heads + head) * num_splits + split  # [Tq, H, S] flat index
        tl.store(LSE_PART + part_row, lse, mask=row_ok)
        tl.store(O_PART + part_row[:, None] * D_MODEL + offs_0[None, :], out0, mask=row_ok[:, None])
        if D1 > 0:
            tl.store(O_PART + part_row[:, None] * D_MODEL + offs_1[None, :], out1,
                     mask=row_ok[:, None] & d1_ok[None, :])


# -- KV store ----------------------------------------------------------------------------------


@triton.jit
def _store_kv_kernel(K, V, K_CACHE, V_CACHE, SLOTS, stride_kt, stride_kh, stride_vt, stride_vh, num_heads,
                     HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr):
    """One program per token: copy its [H, D] K and V rows into cache slot SLOTS[t] (-1 = skip)."""
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
    tl.store(K_CACHE + dst, k.to(K_CACHE.dtype.element_ty), mask=mask)
    tl.store(V_CACHE + dst, v.to(V_CACHE.dtype.element_ty), mask=mask)


@triton.jit
def _store_rows_kernel(X, ROWS, SLOTS, stride_xt, stride_rb, stride_rr, rows_per_chunk,
                       D: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr):
    """One program per row: copy X[t] into row slot % RC of chunk slot // RC (-1 = skip)."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(SLOTS + t)
    if slot < 0:
        return
    dst = ROWS + (slot // rows_per_chunk) * stride_rb + (slot % rows_per_chunk) * stride_rr
    for d0 in range(0, D, BLOCK_D):
        offs = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(X + t * stride_xt + offs, mask=offs < D)
        tl.store(dst + offs, x.to(ROWS.dtype.element_ty), mask=offs < D)


# fmt: on


# --------------------------------------------------------------------------------------
# varlen tile configs
# --------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------


def _check_head_dim(d):
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head dim {d} not supported: must be in 1..{MAX_HEAD_DIM}")


def _block_d(d):
    return max(MIN_DOT.value, triton.next_power_of_2(d))


def _dot_precision(dtype):
    # float32 inputs: exact fp32 products ("ieee"), not TF32; 16-bit inputs ignore it.
    return "ieee" if dtype == torch.float32 else "tf32"


def _check_rel_bias(rel_bias: RelBias | None, num_heads: int, device: torch.device) -> None:
    if rel_bias is None:
        return
    if not isinstance(rel_bias, RelBias):
        raise ValueError(f"rel_bias must be a encdec_kernels.RelBias, got {type(rel_bias).__name__}")
    table = rel_bias.table
    check_tensor("rel_bias.table", table, 2, dtypes=(torch.float32,), device=device)
    if table.shape != (num_heads, rel_bias.num_buckets):
        raise ValueError(
            f"rel_bias.table must be [H={num_heads}, num_buckets={rel_bias.num_buckets}], "
            f"got {tuple(table.shape)}"
        )
    half = rel_bias.num_buckets // 2 if rel_bias.bidirectional else rel_bias.num_buckets
    if half < 2 or rel_bias.max_distance <= half // 2:
        raise ValueError(
            f"rel_bias needs num_buckets >= {4 if rel_bias.bidirectional else 2} and max_distance > "
            f"num_buckets{' // 2' if rel_bias.bidirectional else ''} // 2 (the exact range), got "
            f"num_buckets={rel_bias.num_buckets}, max_distance={rel_bias.max_distance}"
        )


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


def _check_index(name, t, ndim, device):
    if not isinstance(t, torch.Tensor) or t.dim() != ndim or t.dtype != torch.int32:
        desc = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a {ndim}-dim int32 tensor, got {desc}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but q is on {device}; move all inputs to one device")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous; call .contiguous() on it")


def _check_tables(block_tables, seq_lens, cu_seqlens_q, max_seqlen_q, device):
    """The paged launchers' sequence tables: [B, max_blocks], [B] and [B+1] int32 on q's device,
    max_seqlen_q a Python int (reading it from the device would sync)."""
    _check_index("block_tables", block_tables, 2, device)
    _check_index("seq_lens", seq_lens, 1, device)
    _check_index("cu_seqlens_q", cu_seqlens_q, 1, device)
    num_seqs = block_tables.shape[0]
    if seq_lens.shape[0] != num_seqs or cu_seqlens_q.shape[0] != num_seqs + 1:
        raise ValueError(
            f"block_tables [B={num_seqs}, ...] needs seq_lens [B] and cu_seqlens_q [B+1], got "
            f"{tuple(seq_lens.shape)} and {tuple(cu_seqlens_q.shape)}"
        )
    if isinstance(max_seqlen_q, torch.Tensor) or not isinstance(max_seqlen_q, int) or max_seqlen_q < 0:
        raise ValueError(f"max_seqlen_q must be a python int >= 0 (no device sync), got {max_seqlen_q!r}")


def _check_scale(scale):
    if isinstance(scale, torch.Tensor) or not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise ValueError(f"scale must be a python float (no device sync), got {type(scale).__name__}")
    if not scale > 0:
        raise ValueError(f"scale must be > 0 (it is folded into the softmax max), got {scale!r}")


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
    _check_index("cu_seqlens", cu_seqlens, 1, q.device)
    if cu_seqlens.numel() < 1:
        raise ValueError("cu_seqlens must have B + 1 >= 1 entries")
    if isinstance(max_seqlen, torch.Tensor) or not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise ValueError(f"max_seqlen must be a python int >= 0 (no device sync), got {max_seqlen!r}")
    _check_scale(scale)
    _check_head_dim(q.shape[2])
    _check_rel_bias(rel_bias, q.shape[1], q.device)
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
    block_d = _block_d(d)
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
        DOT_PRECISION=_dot_precision(q.dtype), **meta,
    )
    # fmt: on
    return out


@functools.lru_cache(maxsize=8)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: pretend a tiny GPU so small test shapes also take the split path
    return torch.cuda.get_device_properties(device).multi_processor_count


def _num_kv_splits(
    programs: int,
    max_keys: int,
    block_n: int,
    device: torch.device,
    per_sm: int = SPLIT_PROGRAMS_PER_SM,
    max_splits: int = SPLIT_MAX,
) -> int:
    """Key splits per (query tile, head, sequence), from static shapes only (CUDA-graph safe).

    programs: B * H * query tiles; max_keys: block_tables.shape[1] * block_size (the capacity,
    not the actual lengths). Split while fewer than SPLIT_PROGRAMS_PER_SM programs per SM would
    run, into at most one split per key tile and SPLIT_MAX splits, every split the same number
    of whole tiles (a full-length sequence leaves no split empty).
    """
    target = per_sm * _sm_count(device)
    if programs >= target:
        return 1
    tiles = max(1, triton.cdiv(max_keys, block_n))
    splits = max(1, min(triton.cdiv(target, programs), tiles, max_splits))
    return triton.cdiv(tiles, triton.cdiv(tiles, splits))


def _paged_block_n(block_d: int) -> int:
    # 64 keys per tile: [64, D] K and V tiles keep 16 KB (D = 64, bf16) in flight per program;
    # halve for D > 128 so the fp32 products stay in registers.
    return 64 if block_d <= 128 else 32


def paged_attention(
    q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, max_seqlen_q, *, scale, causal, rel_bias=None
):
    """Decoder attention over a paged cache: 1..k query tokens per sequence.

    q: [Tq, H, D] packed (any token/head strides, last dim contiguous); sequence b owns
    q[cu_seqlens_q[b]:cu_seqlens_q[b+1]]. k_cache, v_cache: [NB, BS, H, D] contiguous, BS a
    power of two; block_tables: [B, max_blocks] int32; seq_lens: [B] int32 = number of keys of
    sequence b (already including the new tokens for self-attention), at most max_blocks * BS;
    cu_seqlens_q: [B+1] int32; max_seqlen_q: python int >= every query count.
    causal=True (self-attention): the i-th of q_len queries sits at position seq_len - q_len + i
    and sees keys at positions <= its own. causal=False (cross-attention): all seq_len keys.
    rel_bias: T5 bias on key_pos - query_pos. scale: python float > 0. Returns a new [Tq, H, D]
    tensor. No host sync: safe inside CUDA-graph capture after one warm-up call per
    configuration (compiles the kernels, caches the T5 bucket table).
    """
    check_tensor("q", q, 3)
    check_tensor("k_cache", k_cache, 4, device=q.device, contiguous=True)
    check_tensor("v_cache", v_cache, 4, device=q.device, contiguous=True)
    h, d = q.shape[1:]
    if k_cache.shape != v_cache.shape or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(
            f"k_cache and v_cache must share shape and q's dtype {q.dtype}, got "
            f"{tuple(k_cache.shape)} {k_cache.dtype} and {tuple(v_cache.shape)} {v_cache.dtype}"
        )
    if tuple(k_cache.shape[2:]) != (h, d):
        raise ValueError(f"cache heads/head dim {tuple(k_cache.shape[2:])} do not match q's {(h, d)}")
    bs = k_cache.shape[1]
    if bs < 1 or bs & (bs - 1):
        raise ValueError(f"cache block size must be a power of two, got {bs}")
    _check_head_dim(d)
    _check_tables(block_tables, seq_lens, cu_seqlens_q, max_seqlen_q, q.device)
    _check_scale(scale)
    _check_rel_bias(rel_bias, h, q.device)
    return _launch_paged(
        q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, max_seqlen_q, scale, causal, rel_bias
    )


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
):
    """paged_attention without the input checks; num_splits, block_n, num_warps, num_stages
    override the built-in choices (tests and benchmarks)."""
    tq, h, d = q.shape
    out = torch.empty((tq, h, d), device=q.device, dtype=q.dtype)
    num_seqs = block_tables.shape[0]
    if tq == 0 or num_seqs == 0 or max_seqlen_q == 0:
        return out
    if rel_bias is None:
        table = lut = torch.empty((1, 1), device=q.device, dtype=torch.float32)  # never read
        max_dist = 0
    else:
        table, max_dist = rel_bias.table, rel_bias.max_distance
        lut = _bucket_lut(rel_bias.num_buckets, max_dist, bool(rel_bias.bidirectional), q.device)
    block_d = _block_d(d)
    # A tl.dot-able query tile of 16..64 rows; one query row: 16 (SINGLE_QUERY_DOT) or 1 (the
    # broadcast-multiply path).
    block_q = min(64, max(MIN_DOT.value, triton.next_power_of_2(max_seqlen_q)))
    if max_seqlen_q == 1 and not SINGLE_QUERY_DOT:
        block_q = 1
    # Launch shape, measured on an H100 (benchmarks/sweep_kernels.py, batch 256, head dim 64): for
    # query tiles of <= 16 rows, 2 warps and 2 stages beat 4 warps / 3 stages (self decode 81% vs
    # 71% of copy bandwidth, T5 self decode with bias 76% vs 56%, cross 97% vs 95%); larger tiles
    # (k > 16 queries) keep 4 warps / 3 stages.
    num_q_tiles = triton.cdiv(max_seqlen_q, block_q)
    if block_n is None:
        block_n = _paged_block_n(block_d) if q.is_cuda else INTERPRET_PAGED_TILES["BLOCK_N"]
    if num_splits is None:
        num_splits = _num_kv_splits(
            num_seqs * h * num_q_tiles, block_tables.shape[1] * k_cache.shape[1], block_n, q.device
        )
    if num_splits > 1:
        o_part = torch.empty((tq, h, num_splits, block_d), device=q.device, dtype=torch.float32)
        lse_part = torch.empty((tq, h, num_splits), device=q.device, dtype=torch.float32)
    else:
        o_part = lse_part = out  # unused
    has_bias = rel_bias is not None
    # fmt: off
    _paged_attn_kernel[(num_q_tiles * h * num_seqs, num_splits)](
        q, k_cache, v_cache, out, block_tables, seq_lens, cu_seqlens_q, table, lut, o_part, lse_part,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), table.stride(0),
        h, num_q_tiles, num_splits, max_dist, float(scale),
        LOG2E if has_bias else float(scale) * LOG2E,  # exp2_scale: with bias the scores are scaled first
        HEAD_DIM=d, BLOCK_D=block_d, BLOCK_Q=block_q, BLOCK_N=block_n, CACHE_BLOCK=k_cache.shape[1],
        IS_CAUSAL=bool(causal), HAS_BIAS=has_bias, SINGLE_QUERY=max_seqlen_q == 1 and has_bias,
        IS_SPLIT=num_splits > 1, DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=num_warps or (2 if block_q <= MIN_DOT.value else 4),
        num_stages=num_stages or (2 if block_q <= MIN_DOT.value else 3),  # prefetch depth of the K/V loads
        **pdl_launch(q),
    )
    if num_splits > 1:
        _merge_splits_kernel[(tq * h, 1)](
            o_part, lse_part, out, out.stride(0), out.stride(1), h, num_splits, block_d,
            HEAD_DIM=d, BLOCK_D=block_d, BLOCK_S=max(16, triton.next_power_of_2(num_splits)),  # few compiles
            num_warps=1 if block_d <= 64 else 2,  # one (token, head) row of D floats per program
            **pdl_launch(q),
        )
    # fmt: on
    return out


def _split_d(d: int) -> tuple[int, int]:
    """d_model as two power-of-two column tiles (D0, D1): the largest power of two <= d, and the
    rest rounded up (0 if none; at least 16, the smallest tl.dot reduction)."""
    d0 = 1 << (d.bit_length() - 1)
    rest = d - d0
    return d0, (max(16, triton.next_power_of_2(rest)) if rest else 0)


def shared_kv_attention(q, rows, block_tables, seq_lens, cu_seqlens_q, max_seqlen_q, *, scale):
    """Attention of H query heads over one key head per sequence whose keys are also its values:
    softmax(scale * q . r) . r over the sequence's rows r. This is cross-attention with the K and V
    projections absorbed into the query and the output (see ``encdec_models.layers.Attention.cross``):
    the rows are the encoder output itself, d_model wide, shared by every head and layer.

    q: [Tq, H, d] packed (any token/head strides, last dim contiguous); sequence b owns
    q[cu_seqlens_q[b]:cu_seqlens_q[b+1]]. rows: [C, NB, RC, d] (any strides but a contiguous last
    dim); block n of a sequence's block table holds its rows n*C*RC + r at rows[r // RC, block,
    r % RC], r < C * RC. block_tables: [B, max_blocks] int32; seq_lens: [B] int32 rows of sequence b.
    Returns [Tq, H, d]: a view of a new head-major [H, Tq, d] tensor (``.transpose(0, 1)`` of
    it is contiguous). No host sync: CUDA-graph safe.

    On Hopper, fp16/bf16 q laid out as the layer makes it (a view of [H, Tq, d]) goes to
    ``encdec_kernels/shared_kv_hopper.py``, which loads whole 64-row tiles: the rows after a sequence's
    last one, to the end of its tile, must be finite (the engine writes zeros there).
    """
    check_tensor("q", q, 3)
    check_tensor("rows", rows, 4, device=q.device)
    if rows.dtype != q.dtype:
        raise ValueError(f"rows must have q's dtype {q.dtype}, got {rows.dtype}")
    h, d = q.shape[1:]
    if rows.shape[3] != d:
        raise ValueError(f"rows are {rows.shape[3]} wide but q's rows are {d}")
    if d < 16:
        raise ValueError(f"row width must be >= 16, got {d}")
    _check_tables(block_tables, seq_lens, cu_seqlens_q, max_seqlen_q, q.device)
    _check_scale(scale)
    return _launch_shared_kv(q, rows, block_tables, seq_lens, cu_seqlens_q, max_seqlen_q, scale)


def _launch_shared_kv(
    q,
    rows,
    block_tables,
    seq_lens,
    cu_seqlens_q,
    max_seqlen_q,
    scale,
    num_splits=None,
    tiles=None,
    hopper=True,
):
    """shared_kv_attention without the input checks; num_splits and tiles (SHARED_KV_TILES keys)
    override the built-in choices (tests and benchmarks). Decode steps on Hopper (one query token
    per sequence) take ``encdec_kernels/shared_kv_hopper.py`` unless ``hopper`` is False or tiles are
    given."""
    tq, h, d = q.shape
    num_seqs = block_tables.shape[0]
    if hopper and tiles is None and q.is_cuda and tq > 0 and num_seqs > 0:
        from encdec_kernels import shared_kv_hopper  # Gluon: imported only when a CUDA step can use it

        if shared_kv_hopper.supports(q, rows):
            if not (max_seqlen_q == 1 and tq == num_seqs):  # prompts, beams: one row per query token
                seq_of = torch.repeat_interleave(
                    torch.arange(num_seqs, device=q.device), cu_seqlens_q.diff(), output_size=tq
                )
                block_tables, seq_lens = block_tables[seq_of], seq_lens[seq_of]
            out = shared_kv_hopper.shared_kv_attention(q, rows, block_tables, seq_lens, scale, num_splits)
            if out is not None:
                return out
    out = torch.empty((h, tq, d), device=q.device, dtype=q.dtype).transpose(0, 1)
    if tq == 0 or num_seqs == 0 or max_seqlen_q == 0:
        return out
    cfg = dict(SHARED_KV_TILES if q.is_cuda else INTERPRET_SHARED_KV_TILES)
    cfg.update(tiles or {})
    block_r, block_n = cfg.pop("BLOCK_R"), cfg.pop("BLOCK_N")
    num_groups = triton.cdiv(max_seqlen_q * h, block_r)
    rows_per_block = rows.shape[0] * rows.shape[2]
    if num_splits is None:
        num_splits = _num_kv_splits(
            num_seqs * num_groups, block_tables.shape[1] * rows_per_block, block_n, q.device,
            SHARED_SPLIT_PER_SM, SHARED_SPLIT_MAX,
        )  # fmt: skip
    if num_splits > 1:
        o_part = torch.empty((tq, h, num_splits, d), device=q.device, dtype=torch.float32)
        lse_part = torch.empty((tq, h, num_splits), device=q.device, dtype=torch.float32)
    else:
        o_part = lse_part = out  # unused
    d0, d1 = _split_d(d)
    # fmt: off
    _shared_kv_kernel[(num_seqs * num_groups, num_splits)](
        q, rows, out, block_tables, seq_lens, cu_seqlens_q, o_part, lse_part,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        rows.stride(0), rows.stride(1), rows.stride(2), block_tables.stride(0),
        h, num_groups, num_splits, float(scale) * LOG2E,
        D_MODEL=d, D0=d0, D1=d1, BLOCK_R=block_r, BLOCK_N=block_n, ROWS_PER_CHUNK=rows.shape[2],
        ROWS_PER_BLOCK=rows_per_block, IS_SPLIT=num_splits > 1, DOT_PRECISION=_dot_precision(q.dtype), **cfg,
    )
    # fmt: on
    if num_splits > 1:
        merge_rows(o_part, lse_part, out)
    return out


def merge_rows(o_part, lse_part, out):
    """Merge split partial results of d-wide rows (shared_kv_attention's): o_part [Tq, H, S, d]
    float32, lse_part [Tq, H, S] (log2 of each split's softmax sum) -> out [Tq, H, d]."""
    tq, h, num_splits, d = o_part.shape
    merge_d = min(256, triton.next_power_of_2(d))
    _merge_splits_kernel[(tq * h, triton.cdiv(d, merge_d))](
        o_part, lse_part, out, out.stride(0), out.stride(1), h, num_splits, d,
        HEAD_DIM=d, BLOCK_D=merge_d, BLOCK_S=max(16, triton.next_power_of_2(num_splits)),
        num_warps=4, **pdl_launch(out),
    )  # fmt: skip


def store_rows(x, rows, slot_mapping):
    """Write rows x [N, d] (last dim contiguous) into a row cache rows [C, NB, RC, d] (any
    strides but a contiguous last dim, C and NB mergeable): slot = (c * NB + block) * RC + r puts
    x[i] at rows[c, block, r]; -1 = skip. Values are cast to the cache dtype."""
    check_tensor("x", x, 2)
    check_tensor("rows", rows, 4, device=x.device, first="x")
    if rows.shape[3] != x.shape[1] or rows.stride(0) != rows.shape[1] * rows.stride(1):
        raise ValueError(f"rows must be [C, NB, RC, d={x.shape[1]}] with C and NB mergeable")
    if (
        not isinstance(slot_mapping, torch.Tensor)
        or slot_mapping.dtype != torch.int64
        or slot_mapping.shape != (x.shape[0],)
        or not slot_mapping.is_contiguous()
        or slot_mapping.device != x.device
    ):
        raise ValueError(f"slot_mapping must be a contiguous int64 tensor [N={x.shape[0]}] on {x.device}")
    if x.shape[0] == 0:
        return
    _store_rows_kernel[(x.shape[0],)](
        x, rows, slot_mapping, x.stride(0), rows.stride(1), rows.stride(2), rows.shape[2],
        D=x.shape[1], BLOCK_D=min(1024, triton.next_power_of_2(x.shape[1])), num_warps=4, **pdl_launch(x),
    )  # fmt: skip


def store_kv(k, v, k_cache, v_cache, slot_mapping):
    """Write new K/V rows into cache slots (in place).

    k, v: [N, H, D] (any token/head strides, last dim contiguous); k_cache, v_cache:
    [NB, BS, H, D] contiguous; slot_mapping: [N] int64, slot = block * BS + offset, -1 = skip.
    Values are cast to the cache dtype.
    """
    check_tensor("k", k, 3)
    check_tensor("v", v, 3, device=k.device, first="k")
    check_tensor("k_cache", k_cache, 4, device=k.device, contiguous=True, first="k")
    check_tensor("v_cache", v_cache, 4, device=k.device, contiguous=True, first="k")
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
    # fmt: off
    _store_kv_kernel[(n,)](
        k, v, k_cache, v_cache, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1), h,
        HEAD_DIM=d, BLOCK_H=block_h, BLOCK_D=block_d,
        num_warps=max(1, min(8, block_h * block_d // 256)),  # ~256 elements (8 per thread) per warp
        **pdl_launch(k),
    )
    # fmt: on
