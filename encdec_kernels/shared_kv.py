"""Triton shared-K/V attention (absorbed cross-attention, ``shared_kv_attention``) and its row
store (``store_rows``).

Same signatures and semantics as the references in ``encdec_kernels/reference.py`` (the test
oracle). Shapes: Tq = packed query tokens, H = heads, d = row width (d_model), B = sequences,
C = row chunks, NB = cache blocks, RC = rows per chunk, S = KV splits. Softmax and split-KV: see
``common.py``. On Hopper the Gluon kernel of ``shared_kv_hopper.py`` takes the steps it supports.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from encdec_kernels.checks import CACHE_DTYPES, check_scale, check_scales, check_tables, check_tensor
from encdec_kernels.common import FP8_MAX, LOG2E, NEG_INIT, dot_precision, merge_rows, num_kv_splits
from encdec_kernels.pdl import pdl_launch

__all__ = ["shared_kv_attention", "store_rows"]

# (token, head) query rows per program, key rows per tile, and launch shape. A program holds
# BLOCK_R x d_model float32 accumulators (80 registers per thread at d 1280 with 8 warps), so one
# or two programs fill an SM: split the keys until about SHARED_SPLIT_PER_SM run.
SHARED_KV_TILES = {"BLOCK_R": 32, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2}
INTERPRET_SHARED_KV_TILES = {"BLOCK_R": 16, "BLOCK_N": 16}  # CPU tensors (Triton interpreter): small tiles
# fp8 rows convert to q's dtype in registers before each product, which holds the [BLOCK_N, d] tile
# there: half the key rows per tile keep ptxas' spills below the bf16 variant's (sm_90, d 1280;
# tests/kernels/test_fp8_compile.py)
SHARED_KV_TILES_FP8 = {**SHARED_KV_TILES, "BLOCK_N": 16}
SHARED_SPLIT_PER_SM = 2
# "0": calls with several query tokens a sequence (prompts, beams, speculative verification) take
# the Triton kernel, which reads a sequence's rows once per group of its query rows, instead of the
# Hopper kernel, which reads them once per query token (to compare: W1 with speculation, issue 22)
MULTI_QUERY_ENV = "ENCDEC_GLUON_MULTI_QUERY"
SHARED_SPLIT_MAX = 32


# Device code. Kept out of ruff format: Triton kernels read better with packed argument lists.
# fmt: off


@triton.jit(do_not_specialize=["num_groups", "num_splits"])
def _shared_kv_kernel(
    Q, ROWS, Out, BLOCK_TABLES, SEQ_LENS, CU_SEQLENS_Q, O_PART, LSE_PART, ROW_SCALES,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_rc, stride_rb, stride_rr, stride_bt,
    stride_sc, stride_sb, stride_sr,
    num_heads, num_groups, num_splits, exp2_scale,
    D_MODEL: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    ROWS_PER_CHUNK: tl.constexpr, ROWS_PER_BLOCK: tl.constexpr, IS_SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, FP8: tl.constexpr,
):
    """BLOCK_R (token, head) query rows of one sequence against its key rows [lo, hi) of this
    split; a key row is its value row too. Columns [0, D0) and [D0, D0 + D1) are two tiles (d_model
    need not be a power of two: 1280 = 1024 + 256). encdec_kernels/shared_kv_hopper.py is the fast
    path on Hopper. FP8: the rows are e4m3 with a float32 scale per row (ROW_SCALES [C, NB, RC]);
    the tiles convert exactly to q's dtype and a row's scale multiplies its score column (keys)
    and its probability column (values): dequantized without touching the [N, d] tiles."""
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
        if FP8:
            sc = tl.load(ROW_SCALES + (r // ROWS_PER_CHUNK).to(tl.int64) * stride_sc + blk * stride_sb
                         + (r % ROWS_PER_CHUNK) * stride_sr, mask=col_ok, other=0.0)
            e0 = e0.to(q0.dtype)
            if D1 > 0:
                e1 = e1.to(q1.dtype)
        s = tl.dot(q0, tl.trans(e0), input_precision=DOT_PRECISION)  # [R, N]
        if D1 > 0:
            s = tl.dot(q1, tl.trans(e1), s, input_precision=DOT_PRECISION)
        if FP8:
            s = s * sc[None, :]
        s = tl.where(col_ok[None, :], s * exp2_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if FP8:
            p = p * sc[None, :]
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


@triton.jit
def _store_rows_kernel(X, ROWS, SLOTS, ROW_SCALES, stride_xt, stride_rb, stride_rr, stride_sb, stride_sr,
                       rows_per_chunk, D: tl.constexpr, BLOCK_D: tl.constexpr, FP8: tl.constexpr,
                       PDL: tl.constexpr):
    """One program per row: copy X[t] into row slot % RC of chunk slot // RC (-1 = skip). FP8: the
    row is quantized to e4m3 with one scale (max|x| / FP8_MAX, as reference.quantize_rows),
    written to ROW_SCALES at the same slot."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(SLOTS + t)
    if slot < 0:
        return
    dst = ROWS + (slot // rows_per_chunk) * stride_rb + (slot % rows_per_chunk) * stride_rr
    if FP8:
        amax = tl.zeros([BLOCK_D], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs = d0 + tl.arange(0, BLOCK_D)
            x = tl.load(X + t * stride_xt + offs, mask=offs < D, other=0.0)
            amax = tl.maximum(amax, tl.abs(x.to(tl.float32)))
        row_max = tl.max(amax, 0)
        sc = tl.where(row_max > 0.0, row_max / FP8_MAX, 1.0)
        tl.store(ROW_SCALES + (slot // rows_per_chunk) * stride_sb + (slot % rows_per_chunk) * stride_sr, sc)
        for d0 in range(0, D, BLOCK_D):
            offs = d0 + tl.arange(0, BLOCK_D)
            x = tl.load(X + t * stride_xt + offs, mask=offs < D, other=0.0)
            y = tl.clamp(x.to(tl.float32) / sc, -FP8_MAX, FP8_MAX)
            tl.store(dst + offs, y.to(ROWS.dtype.element_ty), mask=offs < D)
    else:
        for d0 in range(0, D, BLOCK_D):
            offs = d0 + tl.arange(0, BLOCK_D)
            x = tl.load(X + t * stride_xt + offs, mask=offs < D)
            tl.store(dst + offs, x.to(ROWS.dtype.element_ty), mask=offs < D)


# fmt: on


def _split_d(d: int) -> tuple[int, int]:
    """d_model as two power-of-two column tiles (D0, D1): the largest power of two <= d, and the
    rest rounded up (0 if none; at least 16, the smallest tl.dot reduction)."""
    d0 = 1 << (d.bit_length() - 1)
    rest = d - d0
    return d0, (max(16, triton.next_power_of_2(rest)) if rest else 0)


def shared_kv_attention(
    q, rows, block_tables, seq_lens, cu_seqlens_q, max_seqlen_q, *, scale, row_scales=None
):
    """Attention of H query heads over one key head per sequence whose keys are also its values:
    softmax(scale * q . r) . r over the sequence's rows r. This is cross-attention with the K and V
    projections absorbed into the query and the output (see ``encdec_models.layers.Attention.cross``):
    the rows are the encoder output itself, d_model wide, shared by every head and layer.

    q: [Tq, H, d] packed (any token/head strides, last dim contiguous); sequence b owns
    q[cu_seqlens_q[b]:cu_seqlens_q[b+1]]. rows: [C, NB, RC, d] (any strides but a contiguous last
    dim); block n of a sequence's block table holds its rows n*C*RC + r at rows[r // RC, block,
    r % RC], r < C * RC. block_tables: [B, max_blocks] int32; seq_lens: [B] int32 rows of sequence b.
    Returns [Tq, H, d]: a view of a new head-major [H, Tq, d] tensor (``.transpose(0, 1)`` of
    it is contiguous). No host sync: CUDA-graph safe. fp8 (e4m3) rows come with row_scales
    [C, NB, RC] float32 (contiguous last dim), one scale per row, read as fp8 * scale.

    On Hopper, fp16/bf16 q laid out as the layer makes it (a view of [H, Tq, d]) goes to
    ``encdec_kernels/shared_kv_hopper.py`` (rows in q's dtype, or fp8 ones with their scales), which
    loads whole ``SHARED_KV_TILE_ROWS``-row tiles: the rows after a sequence's last one, to the end
    of its tile, must be finite (the engine writes zeros there).
    """
    check_tensor("q", q, 3)
    check_tensor("rows", rows, 4, CACHE_DTYPES, device=q.device)
    check_scales(rows, row_scales, "row")
    want = torch.float8_e4m3fn if row_scales is not None else q.dtype
    if rows.dtype != want:
        raise ValueError(f"rows must have the dtype {want}, got {rows.dtype}")
    h, d = q.shape[1:]
    if rows.shape[3] != d:
        raise ValueError(f"rows are {rows.shape[3]} wide but q's rows are {d}")
    if d < 16:
        raise ValueError(f"row width must be >= 16, got {d}")
    check_tables(block_tables, seq_lens, cu_seqlens_q, max_seqlen_q, q.device)
    check_scale(scale)
    return _launch_shared_kv(
        q, rows, block_tables, seq_lens, cu_seqlens_q, max_seqlen_q, scale, row_scales=row_scales
    )


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
    row_scales=None,
):
    """shared_kv_attention without the input checks; num_splits and tiles (SHARED_KV_TILES keys)
    override the built-in choices (tests and benchmarks). On Hopper, ``encdec_kernels/
    shared_kv_hopper.py`` takes the call unless ``hopper`` is False or tiles are given: decode steps
    as they are, calls with several query tokens a sequence with one block-table row per token
    (unless ``ENCDEC_GLUON_MULTI_QUERY=0``)."""
    tq, h, d = q.shape
    num_seqs = block_tables.shape[0]
    multi = not (max_seqlen_q == 1 and tq == num_seqs)  # prompts, beams, verification steps
    if multi and os.environ.get(MULTI_QUERY_ENV, "1") == "0":
        hopper = False
    if hopper and tiles is None and q.is_cuda and tq > 0 and num_seqs > 0:
        from encdec_kernels import shared_kv_hopper  # Gluon: imported only when a CUDA step can use it

        if shared_kv_hopper.supports(q, rows, row_scales):  # bf16/fp16 rows, or fp8 ones with their scales
            if multi:  # one block-table row per query token: each reads its sequence's rows
                seq_of = torch.repeat_interleave(
                    torch.arange(num_seqs, device=q.device), cu_seqlens_q.diff(), output_size=tq
                )
                block_tables, seq_lens = block_tables[seq_of], seq_lens[seq_of]
            out = shared_kv_hopper.shared_kv_attention(
                q, rows, block_tables, seq_lens, scale, num_splits, row_scales
            )
            if out is not None:
                return out
    out = torch.empty((h, tq, d), device=q.device, dtype=q.dtype).transpose(0, 1)
    if tq == 0 or num_seqs == 0 or max_seqlen_q == 0:
        return out
    fp8 = row_scales is not None
    cfg = dict((SHARED_KV_TILES_FP8 if fp8 else SHARED_KV_TILES) if q.is_cuda else INTERPRET_SHARED_KV_TILES)
    cfg.update(tiles or {})
    block_r, block_n = cfg.pop("BLOCK_R"), cfg.pop("BLOCK_N")
    num_groups = triton.cdiv(max_seqlen_q * h, block_r)
    rows_per_block = rows.shape[0] * rows.shape[2]
    if num_splits is None:
        num_splits = num_kv_splits(
            num_seqs * num_groups, block_tables.shape[1] * rows_per_block, block_n, q.device,
            SHARED_SPLIT_PER_SM, SHARED_SPLIT_MAX,
        )  # fmt: skip
    if num_splits > 1:
        o_part = torch.empty((tq, h, num_splits, d), device=q.device, dtype=torch.float32)
        lse_part = torch.empty((tq, h, num_splits), device=q.device, dtype=torch.float32)
    else:
        o_part = lse_part = out  # unused
    d0, d1 = _split_d(d)
    sc_strides = row_scales.stride() if fp8 else (0, 0, 0)
    # fmt: off
    _shared_kv_kernel[(num_seqs * num_groups, num_splits)](
        q, rows, out, block_tables, seq_lens, cu_seqlens_q, o_part, lse_part,
        row_scales if fp8 else seq_lens,  # never read without FP8
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        rows.stride(0), rows.stride(1), rows.stride(2), block_tables.stride(0), *sc_strides,
        h, num_groups, num_splits, float(scale) * LOG2E,
        D_MODEL=d, D0=d0, D1=d1, BLOCK_R=block_r, BLOCK_N=block_n, ROWS_PER_CHUNK=rows.shape[2],
        ROWS_PER_BLOCK=rows_per_block, IS_SPLIT=num_splits > 1, DOT_PRECISION=dot_precision(q.dtype), FP8=fp8,
        **cfg,
    )
    # fmt: on
    if num_splits > 1:
        merge_rows(o_part, lse_part, out)
    return out


def store_rows(x, rows, slot_mapping, row_scales=None):
    """Write rows x [N, d] (last dim contiguous) into a row cache rows [C, NB, RC, d] (any
    strides but a contiguous last dim, C and NB mergeable): slot = (c * NB + block) * RC + r
    puts x[i] at rows[c, block, r]; -1 = skip. Values are cast to the cache dtype; fp8 (e4m3) rows:
    each row quantized with its own scale, written to row_scales [C, NB, RC] float32 (C and NB
    mergeable too)."""
    check_tensor("x", x, 2)
    check_tensor("rows", rows, 4, CACHE_DTYPES, device=x.device, first="x")
    check_scales(rows, row_scales, "row")
    if rows.shape[3] != x.shape[1] or rows.stride(0) != rows.shape[1] * rows.stride(1):
        raise ValueError(f"rows must be [C, NB, RC, d={x.shape[1]}] with C and NB mergeable")
    if row_scales is not None and row_scales.stride(0) != rows.shape[1] * row_scales.stride(1):
        raise ValueError("row_scales must be [C, NB, RC] with C and NB mergeable")
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
    fp8 = row_scales is not None
    sc_strides = (row_scales.stride(1), row_scales.stride(2)) if fp8 else (0, 0)
    _store_rows_kernel[(x.shape[0],)](
        x, rows, slot_mapping, row_scales if fp8 else slot_mapping, x.stride(0), rows.stride(1),
        rows.stride(2),
        *sc_strides, rows.shape[2], D=x.shape[1], BLOCK_D=min(1024, triton.next_power_of_2(x.shape[1])),
        FP8=fp8, num_warps=4, **pdl_launch(x),
    )  # fmt: skip
