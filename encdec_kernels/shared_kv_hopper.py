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

fp8 rows (``--kv-dtype fp8``: e4m3 with a float32 scale per row, ``FP8``): TMA loads the fp8 tile
(half the bytes) in 64-column chunks (``DC_FP8``), and the consumers convert it, chunk by chunk, to
fp16 for the same two products (wgmma has no fp8 x bf16 form, and an fp8 wgmma would need fp8
queries and probabilities and K-major operands, which the PV product lacks). fp16, not bf16:
e4m3 -> fp16 is one instruction per two values, -> bf16 two more per value; every e4m3 value is
exact in both. So each consumer first loads its heads' queries itself, as fp16 times a power of two
that keeps them in fp16's range (undone on the scores; no bf16 copy in shared memory). For the
scores the chunk goes straight into registers as wgmma's A operand (two-byte loads); for the
values (E^T, whose K runs across rows) byte loads in that layout cost 4x more instructions, so
the chunk goes through a per-consumer ring of three fp16 [BLOCK_N, DC_FP8] slots with 16-byte
loads and stores and is read from there as the bf16 kernel reads E^T (``FP8_VALUES_SMEM``; the
register form stays, ``_fp8_values``). A third form, off by default until measured
(``FP8_PRODUCER_CONVERTS``): the producer warp group converts each chunk once for all consumers
into a shared ring of fp16 chunks (twice a tile: the scores' pass, the values' pass), and the
consumers run the bf16 kernel's products on it (``_convert_tiles``, ``_ring_scores``,
``_ring_values``). As in ``shared_kv.py``, a row's scale multiplies its score
(keys) and its probability before the PV product (values): the tile itself is never rescaled. The
consumers read their tile's scales from global memory (a float per row, issued before the tile's
wait). Since the products no longer read the fp8 tile, a chunk is released as soon as its values
are loaded for the PV product; at most two products are in flight (a register A operand kept
alive through ``warpgroup_mma_wait``'s deps). fp16's range: the queries are scaled into it, and
the probabilities times the value scales are stored relative to the largest value scale so far
(at most 1, so neither overflow nor, for rows of small magnitude, underflow), the accumulators
rescaled when it grows, as for the running maximum.

Fails softly (``gluon_support.py``): ``supports`` is False without Gluon, before Hopper, for
inputs it does not cover (float32, more than ``GROUP * MAX_CONSUMERS`` heads, a width that is
not a multiple of DC or does not fit shared memory, a row layout TMA cannot address), and after
a compile failure (logged once, per variant: bf16/fp16 rows or fp8 rows); the Triton kernel
serves then.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from encdec_kernels.checks import SHARED_KV_TILE_ROWS, SPLIT_PARTIALS_MAX_BYTES
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
_guard_fp8 = CompileGuard("Hopper cross-attention (fp8 rows)")
BLOCK_N = SHARED_KV_TILE_ROWS  # rows per tile: the M of S^T = E Q^T (a warp group's wgmma is 64 rows)
DC = 128  # columns per shared-memory chunk (and per O^T accumulator)
# fp8 rows: 64-column chunks, so that a chunk converted to registers (wgmma's A operand) takes half
# the registers: with d 1280 and three consumers, 128-column chunks spilled and serialized the wgmmas
DC_FP8 = 64
# fp8 rows, the values' product: E^T through a shared-memory ring (16-byte loads and stores, one
# barrier a chunk; ``_fp8_values_smem``) or straight into wgmma's A registers (byte loads;
# ``_fp8_values``). The kernel's FP8 constexpr: 0 bf16/fp16 rows, 1 registers, 2 the ring.
FP8_VALUES_SMEM = True
# fp8 rows, FP8 3: the producer warp group converts each chunk once for all consumers (twice a tile)
# into a shared ring of FP8_RING fp16 chunks, and the consumers run the bf16 kernel's products on
# it; the consumers convert nothing. Off by default until measured (FP8_VALUES_SMEM's form is).
FP8_PRODUCER_CONVERTS = False
FP8_RING = 8  # a power of two: the slot and phase of chunk k are shifts
_RING = tl.constexpr(FP8_RING)
GROUP = 8  # heads per consumer warp group (the N of both products)
MAX_CONSUMERS = 3  # 24 heads at most (Whisper large-v3: 20, BART-large and T5-large: 16)
SHARED_LIMIT = 227 * 1024
_BN, _G = tl.constexpr(BLOCK_N), tl.constexpr(GROUP)


def _shared_bytes(d: int, consumers: int, fp8: bool = False) -> int:
    """Shared memory of one CTA: the row tile (1 byte a value for fp8, else 2), each consumer's
    queries and probabilities (2 bytes a value) and, for fp8 rows, its ring of converted chunks;
    the barriers."""
    mode = _fp8_mode(fp8)
    ring = 3 * BLOCK_N * DC_FP8 if mode == 2 else 0  # per consumer
    shared_ring = FP8_RING * BLOCK_N * DC_FP8 * 2 if mode == 3 else 0
    per_consumer = (GROUP * d + GROUP * BLOCK_N + ring) * 2
    return BLOCK_N * d * (1 if fp8 else 2) + consumers * per_consumer + shared_ring + 1024


def preferred(device: torch.device, num_heads: int, d_model: int, fp8: bool = False) -> bool:
    """Whether this kernel runs a model of this shape here (Gluon, Hopper, not turned off, few
    enough heads, a width that fits; ``fp8``: the variant for e4m3 rows): the engine then takes
    absorbed cross-attention by default (the Triton kernel alone is slower than per-layer K/V)."""
    return (
        (_guard_fp8 if fp8 else _guard).usable(device)
        and num_heads <= GROUP * MAX_CONSUMERS
        and d_model % DC == 0
        and _shared_bytes(d_model, triton.cdiv(num_heads, GROUP), fp8) <= SHARED_LIMIT
    )


def supports(q, rows, row_scales=None) -> bool:
    """Whether shared_kv_attention can run these inputs here: a model shape ``preferred`` takes,
    fp16/bf16 q [Tq, H, d] a view of [H, Tq, d] (as the layer makes it; one token per program),
    and rows [C, NB, RC, d] that TMA can address as one [C * NB * RC, d] matrix: q's dtype, or
    fp8 (e4m3) with row_scales [C, NB, RC] float32 (any strides)."""
    tq, h, d = q.shape
    fp8 = row_scales is not None
    if not (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and preferred(q.device, h, d, fp8)):
        return False
    if rows.dtype != (torch.float8_e4m3fn if fp8 else q.dtype):
        return False
    if fp8 and not (
        row_scales.dtype == torch.float32
        and row_scales.device == q.device
        and row_scales.shape == rows.shape[:3]
    ):
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
    def _load_chunk(desc_e, e_bufs, e_ready, bt_row, n0, c: gl.constexpr, nb, RC: gl.constexpr,
                    BOX_R: gl.constexpr, ROWS_PER_BLOCK: gl.constexpr):
        """TMA: chunk c of the tile at row n0 into e_bufs[c] (e_ready[c] counts its bytes)."""
        DCW: gl.constexpr = desc_e.block_type.shape[1]
        block = gl.load(bt_row + n0 // ROWS_PER_BLOCK)
        r0 = n0 % ROWS_PER_BLOCK
        mbarrier.expect(e_ready.index(c), (_BN // BOX_R) * desc_e.block_type.nbytes)
        for k in gl.static_range(_BN // BOX_R):
            r = r0 + k * BOX_R
            row = ((r // RC) * nb + block) * RC + r % RC
            tma_load(desc_e, [row, c * DCW], e_ready.index(c), e_bufs.index(c).slice(k * BOX_R, BOX_R))

    @gluon.jit
    def _convert_tiles(desc_e, e_bufs, e_ready, ring, r_ready, r_empty, bt_row, lo, hi, nb, RC: gl.constexpr,
                       BOX_R: gl.constexpr, ROWS_PER_BLOCK: gl.constexpr, NCH: gl.constexpr):
        """FP8 == 3: the producer warp group converts every fp8 chunk to fp16 once for all consumers,
        twice per tile (the scores' pass, then the values'), into a ring of FP8_RING slots: chunk k
        of the CTA (2 NCH a tile) goes to slot k % FP8_RING once every consumer has released what
        it held (r_empty) and is announced by r_ready. The fp8 tile is the producer's alone: a chunk
        is reloaded, for the next tile, as soon as its second conversion is done."""
        NS: gl.constexpr = ring.shape[0]
        layout: gl.constexpr = gl.BlockedLayout([1, 16], [16, 2], [4, 1], [1, 0])  # [32, 64]: 16 a thread
        if lo < hi:
            for c in gl.static_range(NCH):
                _load_chunk(desc_e, e_bufs, e_ready, bt_row, lo, c, nb, RC, BOX_R, ROWS_PER_BLOCK)
        t = 0
        for n0 in range(lo, hi, _BN):
            for ps in gl.static_range(2):
                for c in gl.static_range(NCH):
                    if ps == 0:
                        mbarrier.wait(e_ready.index(c), t & 1)
                    k = (t * 2 + ps) * NCH + c
                    mbarrier.wait(r_empty.index(k % NS), ((k // NS) & 1) ^ 1)  # fresh: phase 1 passes
                    src = e_bufs.index(c)
                    dst = ring.index(k % NS)
                    for h in gl.static_range(2):  # half a chunk at a time: the producer has few registers
                        x = src.slice(h * (_BN // 2), _BN // 2).load(layout)
                        dst.slice(h * (_BN // 2), _BN // 2).store(x.to(ring.dtype))
                    fence_async_shared()
                    barrier()
                    mbarrier.arrive(r_ready.index(k % NS), count=1)
                    if ps == 1:
                        if n0 + _BN < hi:  # every warp is past its reads of this chunk (the barrier)
                            _load_chunk(desc_e, e_bufs, e_ready, bt_row, n0 + _BN, c, nb, RC, BOX_R,
                                        ROWS_PER_BLOCK)
            t += 1

    @gluon.jit
    def _load_tiles(desc_e, e_bufs, e_ready, e_empty, bt_row, lo, hi, nb, RC: gl.constexpr,
                    BOX_R: gl.constexpr, ROWS_PER_BLOCK: gl.constexpr, NCH: gl.constexpr):
        """The tiles of rows [lo, hi) into e_bufs, a chunk as soon as every consumer released it."""
        DCW: gl.constexpr = desc_e.block_type.shape[1]
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
                    tma_load(desc_e, [row, c * DCW], e_ready.index(c), dest)
            t += 1

    @gluon.jit
    def _producer(args, RC: gl.constexpr, BOX_R: gl.constexpr, ROWS_PER_BLOCK: gl.constexpr, D: gl.constexpr,
                  CONSUMERS: gl.constexpr, FP8: gl.constexpr):
        desc_e, desc_q, e_bufs, q_bufs, e_ready, e_empty, q_ready, BLOCK_TABLES, SEQ_LENS = args[:9]
        stride_bt, num_splits, nb, ring, r_ready, r_empty = args[9:]
        DCW: gl.constexpr = desc_e.block_type.shape[1]  # chunk width: DC, or DC_FP8 for fp8 rows
        NCH: gl.constexpr = D // DCW
        b, lo, hi = _split_range(SEQ_LENS, num_splits)
        # every consumer's queries: heads [8 c, 8 c + 8) of token b, as [GROUP, DC] chunks (rows past
        # the last head are zeros: TMA fills outside the tensor)
        if not FP8:  # fp8 rows: the consumers load their queries themselves (as fp16)
            mbarrier.expect(q_ready, CONSUMERS * NCH * desc_q.block_type.nbytes)
            for g in gl.static_range(CONSUMERS):
                for c in gl.static_range(NCH):
                    tma_load(desc_q, [g * _G, b * D + c * DCW], q_ready, q_bufs.index(g * NCH + c))
        bt_row = BLOCK_TABLES + b.to(gl.int64) * stride_bt
        if FP8 == 3:
            _convert_tiles(desc_e, e_bufs, e_ready, ring, r_ready, r_empty, bt_row, lo, hi, nb, RC, BOX_R,
                           ROWS_PER_BLOCK, NCH)
        else:
            _load_tiles(desc_e, e_bufs, e_ready, e_empty, bt_row, lo, hi, nb, RC, BOX_R, ROWS_PER_BLOCK, NCH)

    @gluon.jit
    def _fp16_queries(Q, stride_qh, b, num_heads, q16_bufs, CONSUMER: gl.constexpr, NCH: gl.constexpr):
        """This consumer's queries (heads [GROUP c, GROUP c + GROUP) of token b, zeros past the last
        head) as fp16 chunks into q16_bufs, times a power of two that puts their largest magnitude
        near 2^14 (no overflow; exact to undo: the scores are divided by it); returns that factor."""
        DCW: gl.constexpr = q16_bufs.shape[2]
        layout: gl.constexpr = gl.BlockedLayout([1, 4], [8, 4], [1, 4], [1, 0])  # [8, 64]: 4 a thread
        heads = CONSUMER * _G + gl.arange(0, _G, layout=gl.SliceLayout(1, layout))
        cols = gl.arange(0, DCW, layout=gl.SliceLayout(0, layout))
        ptrs = Q + heads.to(gl.int64)[:, None] * stride_qh + b.to(gl.int64) * (NCH * DCW) + cols[None, :]
        ok = (heads < num_heads)[:, None]
        amax = gl.zeros([_G, DCW], gl.float32, layout)
        for c in gl.static_range(NCH):
            amax = gl.maximum(amax, gl.abs(gl.load(ptrs + c * DCW, mask=ok, other=0.0).to(gl.float32)))
        m = gl.max(gl.max(amax, axis=1), axis=0)
        q_scale = gl.where(m > 0.0, gl.exp2(gl.floor(gl.log2(16384.0 / gl.where(m > 0.0, m, 1.0)))), 1.0)
        for c in gl.static_range(NCH):
            q = gl.load(ptrs + c * DCW, mask=ok, other=0.0).to(gl.float32)
            q16_bufs.index(CONSUMER * NCH + c).store((q * q_scale).to(gl.float16))
        fence_async_shared()
        barrier()
        return q_scale

    @gluon.jit
    def _fp8_scores(e_bufs, q_bufs, e_ready, t, z, CONSUMER: gl.constexpr, NCH: gl.constexpr):
        """S^T = E Q^T over the chunks of an fp8 tile: each chunk loaded into registers, converted
        to fp16 as wgmma's A operand (the queries: fp16 too, q16_bufs); two products in flight (the
        older one's A kept alive until its wait)."""
        s_layout: gl.constexpr = mma_layout(_G)
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=2)
        dtype: gl.constexpr = q_bufs.dtype
        mbarrier.wait(e_ready.index(0), t & 1)
        a_prev = e_bufs.index(z).load(a_layout).to(dtype)
        s = warpgroup_mma(a_prev, q_bufs.index(CONSUMER * NCH + z).permute((1, 0)),
                          gl.zeros([_BN, _G], gl.float32, s_layout), is_async=True)
        for c in gl.static_range(1, NCH):
            mbarrier.wait(e_ready.index(c), t & 1)
            a = e_bufs.index(c + z).load(a_layout).to(dtype)
            s = warpgroup_mma(a, q_bufs.index(CONSUMER * NCH + c + z).permute((1, 0)), s, is_async=True)
            s, a_prev = warpgroup_mma_wait(1, deps=(s, a_prev))
            a_prev = a
        s, a_prev = warpgroup_mma_wait(0, deps=(s, a_prev))
        return s

    @gluon.jit
    def _fp8_values(e_bufs, p_t, e_empty, accs, alpha, z, NCH: gl.constexpr):
        """O^T = O^T * alpha + E^T P^T over the chunks of an fp8 tile (P^T: probabilities times the
        value scales), E^T in registers as for the scores; each chunk released once it is loaded."""
        s_layout: gl.constexpr = mma_layout(_G)
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=2)
        dtype: gl.constexpr = p_t.dtype
        a_prev = e_bufs.index(z).permute((1, 0)).load(a_layout).to(dtype)
        mbarrier.arrive(e_empty.index(0), count=1)
        acc_prev = warpgroup_mma(a_prev, p_t, accs[0] * alpha[None, :], is_async=True)
        new = ()
        for c in gl.static_range(1, NCH):
            a = e_bufs.index(c + z).permute((1, 0)).load(a_layout).to(dtype)
            mbarrier.arrive(e_empty.index(c), count=1)
            acc = warpgroup_mma(a, p_t, accs[c] * alpha[None, :], is_async=True)
            acc_prev, a_prev = warpgroup_mma_wait(1, deps=(acc_prev, a_prev))
            new = new + (acc_prev,)
            acc_prev, a_prev = acc, a
        acc_prev, a_prev = warpgroup_mma_wait(0, deps=(acc_prev, a_prev))
        return new + (acc_prev,)

    @gluon.jit
    def _fp8_values_smem(e_bufs, scratch, p_t, e_empty, accs, alpha, z, CONSUMER: gl.constexpr,
                         NCH: gl.constexpr):
        """_fp8_values with E^T from shared memory: each chunk converted to fp16 with 16-byte loads
        and stores into this consumer's ring of three [BLOCK_N, DC_FP8] slots (the A operand of
        the bf16 kernel's product, transposed), instead of byte loads in wgmma's A layout. A slot
        is rewritten three chunks after its product was issued: every warp has waited for that
        product (wait(1) one chunk later) before the barrier of the chunk in between."""
        dtype: gl.constexpr = p_t.dtype
        layout: gl.constexpr = gl.BlockedLayout([1, 16], [16, 2], [4, 1], [1, 0])  # [64, 64]: 2 x 16 a thread
        x = e_bufs.index(z).load(layout)
        mbarrier.arrive(e_empty.index(0), count=1)
        slot = scratch.index(CONSUMER * 3)
        slot.store(x.to(dtype))
        fence_async_shared()
        barrier()
        acc_prev = warpgroup_mma(slot.permute((1, 0)), p_t, accs[0] * alpha[None, :], is_async=True)
        new = ()
        for c in gl.static_range(1, NCH):
            x = e_bufs.index(c + z).load(layout)
            mbarrier.arrive(e_empty.index(c), count=1)
            slot = scratch.index(CONSUMER * 3 + c % 3)
            slot.store(x.to(dtype))
            fence_async_shared()
            barrier()
            acc = warpgroup_mma(slot.permute((1, 0)), p_t, accs[c] * alpha[None, :], is_async=True)
            acc_prev = warpgroup_mma_wait(1, deps=(acc_prev,))
            new = new + (acc_prev,)
            acc_prev = acc
        acc_prev = warpgroup_mma_wait(0, deps=(acc_prev,))
        return new + (acc_prev,)

    @gluon.jit
    def _ring_scores(ring, r_ready, r_empty, q_bufs, t, CONSUMER: gl.constexpr, NCH: gl.constexpr):
        """FP8 == 3: S^T = E Q^T over the tile's fp16 chunks in the shared ring (``_convert_tiles``);
        a slot is released once this consumer's product on it is done."""
        s_layout: gl.constexpr = mma_layout(_G)
        NS: gl.constexpr = ring.shape[0]
        k0 = t * 2 * NCH
        mbarrier.wait(r_ready.index(k0 % NS), (k0 // NS) & 1)
        s = warpgroup_mma(ring.index(k0 % NS), q_bufs.index(CONSUMER * NCH).permute((1, 0)),
                          gl.zeros([_BN, _G], gl.float32, s_layout), is_async=True)
        for c in gl.static_range(1, NCH):
            k = k0 + c
            mbarrier.wait(r_ready.index(k % NS), (k // NS) & 1)
            s = warpgroup_mma(ring.index(k % NS), q_bufs.index(CONSUMER * NCH + c).permute((1, 0)), s,
                              is_async=True)
            s = warpgroup_mma_wait(1, deps=(s,))
            mbarrier.arrive(r_empty.index((k - 1) % NS), count=1)
        s = warpgroup_mma_wait(0, deps=(s,))
        mbarrier.arrive(r_empty.index((k0 + NCH - 1) % NS), count=1)
        return s

    @gluon.jit
    def _ring_values(ring, r_ready, r_empty, p_t, accs, alpha, t, NCH: gl.constexpr):
        """FP8 == 3: O^T = O^T * alpha + E^T P^T over the tile's second pass through the ring."""
        NS: gl.constexpr = ring.shape[0]
        k0 = (t * 2 + 1) * NCH
        mbarrier.wait(r_ready.index(k0 % NS), (k0 // NS) & 1)
        acc_prev = warpgroup_mma(ring.index(k0 % NS).permute((1, 0)), p_t, accs[0] * alpha[None, :],
                                 is_async=True)
        new = ()
        for c in gl.static_range(1, NCH):
            k = k0 + c
            mbarrier.wait(r_ready.index(k % NS), (k // NS) & 1)
            acc = warpgroup_mma(ring.index(k % NS).permute((1, 0)), p_t, accs[c] * alpha[None, :],
                                is_async=True)
            acc_prev = warpgroup_mma_wait(1, deps=(acc_prev,))
            mbarrier.arrive(r_empty.index((k - 1) % NS), count=1)
            new = new + (acc_prev,)
            acc_prev = acc
        acc_prev = warpgroup_mma_wait(0, deps=(acc_prev,))
        mbarrier.arrive(r_empty.index((k0 + NCH - 1) % NS), count=1)
        return new + (acc_prev,)

    @gluon.jit
    def _consumer(args, p_bufs, CONSUMER: gl.constexpr, D: gl.constexpr, RC: gl.constexpr,
                  ROWS_PER_BLOCK: gl.constexpr, IS_SPLIT: gl.constexpr, FP8: gl.constexpr,
                  MODE: gl.constexpr):
        Out, O_PART, LSE_PART, SEQ_LENS, e_bufs, q_bufs, e_ready, e_empty, q_ready = args[:9]
        stride_ot, stride_oh, num_heads, num_splits, qk_scale = args[9:14]
        ROW_SCALES, BLOCK_TABLES, stride_bt, stride_sc, stride_sb, stride_sr, q16_bufs = args[14:21]
        scratch = args[21]
        Q, stride_qh, r_ready, r_empty = args[22:]
        DCW: gl.constexpr = e_bufs.shape[2]
        NCH: gl.constexpr = D // DCW
        b, lo, hi = _split_range(SEQ_LENS, num_splits)
        s_layout: gl.constexpr = mma_layout(_G)
        dtype: gl.constexpr = p_bufs.dtype  # the products' operands (fp16 for fp8 rows)
        bt_row = BLOCK_TABLES + b.to(gl.int64) * stride_bt
        if FP8:
            q_scale = _fp16_queries(Q, stride_qh, b, num_heads, q16_bufs, CONSUMER, NCH)
            qk_scale = qk_scale / q_scale
            v_ref = qk_scale * 0.0  # the largest value scale so far (the probabilities' unit)
        else:
            mbarrier.wait(q_ready, 0)

        m_i = gl.full([_G], NEG_INIT, gl.float32, gl.SliceLayout(0, s_layout))
        l_i = gl.zeros([_G], gl.float32, gl.SliceLayout(0, s_layout))
        accs = ()
        for _ in gl.static_range(NCH):
            accs = accs + (gl.zeros([DCW, _G], gl.float32, s_layout),)
        t = 0
        for n0 in range(lo, hi, _BN):
            if MODE == 1:
                for c in gl.static_range(NCH):
                    mbarrier.wait(e_ready.index(c), t & 1)
                    mbarrier.arrive(e_empty.index(c), count=1)
            elif FP8:
                z = n0 >> 31  # as below: chunk indices computed in the loop
                rows = n0 + gl.arange(0, _BN, layout=gl.SliceLayout(1, s_layout))
                r = rows % ROWS_PER_BLOCK
                block = gl.load(bt_row + n0 // ROWS_PER_BLOCK).to(gl.int64)
                sc_ptrs = ROW_SCALES + (r // RC).to(gl.int64) * stride_sc + block * stride_sb
                sc_ptrs += (r % RC) * stride_sr
                sc = gl.load(sc_ptrs, mask=rows < hi, other=0.0)  # 0 past the end: p * 0, never 0 * inf
                if FP8 == 3:
                    s = _ring_scores(scratch, r_ready, r_empty, q16_bufs, t, CONSUMER, NCH)
                else:
                    s = _fp8_scores(e_bufs, q16_bufs, e_ready, t, z, CONSUMER, NCH)
                s = gl.where(rows[:, None] < hi, s * (sc * qk_scale)[:, None], float("-inf"))
                m_new = gl.maximum(m_i, gl.max(s, axis=0))
                p = gl.exp2(s - m_new[None, :])
                alpha = gl.exp2(m_i - m_new)
                l_i = l_i * alpha + gl.sum(p, axis=0)
                m_i = m_new
                # P^T with the value scales folded in, relative to the largest so far (at most 1: fp16
                # keeps its precision whatever the rows' magnitude); the accumulators follow it as they
                # follow the running maximum
                v_new = gl.maximum(v_ref, gl.max(sc, axis=0))
                alpha = alpha * (v_ref / v_new)
                v_ref = v_new
                p_bufs.store(gl.permute((p * (sc / v_new)[:, None]).to(dtype), (1, 0)))
                fence_async_shared()
                barrier()
                if FP8 == 3:
                    p_t = p_bufs.permute((1, 0))
                    accs = _ring_values(scratch, r_ready, r_empty, p_t, accs, alpha, t, NCH)
                elif FP8 == 2:
                    accs = _fp8_values_smem(e_bufs, scratch, p_bufs.permute((1, 0)), e_empty, accs, alpha, z,
                                            CONSUMER, NCH)
                else:
                    accs = _fp8_values(e_bufs, p_bufs.permute((1, 0)), e_empty, accs, alpha, z, NCH)
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
        if FP8:
            inv_l = inv_l * v_ref
        o_heads = CONSUMER * _G + gl.arange(0, _G, layout=gl.SliceLayout(0, s_layout))
        o_cols = gl.arange(0, DCW, layout=gl.SliceLayout(1, s_layout))
        head_ok = o_heads[None, :] < num_heads
        if IS_SPLIT:
            part = (b.to(gl.int64) * num_heads + o_heads) * num_splits + gl.program_id(1)
            lse = gl.where(has_rows, m_i + gl.log2(gl.where(has_rows, l_i, 1.0)), float("-inf"))
            gl.store(LSE_PART + part, lse, mask=o_heads < num_heads)
            for c in gl.static_range(NCH):
                ptrs = O_PART + part[None, :] * D + (c * DCW + o_cols)[:, None]
                gl.store(ptrs, accs[c] * inv_l[None, :], mask=head_ok)
        else:
            base = Out + b.to(gl.int64) * stride_ot
            for c in gl.static_range(NCH):
                ptrs = base + o_heads[None, :] * stride_oh + (c * DCW + o_cols)[:, None]
                gl.store(ptrs, (accs[c] * inv_l[None, :]).to(Out.dtype.element_ty), mask=head_ok)

    @gluon.jit
    def _shared_kv_kernel(desc_e, desc_q, Out, O_PART, LSE_PART, BLOCK_TABLES, SEQ_LENS, ROW_SCALES, Q,
                          stride_ot, stride_oh, stride_bt, stride_sc, stride_sb, stride_sr, stride_qh,
                          num_heads, num_splits, nb, qk_scale,
                          D: gl.constexpr, RC: gl.constexpr, BOX_R: gl.constexpr,
                          ROWS_PER_BLOCK: gl.constexpr, CONSUMERS: gl.constexpr, REGS: gl.constexpr,
                          IS_SPLIT: gl.constexpr, FP8: gl.constexpr = False, MODE: gl.constexpr = 0):
        DCW: gl.constexpr = desc_e.block_type.shape[1]
        NCH: gl.constexpr = D // DCW
        # the products' operand dtype: q's (and the rows'); fp16 for fp8 rows (e4m3 -> fp16 is one
        # instruction per two values, -> bf16 two more)
        dtype: gl.constexpr = gl.float16 if FP8 else desc_q.dtype
        e_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([_BN, DCW], desc_e.dtype)
        p_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([_G, _BN], dtype)
        e_bufs = gl.allocate_shared_memory(desc_e.dtype, [NCH, _BN, DCW], e_layout)
        p_bufs = gl.allocate_shared_memory(dtype, [CONSUMERS, _G, _BN], p_layout)
        if FP8:  # the queries as fp16, scaled by a power of two into its range (per consumer)
            q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([_G, DCW], gl.float16)
            q_bufs = gl.allocate_shared_memory(gl.float16, [CONSUMERS * NCH, _G, DCW], q_layout)
            s_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([_BN, DCW], gl.float16)
            slots: gl.constexpr = _RING if FP8 == 3 else (CONSUMERS * 3 if FP8 == 2 else 1)
            scratch = gl.allocate_shared_memory(gl.float16, [slots, _BN, DCW], s_layout)
        else:
            q_bufs = gl.allocate_shared_memory(desc_q.dtype, [CONSUMERS * NCH, _G, DCW], desc_q.layout)
            scratch = q_bufs  # unused
        e_ready = gl.allocate_shared_memory(gl.int64, [NCH, 1], mbarrier.MBarrierLayout())
        e_empty = gl.allocate_shared_memory(gl.int64, [NCH, 1], mbarrier.MBarrierLayout())
        q_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        mbarrier.init(q_ready, count=1)
        for i in gl.static_range(NCH):
            mbarrier.init(e_ready.index(i), count=1)
            mbarrier.init(e_empty.index(i), count=CONSUMERS)  # every consumer reads every chunk
        if FP8 == 3:  # the shared fp16 ring
            r_ready = gl.allocate_shared_memory(gl.int64, [_RING, 1], mbarrier.MBarrierLayout())
            r_empty = gl.allocate_shared_memory(gl.int64, [_RING, 1], mbarrier.MBarrierLayout())
            for i in gl.static_range(_RING):
                mbarrier.init(r_ready.index(i), count=1)
                mbarrier.init(r_empty.index(i), count=CONSUMERS)
        else:
            r_ready = e_ready  # unused
            r_empty = e_empty
        pargs = (desc_e, desc_q, e_bufs, q_bufs, e_ready, e_empty, q_ready, BLOCK_TABLES, SEQ_LENS, stride_bt,
                 num_splits, nb, scratch, r_ready, r_empty)
        cargs = (Out, O_PART, LSE_PART, SEQ_LENS, e_bufs, q_bufs, e_ready, e_empty, q_ready, stride_ot,
                 stride_oh, num_heads, num_splits, qk_scale, ROW_SCALES, BLOCK_TABLES, stride_bt, stride_sc,
                 stride_sb, stride_sr, q_bufs, scratch, Q, stride_qh, r_ready, r_empty)
        # one branch per consumer count: warp_specialize takes its partitions as written
        if CONSUMERS == 1:
            gl.warp_specialize([(_producer, (pargs, RC, BOX_R, ROWS_PER_BLOCK, D, CONSUMERS, FP8)),
                                (_consumer, (cargs, p_bufs.index(0), 0, D, RC, ROWS_PER_BLOCK, IS_SPLIT, FP8,
                                              MODE))], [4], [REGS])
        elif CONSUMERS == 2:
            gl.warp_specialize([(_producer, (pargs, RC, BOX_R, ROWS_PER_BLOCK, D, CONSUMERS, FP8)),
                                (_consumer, (cargs, p_bufs.index(0), 0, D, RC, ROWS_PER_BLOCK, IS_SPLIT, FP8,
                                              MODE)),
                                (_consumer, (cargs, p_bufs.index(1), 1, D, RC, ROWS_PER_BLOCK, IS_SPLIT, FP8,
                                              MODE))],
                               [4, 4], [REGS, REGS])
        else:
            gl.warp_specialize([(_producer, (pargs, RC, BOX_R, ROWS_PER_BLOCK, D, CONSUMERS, FP8)),
                                (_consumer, (cargs, p_bufs.index(0), 0, D, RC, ROWS_PER_BLOCK, IS_SPLIT, FP8,
                                              MODE)),
                                (_consumer, (cargs, p_bufs.index(1), 1, D, RC, ROWS_PER_BLOCK, IS_SPLIT, FP8,
                                              MODE)),
                                (_consumer, (cargs, p_bufs.index(2), 2, D, RC, ROWS_PER_BLOCK, IS_SPLIT, FP8,
                                              MODE))],
                               [4, 4, 4], [REGS, REGS, REGS])
# fmt: on

REGS = {1: 240, 2: 240, 3: 160}  # per consumer thread: the register file holds them and the producer


def _fp8_mode(fp8: bool, form: str | None = None) -> int:
    """The kernel's FP8 constexpr: 0 bf16/fp16 rows; for fp8 rows ``form`` (default: as
    FP8_PRODUCER_CONVERTS and FP8_VALUES_SMEM say) "registers" 1, "ring" 2, "producer" 3."""
    if not fp8:
        return 0
    if form is None:
        form = "producer" if FP8_PRODUCER_CONVERTS else "ring" if FP8_VALUES_SMEM else "registers"
    return {"registers": 1, "ring": 2, "producer": 3}[form]


def num_splits_for(num_seqs: int, num_rows: int, device: torch.device, split_bytes: int = 0) -> int:
    """Row splits per sequence: one CTA per SM, so pick the split that needs the fewest waves of
    CTAs per unit of work, counting what each extra split costs (its partial results written
    and merged: about 3% of a split's rows at Whisper's 1500 x 1280). ``split_bytes``: one
    sequence's partials per split (H * (d + 1) float32); the splits' partials stay within
    SPLIT_PARTIALS_MAX_BYTES (absorbed rows are d_model wide: at 2,560 verification tokens of
    Whisper large, 6 splits were 1.4 GiB)."""
    sms = sm_count(device)
    tiles = max(1, triton.cdiv(num_rows, BLOCK_N))
    most = min(tiles, 16)
    if split_bytes:
        most = max(1, min(most, SPLIT_PARTIALS_MAX_BYTES // (num_seqs * split_bytes)))
    best, best_cost = 1, None
    for s in range(1, most + 1):
        cost = triton.cdiv(num_seqs * s, sms) / s + (0.03 * s if s > 1 else 0.0)
        if best_cost is None or cost < best_cost - 1e-9:
            best, best_cost = s, cost
    return best


_MODE = 0  # debug probes: 1 = consumers do no math (load throughput alone)


def shared_kv_attention(
    q, rows, block_tables, seq_lens, scale: float, num_splits: int | None = None, row_scales=None
):
    """shared_kv.shared_kv_attention with one query token per block-table row (``supports`` checked;
    token b reads block_tables[b] and seq_lens[b]; fp8 rows come with row_scales [C, NB, RC]):
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
        num_splits = num_splits_for(
            num_seqs, block_tables.shape[1] * rows_per_block, q.device, split_bytes=h * (d + 1) * 4
        )
    if num_splits > 1:
        o_part = torch.empty((tq, h, num_splits, d), device=q.device, dtype=torch.float32)
        lse_part = torch.empty((tq, h, num_splits), device=q.device, dtype=torch.float32)
    else:
        o_part = lse_part = out  # unused
    box = min(rc, BLOCK_N)
    fp8 = row_scales is not None
    dc = DC_FP8 if fp8 else DC
    flat = rows.as_strided((c * nb * rc, d), (d, 1))
    desc = TensorDescriptor(flat, [c * nb * rc, d], [d, 1], [box, dc], shared_layout([box, dc], rows.dtype))
    # q [B, H, d] is a view of [H, B, d]: seen as [H, B * d], a [GROUP, DC] box is GROUP heads' chunk
    q_flat = q.as_strided((h, tq * d), (tq * d, 1))
    desc_q = TensorDescriptor(
        q_flat, [h, tq * d], [tq * d, 1], [GROUP, dc], shared_layout([GROUP, dc], q.dtype)
    )
    launched = (_guard_fp8 if fp8 else _guard).launch(
        _shared_kv_kernel, (num_seqs, num_splits),
        desc, desc_q, out, o_part, lse_part, block_tables, seq_lens,
        row_scales if fp8 else seq_lens,  # never read without FP8
        q,  # fp8: the consumers load it (as fp16)
        out.stride(0), out.stride(1), block_tables.stride(0), *(row_scales.stride() if fp8 else (0, 0, 0)),
        q.stride(1),
        h, num_splits, nb, float(scale) * LOG2E,
        D=d, RC=rc, BOX_R=box, ROWS_PER_BLOCK=rows_per_block, CONSUMERS=consumers, REGS=REGS[consumers],
        IS_SPLIT=num_splits > 1, FP8=_fp8_mode(fp8), num_warps=4, MODE=_MODE,
    )  # fmt: skip
    if not launched:
        return None
    if num_splits > 1:
        merge_rows(o_part, lse_part, out)
    return out


def compile_offline(d: int, heads: int, rc: int = 16, rows_per_block: int = 1024, split: bool = False,
                    dtype: torch.dtype = torch.bfloat16, fp8: bool = False,
                    form: str | None = None):  # fmt: skip
    """The kernel compiled for sm_90 without a GPU (``gluon_support.compile_sm90``; CPU tests);
    ``fp8``: the variant for e4m3 rows (q and the output in ``dtype``) in this ``form``
    (``_fp8_mode``)."""
    box = min(rc, BLOCK_N)
    consumers = triton.cdiv(heads, GROUP)
    row_dtype, dc = (torch.float8_e4m3fn, DC_FP8) if fp8 else (dtype, DC)
    sig = dict(desc_e=desc_type(row_dtype, [box, dc]), desc_q=desc_type(dtype, [GROUP, dc]),
               Out=ptr_type(dtype), O_PART="*fp32", LSE_PART="*fp32", BLOCK_TABLES="*i32", SEQ_LENS="*i32",
               ROW_SCALES="*fp32", Q=ptr_type(dtype),
               stride_ot="i32", stride_oh="i32", stride_bt="i32", stride_sc="i32", stride_sb="i32",
               stride_sr="i32", stride_qh="i32", num_heads="i32", num_splits="i32", nb="i32",
               qk_scale="fp32")  # fmt: skip
    consts = dict(D=d, RC=rc, BOX_R=box, ROWS_PER_BLOCK=rows_per_block, CONSUMERS=consumers,
                  REGS=REGS[consumers], IS_SPLIT=split, FP8=_fp8_mode(fp8, form), MODE=0)  # fmt: skip
    return compile_sm90(_shared_kv_kernel, sig, consts)
