"""Absorbed cross-attention for Hopper (sm_90) in Gluon: ``shared_kv.shared_kv_attention`` with
one query token per program.

With the K/V projections absorbed (``encdec_models.layers.Attention.cross``), every head of a sequence
attends over the same rows, the encoder output e [n, d_model]: softmax(scale * q'_h . e) . e.
A decode step then reads each sequence's rows once for all heads and layers' worth of K and V:
half the bytes of per-layer K/V. The work per row is H dot products of length d each way, so
it needs the tensor cores, and an output of H x d float32 per sequence (20 x 1280 for Whisper
large-v3) that must stay in registers. The Triton kernel cannot arrange that (with a [rows x d]
accumulator per program it stays far below the memory bandwidth), so this one splits the heads
over consumer warp groups (``gl.warp_specialize``), ``GROUP`` heads each:

- a producer warp group streams the sequence's rows, one tile of ``BLOCK_N`` rows at a time, as
  ``d / DC`` shared-memory chunks of [BLOCK_N, DC] with TMA (the whole tile stays resident: the
  scores need every column before the values can be summed);
- each consumer keeps its heads' queries in shared memory ([GROUP, d]) and computes, per tile,
  S^T = E Q^T ([BLOCK_N, GROUP], asynchronous ``warpgroup_mma`` over the chunks), the online
  softmax down the rows, P^T into shared memory, then O^T += E^T P^T chunk by chunk
  (d / DC float32 accumulators of [DC, GROUP]: 80 registers per thread at d 1280), and releases
  each chunk as its product completes, so the next tile's loads start behind it.

Every consumer reads the same resident tile, so a tile is loaded once for all heads. One CTA
per SM (shared memory: the tile, the queries); sequences beyond one wave of CTAs, or split into
row ranges when the batch is small (partial results merged as in ``paged_attention``). The
kernel takes one query token per program: ``shared_kv._launch_shared_kv`` gives steps with
several tokens of a sequence (prompts) one block-table row per token. Whole tiles are loaded
and only the scores masked, so the rows after a sequence's last, to its tile's end, must be
finite (``ModelRunner._zero_tile_ends`` writes zeros there).

Fails softly (``gluon_support.py``): ``supports`` is False without Gluon, before Hopper, for
inputs it does not cover (float32, more than ``GROUP * MAX_CONSUMERS`` heads, a width that is
not a multiple of DC or does not fit shared memory, a row layout TMA cannot address), and after
a compile failure (logged once); the Triton kernel serves then.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from encdec_kernels.checks import SHARED_KV_TILE_ROWS
from encdec_kernels.common import LOG2E, NEG_INIT, merge_rows, sm_count
from encdec_kernels.gluon_support import AVAILABLE, CompileGuard, compile_sm90, desc_type, ptr_type

if AVAILABLE:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from encdec_kernels.gluon_support import barrier, mma_layout, shared_layout, tma_load

__all__ = ["supports", "preferred", "shared_kv_attention"]

_guard = CompileGuard("Hopper cross-attention")
BLOCK_N = SHARED_KV_TILE_ROWS  # rows per tile: the M of S^T = E Q^T (a warp group's wgmma is 64 rows)
DC = 128  # columns per shared-memory chunk (and per O^T accumulator)
GROUP = 8  # heads per consumer warp group (the N of both products)
MAX_CONSUMERS = 3  # 24 heads at most (Whisper large-v3: 20, BART-large and T5-large: 16)
SHARED_LIMIT = 227 * 1024
_BN, _DC, _G = tl.constexpr(BLOCK_N), tl.constexpr(DC), tl.constexpr(GROUP)


def _shared_bytes(d: int, consumers: int, elem: int = 2) -> int:
    return (BLOCK_N * d + consumers * GROUP * d + consumers * GROUP * BLOCK_N) * elem + 1024


def preferred(device: torch.device, num_heads: int, d_model: int) -> bool:
    """Whether this kernel runs a model of this shape here (Gluon, Hopper, not turned off, few
    enough heads, a width that fits): the engine then takes absorbed cross-attention by default
    (the Triton kernel alone is slower than per-layer K/V)."""
    return (
        _guard.usable(device)
        and num_heads <= GROUP * MAX_CONSUMERS
        and d_model % DC == 0
        and _shared_bytes(d_model, triton.cdiv(num_heads, GROUP)) <= SHARED_LIMIT
    )


def supports(q, rows) -> bool:
    """Whether shared_kv_attention can run these inputs here: a model shape ``preferred`` takes,
    fp16/bf16, q [Tq, H, d] a view of [H, Tq, d] (as the layer makes it; one token per program),
    and rows [C, NB, RC, d] that TMA can address as one [C * NB * RC, d] matrix."""
    tq, h, d = q.shape
    if not (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and preferred(q.device, h, d)):
        return False
    c, nb, rc, _ = rows.shape
    box = min(rc, BLOCK_N)
    return (
        rows.stride(0) == nb * rc * d  # rows of all chunks evenly spaced: one [C * NB * RC, d] matrix
        and rows.stride(1) == rc * d
        and rows.stride(2) == d
        and rows.data_ptr() % 16 == 0
        and (d * rows.element_size()) % 16 == 0
        and box >= 8
        and box & (box - 1) == 0
        and rc % box == 0
        and (c * rc) % BLOCK_N == 0  # a tile never crosses a block
        and q.stride(2) == 1
        and q.stride(0) == d
        and q.stride(1) == tq * d  # q: a view of [H, Tq, d]
        and (tq * d * q.element_size()) % 16 == 0
        and q.data_ptr() % 16 == 0
    )


# fmt: off
if AVAILABLE:

    @gluon.jit
    def _split_range(SEQ_LENS, num_splits):
        """(sequence, first row, end row) of this CTA: split s of a sequence takes rows
        [s * chunk, (s + 1) * chunk), chunk a whole number of tiles."""
        b = gl.program_id(0)
        seq_len = gl.load(SEQ_LENS + b)
        chunk = gl.cdiv(gl.cdiv(seq_len, num_splits), _BN) * _BN
        lo = gl.minimum(gl.program_id(1) * chunk, seq_len)
        return b, lo, gl.minimum(lo + chunk, seq_len)

    @gluon.jit
    def _producer(args, RC: gl.constexpr, BOX_R: gl.constexpr, ROWS_PER_BLOCK: gl.constexpr, D: gl.constexpr,
                  CONSUMERS: gl.constexpr):
        desc_e, desc_q, e_bufs, q_bufs, e_ready, e_empty, q_ready, BLOCK_TABLES, SEQ_LENS = args[:9]
        stride_bt, num_splits, nb = args[9:]
        NCH: gl.constexpr = D // _DC
        b, lo, hi = _split_range(SEQ_LENS, num_splits)
        # every consumer's queries: heads [8 c, 8 c + 8) of token b, as [GROUP, DC] chunks (rows past
        # the last head are zeros: TMA fills outside the tensor)
        mbarrier.expect(q_ready, CONSUMERS * NCH * desc_q.block_type.nbytes)
        for g in gl.static_range(CONSUMERS):
            for c in gl.static_range(NCH):
                tma_load(desc_q, [g * _G, b * D + c * _DC], q_ready, q_bufs.index(g * NCH + c))
        bt_row = BLOCK_TABLES + b.to(gl.int64) * stride_bt
        t = 0
        for n0 in range(lo, hi, _BN):
            block = gl.load(bt_row + n0 // ROWS_PER_BLOCK)
            r0 = n0 % ROWS_PER_BLOCK
            for c in gl.static_range(NCH):
                mbarrier.wait(e_empty.index(c), (t & 1) ^ 1)  # a fresh barrier passes phase 1
                mbarrier.expect(e_ready.index(c), (_BN // BOX_R) * desc_e.block_type.nbytes)
                for k in gl.static_range(_BN // BOX_R):
                    r = r0 + k * BOX_R
                    row = ((r // RC) * nb + block) * RC + r % RC
                    dest = e_bufs.index(c).slice(k * BOX_R, BOX_R)
                    tma_load(desc_e, [row, c * _DC], e_ready.index(c), dest)
            t += 1

    @gluon.jit
    def _consumer(args, p_bufs, CONSUMER: gl.constexpr, D: gl.constexpr, IS_SPLIT: gl.constexpr,
                  MODE: gl.constexpr):
        Out, O_PART, LSE_PART, SEQ_LENS, e_bufs, q_bufs, e_ready, e_empty, q_ready = args[:9]
        stride_ot, stride_oh, num_heads, num_splits, qk_scale = args[9:]
        NCH: gl.constexpr = D // _DC
        b, lo, hi = _split_range(SEQ_LENS, num_splits)
        s_layout: gl.constexpr = mma_layout(_G)
        dtype: gl.constexpr = e_bufs.dtype
        mbarrier.wait(q_ready, 0)

        m_i = gl.full([_G], NEG_INIT, gl.float32, gl.SliceLayout(0, s_layout))
        l_i = gl.zeros([_G], gl.float32, gl.SliceLayout(0, s_layout))
        accs = ()
        for _ in gl.static_range(NCH):
            accs = accs + (gl.zeros([_DC, _G], gl.float32, s_layout),)
        t = 0
        for n0 in range(lo, hi, _BN):
            if MODE == 1:
                for c in gl.static_range(NCH):
                    mbarrier.wait(e_ready.index(c), t & 1)
                    mbarrier.arrive(e_empty.index(c), count=1)
            else:
                # chunk indices the compiler cannot hoist out of the loop (z is 0): with every
                # wgmma's shared-memory descriptors computed once before the loop, 160 of them per tile
                # spilled to local memory and each product waited on reloading them
                z = n0 >> 31
                s = gl.zeros([_BN, _G], gl.float32, s_layout)
                for c in gl.static_range(NCH):
                    mbarrier.wait(e_ready.index(c), t & 1)
                    if MODE != 3:
                        q_t = q_bufs.index(CONSUMER * NCH + c + z).permute((1, 0))
                        s = warpgroup_mma(e_bufs.index(c + z), q_t, s, is_async=True)
                if MODE != 3:
                    s = warpgroup_mma_wait(0, deps=(s,))
                rows = n0 + gl.arange(0, _BN, layout=gl.SliceLayout(1, s_layout))
                s = gl.where(rows[:, None] < hi, s * qk_scale, float("-inf"))
                m_new = gl.maximum(m_i, gl.max(s, axis=0))
                p = gl.exp2(s - m_new[None, :])
                alpha = gl.exp2(m_i - m_new)
                l_i = l_i * alpha + gl.sum(p, axis=0)
                m_i = m_new
                p_bufs.store(gl.permute(p.to(dtype), (1, 0)))  # P^T [GROUP, BLOCK_N]: the B operand, K-major
                fence_async_shared()
                barrier()
                if MODE == 2:
                    for c in gl.static_range(NCH):
                        mbarrier.arrive(e_empty.index(c), count=1)
                else:
                    new = ()
                    for c in gl.static_range(NCH):
                        acc = warpgroup_mma(e_bufs.index(c + z).permute((1, 0)), p_bufs.permute((1, 0)),
                                            accs[c] * alpha[None, :], is_async=True)
                        new = new + (acc,)
                    accs = ()
                    for c in gl.static_range(NCH):
                        acc = warpgroup_mma_wait(NCH - 1 - c, deps=(new[c],))
                        mbarrier.arrive(e_empty.index(c), count=1)
                        accs = accs + (acc,)
            t += 1

        has_rows = l_i > 0.0
        inv_l = 1.0 / gl.where(has_rows, l_i, 1.0)
        o_heads = CONSUMER * _G + gl.arange(0, _G, layout=gl.SliceLayout(0, s_layout))
        o_cols = gl.arange(0, _DC, layout=gl.SliceLayout(1, s_layout))
        head_ok = o_heads[None, :] < num_heads
        if IS_SPLIT:
            part = (b.to(gl.int64) * num_heads + o_heads) * num_splits + gl.program_id(1)
            lse = gl.where(has_rows, m_i + gl.log2(gl.where(has_rows, l_i, 1.0)), float("-inf"))
            gl.store(LSE_PART + part, lse, mask=o_heads < num_heads)
            for c in gl.static_range(NCH):
                ptrs = O_PART + part[None, :] * (NCH * _DC) + (c * _DC + o_cols)[:, None]
                gl.store(ptrs, accs[c] * inv_l[None, :], mask=head_ok)
        else:
            base = Out + b.to(gl.int64) * stride_ot
            for c in gl.static_range(NCH):
                ptrs = base + o_heads[None, :] * stride_oh + (c * _DC + o_cols)[:, None]
                gl.store(ptrs, (accs[c] * inv_l[None, :]).to(Out.dtype.element_ty), mask=head_ok)

    @gluon.jit
    def _shared_kv_kernel(desc_e, desc_q, Out, O_PART, LSE_PART, BLOCK_TABLES, SEQ_LENS,
                          stride_ot, stride_oh, stride_bt, num_heads, num_splits, nb, qk_scale,
                          D: gl.constexpr, RC: gl.constexpr, BOX_R: gl.constexpr,
                          ROWS_PER_BLOCK: gl.constexpr, CONSUMERS: gl.constexpr, REGS: gl.constexpr,
                          IS_SPLIT: gl.constexpr, MODE: gl.constexpr = 0):
        NCH: gl.constexpr = D // _DC
        dtype: gl.constexpr = desc_e.dtype
        e_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([_BN, _DC], dtype)
        p_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([_G, _BN], dtype)
        e_bufs = gl.allocate_shared_memory(dtype, [NCH, _BN, _DC], e_layout)
        q_bufs = gl.allocate_shared_memory(dtype, [CONSUMERS * NCH, _G, _DC], desc_q.layout)
        p_bufs = gl.allocate_shared_memory(dtype, [CONSUMERS, _G, _BN], p_layout)
        e_ready = gl.allocate_shared_memory(gl.int64, [NCH, 1], mbarrier.MBarrierLayout())
        e_empty = gl.allocate_shared_memory(gl.int64, [NCH, 1], mbarrier.MBarrierLayout())
        q_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        mbarrier.init(q_ready, count=1)
        for i in gl.static_range(NCH):
            mbarrier.init(e_ready.index(i), count=1)
            mbarrier.init(e_empty.index(i), count=CONSUMERS)  # every consumer reads every chunk
        pargs = (desc_e, desc_q, e_bufs, q_bufs, e_ready, e_empty, q_ready, BLOCK_TABLES, SEQ_LENS, stride_bt,
                 num_splits, nb)
        cargs = (Out, O_PART, LSE_PART, SEQ_LENS, e_bufs, q_bufs, e_ready, e_empty, q_ready, stride_ot,
                 stride_oh, num_heads, num_splits, qk_scale)
        # one branch per consumer count: warp_specialize takes its partitions as written
        if CONSUMERS == 1:
            gl.warp_specialize([(_producer, (pargs, RC, BOX_R, ROWS_PER_BLOCK, D, CONSUMERS)),
                                (_consumer, (cargs, p_bufs.index(0), 0, D, IS_SPLIT, MODE))], [4], [REGS])
        elif CONSUMERS == 2:
            gl.warp_specialize([(_producer, (pargs, RC, BOX_R, ROWS_PER_BLOCK, D, CONSUMERS)),
                                (_consumer, (cargs, p_bufs.index(0), 0, D, IS_SPLIT, MODE)),
                                (_consumer, (cargs, p_bufs.index(1), 1, D, IS_SPLIT, MODE))],
                               [4, 4], [REGS, REGS])
        else:
            gl.warp_specialize([(_producer, (pargs, RC, BOX_R, ROWS_PER_BLOCK, D, CONSUMERS)),
                                (_consumer, (cargs, p_bufs.index(0), 0, D, IS_SPLIT, MODE)),
                                (_consumer, (cargs, p_bufs.index(1), 1, D, IS_SPLIT, MODE)),
                                (_consumer, (cargs, p_bufs.index(2), 2, D, IS_SPLIT, MODE))],
                               [4, 4, 4], [REGS, REGS, REGS])
# fmt: on

REGS = {1: 240, 2: 240, 3: 160}  # per consumer thread: the register file holds them and the producer


def num_splits_for(num_seqs: int, num_rows: int, device: torch.device) -> int:
    """Row splits per sequence: one CTA per SM, so pick the split that needs the fewest waves of
    CTAs per unit of work, counting what each extra split costs (its partial results written
    and merged: about 3% of a split's rows at Whisper's 1500 x 1280)."""
    sms = sm_count(device)
    tiles = max(1, triton.cdiv(num_rows, BLOCK_N))
    best, best_cost = 1, None
    for s in range(1, min(tiles, 16) + 1):
        cost = triton.cdiv(num_seqs * s, sms) / s + (0.03 * s if s > 1 else 0.0)
        if best_cost is None or cost < best_cost - 1e-9:
            best, best_cost = s, cost
    return best


_MODE = 0  # debug probes: 1 = consumers do no math (load throughput alone)


def shared_kv_attention(q, rows, block_tables, seq_lens, scale: float, num_splits: int | None = None):
    """shared_kv.shared_kv_attention with one query token per block-table row (``supports`` checked;
    token b reads block_tables[b] and seq_lens[b]):
    returns [B, H, d] (a view of a new [H, B, d] tensor, as the Triton kernel), or None if the
    kernel does not compile with this Triton (logged once; the caller falls back)."""
    tq, h, d = q.shape
    num_seqs = block_tables.shape[0]
    out = torch.empty((h, tq, d), device=q.device, dtype=q.dtype).transpose(0, 1)
    if num_seqs == 0:
        return out
    c, nb, rc, _ = rows.shape
    rows_per_block = c * rc
    consumers = triton.cdiv(h, GROUP)
    if num_splits is None:
        num_splits = num_splits_for(num_seqs, block_tables.shape[1] * rows_per_block, q.device)
    if num_splits > 1:
        o_part = torch.empty((tq, h, num_splits, d), device=q.device, dtype=torch.float32)
        lse_part = torch.empty((tq, h, num_splits), device=q.device, dtype=torch.float32)
    else:
        o_part = lse_part = out  # unused
    box = min(rc, BLOCK_N)
    flat = rows.as_strided((c * nb * rc, d), (d, 1))
    desc = TensorDescriptor(flat, [c * nb * rc, d], [d, 1], [box, DC], shared_layout([box, DC], q.dtype))
    # q [B, H, d] is a view of [H, B, d]: seen as [H, B * d], a [GROUP, DC] box is GROUP heads' chunk
    q_flat = q.as_strided((h, tq * d), (tq * d, 1))
    desc_q = TensorDescriptor(
        q_flat, [h, tq * d], [tq * d, 1], [GROUP, DC], shared_layout([GROUP, DC], q.dtype)
    )
    launched = _guard.launch(
        _shared_kv_kernel, (num_seqs, num_splits),
        desc, desc_q, out, o_part, lse_part, block_tables, seq_lens,
        out.stride(0), out.stride(1), block_tables.stride(0),
        h, num_splits, nb, float(scale) * LOG2E,
        D=d, RC=rc, BOX_R=box, ROWS_PER_BLOCK=rows_per_block, CONSUMERS=consumers, REGS=REGS[consumers],
        IS_SPLIT=num_splits > 1, num_warps=4, MODE=_MODE,
    )  # fmt: skip
    if not launched:
        return None
    if num_splits > 1:
        merge_rows(o_part, lse_part, out)
    return out


def compile_offline(d: int, heads: int, rc: int = 16, rows_per_block: int = 1024, split: bool = False,
                    dtype: torch.dtype = torch.bfloat16):  # fmt: skip
    """The kernel compiled for sm_90 without a GPU (``gluon_support.compile_sm90``; CPU tests)."""
    box = min(rc, BLOCK_N)
    consumers = triton.cdiv(heads, GROUP)
    sig = dict(desc_e=desc_type(dtype, [box, DC]), desc_q=desc_type(dtype, [GROUP, DC]), Out=ptr_type(dtype),
               O_PART="*fp32", LSE_PART="*fp32", BLOCK_TABLES="*i32", SEQ_LENS="*i32", stride_ot="i32",
               stride_oh="i32", stride_bt="i32", num_heads="i32", num_splits="i32", nb="i32",
               qk_scale="fp32")  # fmt: skip
    consts = dict(D=d, RC=rc, BOX_R=box, ROWS_PER_BLOCK=rows_per_block, CONSUMERS=consumers,
                  REGS=REGS[consumers], IS_SPLIT=split, MODE=0)  # fmt: skip
    return compile_sm90(_shared_kv_kernel, sig, consts)
