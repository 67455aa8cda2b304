"""Encoder attention for Hopper (sm_90), written in Gluon: FlashAttention-3's structure.

The Triton kernel (``varlen._varlen_attn_kernel``) waits for every tensor-core product before
the softmax arithmetic starts (Triton 3.6 puts ``wgmma.wait_group 0`` after each), so the matrix
products, the exponentials and the rest run one after another. Here the work of one CTA is split
by role (``gl.warp_specialize``):

- a producer warp group loads each query tile once and streams the sequence's K/V tiles into a
  ring of shared-memory stages with TMA, signalling mbarriers;
- consumer warp groups (64 query rows each; three at head dim 64) run the online softmax over
  those stages. While one waits on its asynchronous ``warpgroup_mma`` another computes
  exponentials, so the tensor cores and the special-function units stay busy together; each also
  issues its next QK^T before its softmax (``PIPELINE``), so P V runs during the exponentials.

The grid is persistent (one CTA per SM, tiles taken in a fixed stride). Packed variable-length
sequences come through ``cu_seqlens`` as in the Triton kernel: a tile never mixes sequences
(query rows past the sequence end are computed and not stored; key columns past it are masked
in the last key tile only). Non-causal, no bias, head dim 64 or 128, float16/bfloat16;
``varlen.varlen_attention`` takes it from ``varlen.HOPPER_MIN_SEQLEN`` keys on (the Whisper
encoder), importing this module only then (Gluon is a large import). Everything else, and CPU
tensors, stay on Triton. Fails softly (``gluon_support.py``): the Triton kernel serves then.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from encdec_kernels.common import LOG2E, sm_count
from encdec_kernels.gluon_support import AVAILABLE, CompileGuard, compile_sm90, desc_type, ptr_type

if AVAILABLE:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, warpgroup_mma, warpgroup_mma_wait
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from encdec_kernels.gluon_support import mma_layout, shared_layout, tma_load

__all__ = ["AVAILABLE", "supports", "flash_attention"]

_guard = CompileGuard("Hopper encoder attention")
BLOCK_M = 64  # query rows per consumer warp group
Q_STAGES = 2  # query tiles in flight (the next tile's load while the current one drains)
# Per head dim: BLOCK_N keys per K/V stage, K_STAGES stages in the ring, CONSUMERS warp groups of
# BLOCK_M query rows (a CTA's query tile is CONSUMERS * BLOCK_M rows), REGS registers per consumer
# thread (3 x 128 x 160 + the producer's fill the register file), and PIPELINE: issue the next
# tile's QK^T before this tile's softmax (FA3's intra-warpgroup overlap). Chosen with
# `benchmarks/sweep_kernels.py --only hopper` on the Whisper large-v3 shape. Head dim 128 keeps
# 2 consumers: its [64, 128] float32 accumulator needs more than 160 registers.
CONFIGS = {
    64: dict(BLOCK_N=128, K_STAGES=3, CONSUMERS=3, REGS=160, PIPELINE=True),
    128: dict(BLOCK_N=128, K_STAGES=2, CONSUMERS=2, REGS=240, PIPELINE=False),
}
HEAD_DIMS = tuple(CONFIGS)
_BM, _QS = tl.constexpr(BLOCK_M), tl.constexpr(Q_STAGES)  # device-code copies (jit reads constexpr globals)


def supports(q, k, v, causal, rel_bias) -> bool:
    """Whether flash_attention can take these varlen_attention inputs: Hopper, fp16/bf16,
    head dim 64/128, non-causal, no bias, each of q/k/v a [T, H, D] view whose heads sit side by
    side in memory (rows of H * D elements, TMA-aligned)."""
    if not _guard.usable(q.device):
        return False
    if causal or rel_bias is not None or q.dtype not in (torch.float16, torch.bfloat16):
        return False
    t, h, d = q.shape
    if d not in HEAD_DIMS or t >= 2**31:
        return False
    for x in (q, k, v):
        if x.stride(2) != 1 or x.stride(1) != d or (x.stride(0) * x.element_size()) % 16 or x.data_ptr() % 16:
            return False
    return True


# Device code. Kept out of ruff format: Gluon kernels read better with packed argument lists.
# fmt: off
if AVAILABLE:

    @gluon.constexpr_function
    def _p_layout(head_dim):
        """Register layout of the probabilities as the left operand of P @ V."""
        return gl.DotOperandLayout(operand_index=0, parent=mma_layout(head_dim), k_width=2)

    @gluon.jit
    def _tile_coords(tile, CU_SEQLENS, num_heads, m_tiles, BM_TOTAL: gl.constexpr):
        """(first query row, head, sequence start, sequence length) of a query tile: query tiles
        of one (sequence, head) are adjacent, so they share K/V in L2."""
        m0 = (tile % m_tiles) * BM_TOTAL
        bh = tile // m_tiles
        seq = bh // num_heads
        start = gl.load(CU_SEQLENS + seq)
        return m0, bh % num_heads, start, gl.load(CU_SEQLENS + seq + 1) - start

    @gluon.jit
    def _producer(descs, smem, bars, work, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr,
                  K_STAGES: gl.constexpr, CONSUMERS: gl.constexpr):
        desc_q, desc_k, desc_v = descs
        q_bufs, k_bufs, v_bufs = smem
        q_ready, q_empty, kv_ready, kv_empty = bars
        CU_SEQLENS, num_heads, m_tiles, num_tiles = work
        kv_bytes: gl.constexpr = desc_k.block_type.nbytes + desc_v.block_type.nbytes
        qt = 0  # query tiles loaded so far: stage qt % Q_STAGES, phase (qt // Q_STAGES) & 1
        kc = 0  # K/V tiles loaded so far (the ring runs on across query tiles)
        for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
            m0, head, start, seq_len = _tile_coords(tile, CU_SEQLENS, num_heads, m_tiles, CONSUMERS * _BM)
            if m0 < seq_len:
                col = head * HEAD_DIM
                qs = qt % _QS
                mbarrier.wait(q_empty.index(qs), ((qt // _QS) & 1) ^ 1)  # a fresh barrier passes phase 1
                mbarrier.expect(q_ready.index(qs), CONSUMERS * desc_q.block_type.nbytes)
                for c in gl.static_range(CONSUMERS):
                    tma_load(desc_q, [start + m0 + c * _BM, col], q_ready.index(qs),
                                                    q_bufs.index(qs * CONSUMERS + c))
                qt += 1
                for n0 in range(0, seq_len, BLOCK_N):
                    ks = kc % K_STAGES
                    mbarrier.wait(kv_empty.index(ks), ((kc // K_STAGES) & 1) ^ 1)
                    mbarrier.expect(kv_ready.index(ks), kv_bytes)
                    bar = kv_ready.index(ks)
                    tma_load(desc_k, [start + n0, col], bar, k_bufs.index(ks))
                    tma_load(desc_v, [start + n0, col], bar, v_bufs.index(ks))
                    kc += 1

    @gluon.jit
    def _issue_scores(q, k_bufs, kv_ready, kc, BLOCK_N: gl.constexpr, K_STAGES: gl.constexpr):
        """Start S = Q K^T on K/V stage kc (asynchronous: a token for warpgroup_mma_wait)."""
        ks = kc % K_STAGES
        mbarrier.wait(kv_ready.index(ks), (kc // K_STAGES) & 1)
        s = gl.zeros([_BM, BLOCK_N], gl.float32, mma_layout(BLOCK_N))
        return warpgroup_mma(q, k_bufs.index(ks).permute((1, 0)), s, use_acc=False, is_async=True)

    @gluon.jit
    def _softmax(s, m_i, l_i, n0, seq_len, qk_scale, BLOCK_N: gl.constexpr):
        """Online-softmax step on scores s of keys [n0, n0 + BLOCK_N), in log2 units (qk_scale =
        scale * log2 e): (p, alpha, new max, new row sum)."""
        if n0 + BLOCK_N > seq_len:  # the last tile: keys past the sequence end (the next one's, or TMA zeros)
            cols = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, mma_layout(BLOCK_N)))
            s = gl.where(cols[None, :] < seq_len, s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
        p = gl.exp2(s * qk_scale - m_new[:, None])  # one FFMA + one MUFU.EX2 per score
        alpha = gl.exp2(m_i - m_new)
        return p, alpha, m_new, l_i * alpha + gl.sum(p, axis=1)

    @gluon.jit
    def _rescale(acc, alpha, HEAD_DIM: gl.constexpr):
        return acc * gl.convert_layout(alpha, gl.SliceLayout(1, mma_layout(HEAD_DIM)))[:, None]

    @gluon.jit
    def _consumer(smem, bars, work, dest, CONSUMER: gl.constexpr,
                  HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, K_STAGES: gl.constexpr,
                  CONSUMERS: gl.constexpr, PIPELINE: gl.constexpr):
        q_bufs, k_bufs, v_bufs = smem
        q_ready, q_empty, kv_ready, kv_empty = bars
        CU_SEQLENS, num_heads, m_tiles, num_tiles = work
        Out, stride_ot, stride_oh, qk_scale = dest
        s_layout: gl.constexpr = mma_layout(BLOCK_N)
        o_layout: gl.constexpr = mma_layout(HEAD_DIM)
        dtype: gl.constexpr = q_bufs.dtype
        qt = 0
        kc = 0
        for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
            m0, head, start, seq_len = _tile_coords(tile, CU_SEQLENS, num_heads, m_tiles, CONSUMERS * _BM)
            if m0 < seq_len:
                qs = qt % _QS
                mbarrier.wait(q_ready.index(qs), (qt // _QS) & 1)
                q = q_bufs.index(qs * CONSUMERS + CONSUMER)
                m_i = gl.full([_BM], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
                l_i = gl.zeros([_BM], gl.float32, gl.SliceLayout(1, s_layout))
                acc = gl.zeros([_BM, HEAD_DIM], gl.float32, o_layout)
                n_tiles = gl.cdiv(seq_len, BLOCK_N)
                if PIPELINE:
                    # S(j) is computed on the tensor cores while softmax(j-1)'s P(j-1) V(j-1) is issued
                    # behind it: PV(j-1) runs during softmax(j). acc is rescaled once PV(j-1) is done.
                    s = _issue_scores(q, k_bufs, kv_ready, kc, BLOCK_N, K_STAGES)
                    s = warpgroup_mma_wait(0, deps=(s,))
                    p, alpha, m_i, l_i = _softmax(s, m_i, l_i, 0, seq_len, qk_scale, BLOCK_N)
                    p_op = gl.convert_layout(p.to(dtype), _p_layout(HEAD_DIM))
                    for j in range(1, n_tiles):
                        s = _issue_scores(q, k_bufs, kv_ready, kc + 1, BLOCK_N, K_STAGES)
                        acc = warpgroup_mma(p_op, v_bufs.index(kc % K_STAGES), acc, is_async=True)
                        s = warpgroup_mma_wait(1, deps=(s,))  # S(j) done, PV(j-1) may still run
                        p, alpha, m_i, l_i = _softmax(s, m_i, l_i, j * BLOCK_N, seq_len, qk_scale, BLOCK_N)
                        p_op = gl.convert_layout(p.to(dtype), _p_layout(HEAD_DIM))
                        acc = warpgroup_mma_wait(0, deps=(acc,))
                        mbarrier.arrive(kv_empty.index(kc % K_STAGES), count=1)
                        kc += 1
                        acc = _rescale(acc, alpha, HEAD_DIM)
                    acc = warpgroup_mma(p_op, v_bufs.index(kc % K_STAGES), acc, is_async=True)
                    acc = warpgroup_mma_wait(0, deps=(acc,))
                    mbarrier.arrive(kv_empty.index(kc % K_STAGES), count=1)
                    kc += 1
                else:
                    for j in range(n_tiles):
                        s = _issue_scores(q, k_bufs, kv_ready, kc, BLOCK_N, K_STAGES)
                        s = warpgroup_mma_wait(0, deps=(s,))
                        p, alpha, m_i, l_i = _softmax(s, m_i, l_i, j * BLOCK_N, seq_len, qk_scale, BLOCK_N)
                        acc = _rescale(acc, alpha, HEAD_DIM)
                        p_op = gl.convert_layout(p.to(dtype), _p_layout(HEAD_DIM))
                        acc = warpgroup_mma(p_op, v_bufs.index(kc % K_STAGES), acc, is_async=True)
                        acc = warpgroup_mma_wait(0, deps=(acc,))
                        mbarrier.arrive(kv_empty.index(kc % K_STAGES), count=1)
                        kc += 1
                mbarrier.arrive(q_empty.index(qs), count=1)
                qt += 1
                out = acc / gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))[:, None]
                rows = m0 + CONSUMER * _BM + gl.arange(0, _BM, layout=gl.SliceLayout(1, o_layout))
                cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
                ptrs = Out + (start + rows)[:, None].to(gl.int64) * stride_ot + head * stride_oh
                ptrs = ptrs + cols[None, :]
                gl.store(ptrs, out.to(Out.dtype.element_ty), mask=rows[:, None] < seq_len)

    @gluon.jit
    def _flash_fwd_kernel(desc_q, desc_k, desc_v, Out, CU_SEQLENS, stride_ot, stride_oh, num_heads, m_tiles,
                          num_tiles, qk_scale, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr,
                          K_STAGES: gl.constexpr, CONSUMERS: gl.constexpr, REGS: gl.constexpr,
                          PIPELINE: gl.constexpr):
        dtype: gl.constexpr = desc_q.dtype
        # query tiles: [stage * CONSUMERS + consumer] (a TMA box side must be a power of two: 64 rows each)
        q_bufs = gl.allocate_shared_memory(dtype, [_QS * CONSUMERS, _BM, HEAD_DIM], desc_q.layout)
        k_bufs = gl.allocate_shared_memory(dtype, [K_STAGES, BLOCK_N, HEAD_DIM], desc_k.layout)
        v_bufs = gl.allocate_shared_memory(dtype, [K_STAGES, BLOCK_N, HEAD_DIM], desc_v.layout)
        q_ready = gl.allocate_shared_memory(gl.int64, [_QS, 1], mbarrier.MBarrierLayout())
        q_empty = gl.allocate_shared_memory(gl.int64, [_QS, 1], mbarrier.MBarrierLayout())
        kv_ready = gl.allocate_shared_memory(gl.int64, [K_STAGES, 1], mbarrier.MBarrierLayout())
        kv_empty = gl.allocate_shared_memory(gl.int64, [K_STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(_QS):
            mbarrier.init(q_ready.index(i), count=1)
            mbarrier.init(q_empty.index(i), count=CONSUMERS)  # every consumer releases a query tile
        for i in gl.static_range(K_STAGES):
            mbarrier.init(kv_ready.index(i), count=1)
            mbarrier.init(kv_empty.index(i), count=CONSUMERS)
        # the partitions: the producer (the default warps), then CONSUMERS consumer warp groups
        # (warp_specialize takes the list as written here: one branch per consumer count)
        descs, smem = (desc_q, desc_k, desc_v), (q_bufs, k_bufs, v_bufs)
        bars, work = (q_ready, q_empty, kv_ready, kv_empty), (CU_SEQLENS, num_heads, m_tiles, num_tiles)
        dest = (Out, stride_ot, stride_oh, qk_scale)
        if CONSUMERS == 2:
            gl.warp_specialize([
                (_producer, (descs, smem, bars, work, HEAD_DIM, BLOCK_N, K_STAGES, CONSUMERS)),
                (_consumer, (smem, bars, work, dest, 0, HEAD_DIM, BLOCK_N, K_STAGES, CONSUMERS, PIPELINE)),
                (_consumer, (smem, bars, work, dest, 1, HEAD_DIM, BLOCK_N, K_STAGES, CONSUMERS, PIPELINE)),
            ], [4, 4], [REGS, REGS])
        else:
            gl.warp_specialize([
                (_producer, (descs, smem, bars, work, HEAD_DIM, BLOCK_N, K_STAGES, CONSUMERS)),
                (_consumer, (smem, bars, work, dest, 0, HEAD_DIM, BLOCK_N, K_STAGES, CONSUMERS, PIPELINE)),
                (_consumer, (smem, bars, work, dest, 1, HEAD_DIM, BLOCK_N, K_STAGES, CONSUMERS, PIPELINE)),
                (_consumer, (smem, bars, work, dest, 2, HEAD_DIM, BLOCK_N, K_STAGES, CONSUMERS, PIPELINE)),
            ], [4, 4, 4], [REGS, REGS, REGS])
# fmt: on


def _descriptor(x: torch.Tensor, rows: int) -> TensorDescriptor:
    """TMA descriptor over x [T, H, D] seen as [T, H * D] rows (x.stride(0) apart), [rows, D] boxes."""
    t, h, d = x.shape
    return TensorDescriptor(x, [t, h * d], [x.stride(0), 1], [rows, d], shared_layout([rows, d], x.dtype))


def flash_attention(
    q, k, v, cu_seqlens, max_seqlen: int, scale: float, config: dict | None = None
) -> torch.Tensor | None:
    """varlen_attention (non-causal, no bias) on Hopper; the caller checked ``supports``.
    Returns a new contiguous [T, H, D] tensor, or None if the kernel does not compile with this
    Triton (logged once; ``supports`` is False from then on, so the caller's Triton kernel takes
    over). config: CONFIGS keys to override (benchmarks). No host sync: CUDA-graph safe."""
    t, h, d = q.shape
    cfg = {**CONFIGS[d], **(config or {})}
    out = torch.empty((t, h, d), device=q.device, dtype=q.dtype)
    bm_total = cfg["CONSUMERS"] * BLOCK_M
    m_tiles = triton.cdiv(max_seqlen, bm_total)
    num_tiles = m_tiles * h * (cu_seqlens.numel() - 1)
    if t == 0 or num_tiles == 0:
        return out
    launched = _guard.launch(
        _flash_fwd_kernel, (min(num_tiles, sm_count(q.device)),),
        _descriptor(q, BLOCK_M), _descriptor(k, cfg["BLOCK_N"]), _descriptor(v, cfg["BLOCK_N"]), out,
        cu_seqlens, out.stride(0), out.stride(1), h, m_tiles, num_tiles, float(scale) * LOG2E,
        HEAD_DIM=d, num_warps=4, **cfg,
    )  # fmt: skip
    return out if launched else None


def compile_offline(head_dim: int, dtype: torch.dtype = torch.bfloat16, config: dict | None = None):
    """The kernel compiled for sm_90 without a GPU (``gluon_support.compile_sm90``; CPU tests)."""
    cfg = {**CONFIGS[head_dim], **(config or {})}
    kv = desc_type(dtype, [cfg["BLOCK_N"], head_dim])
    sig = dict(desc_q=desc_type(dtype, [BLOCK_M, head_dim]), desc_k=kv, desc_v=kv, Out=ptr_type(dtype),
               CU_SEQLENS="*i32", stride_ot="i32", stride_oh="i32", num_heads="i32", m_tiles="i32",
               num_tiles="i32", qk_scale="fp32")  # fmt: skip
    return compile_sm90(_flash_fwd_kernel, sig, {"HEAD_DIM": head_dim, **cfg})
