"""Triton matrix-vector products for one-row activations (batch-1 decoding), and for a few rows
(up to ``FEW_ROWS``: a batch-1 speculative verification step's K + 1 tokens), with an optional
fused residual add + LayerNorm/RMSNorm before and activation after.

At one row a linear layer is a weight read: ``y = act(x @ W^T + b)`` reads W [N, K] once.
cuBLAS picks a narrow tile for that shape (20 programs for a 1280 x 1280 weight), which leaves
most SMs idle; here every program reads a few whole weight
rows (BLOCK_N x K, 16-byte loads along K, all issued before any is summed), so several
hundred programs keep the memory system busy. With programmatic dependent launch (encdec_kernels/pdl.py)
the weights (and the bias and norm weights) are read before waiting for the previous kernel, so a
layer's weight read overlaps the kernel before it. After the wait only x's loads and the sums are
left: each thread first adds up the products it holds (K's chunks), so a weight row's sum crosses
threads once (5 shuffles and one barrier), not once per chunk.

``norm_gemv`` also takes the pending residual of a pre-norm layer: every program forms
``s = x + residual`` (rounded to x's dtype), its LayerNorm/RMSNorm statistics and the normalised
row (rounded to x's dtype, as ``encdec_kernels.norm`` hands it to the linear layer) and multiplies
that; program 0 writes ``s``. One kernel instead of a norm and a matrix-vector product. Given
``kv_store`` (a self-attention's [q | k | v] projection), the kernel also writes y's k and v parts
into the paged cache slots, as ``store_kv`` would: one kernel fewer a decoder layer.
Sums are float32; the output is in x's dtype.

Up to ``GEMV_ROWS`` rows (a batch-1 verification step's K + 1 for K up to 7) take the same kernel:
each program holds its weight rows as for one row and takes x's rows one after the other (each
row's loads issued while the row before is multiplied), each thread adding up its own products of
the row; then all rows' sums cross the threads together (one barrier for all rows, not one a row:
compiled for sm_90, 5 rows of a 1280 x 1280 weight took 3 barriers and 936 instructions a thread
with Triton 3.9 and 4 and 904 with Triton 3.6, against 9 and 976, 14 and 976 with a reduction a
row; with each vector's products in one FMA chain and bfloat16 widened by a shift, 712 with
Triton 3.6). At several rows the kernel is bound by its instructions, not its weight reads
(benchmarks/README.md, seventeenth session). The weights are read once and every row's result
is bit for bit its one-row result (a verification step's linear layers give each row what a plain
step gives it). With a norm, several
rows go through the norm kernel first and then through this kernel without its norm prologue
(fused, the prologue's per-row statistics made it slower than cuBLAS): each row's result is then
bit for bit that of its normed row alone. More rows (up to FEW_ROWS) take ``_rows_kernel``: still
one weight read, but each program multiplies its BLOCK_N weight rows with all the rows at once on
the tensor cores (``tl.dot``, the rows padded to 16), K in tiles (Triton pipelines the tiles' loads
through shared memory), and where a weight has too few rows for enough programs, K is split over
several (each tile's last program sums the partials, in split order). With a pre-norm it first
takes each row's statistics in one pass over x (LayerNorm: per-tile mean and centred sum of
squares, merged); it waits for the previous kernel (PDL) before its first load, so its weights do
not stream in early as the one-row kernel's do. Unsplit, it lost to cuBLAS on an H100
(benchmarks/README.md, eleventh session), and split it still does (W5's verification steps, 2 to 5
rows a linear, on an H200: 1.26x against 1.58x on cuBLAS, twelfth session). A row's result there is
not bit-for-bit its one-row result (a different summation order). The models send the one-row
kernel up to 5 rows and this one none by default (``encdec_kernels.GEMV_MAX_ROWS``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from encdec_kernels.checks import check_tensor
from encdec_kernels.norm import add_norm
from encdec_kernels.pdl import pdl_launch

__all__ = ["gemv", "norm_gemv", "compile_offline", "ACTIVATIONS", "FEW_ROWS"]

# transformers ACT2FN names computed in the kernel epilogue (on the float32 sum, before rounding)
ACTIVATIONS = {None: 0, "relu": 1, "gelu": 2, "gelu_new": 3, "gelu_pytorch_tanh": 3}
MAX_NORM_K = 16384  # the norm prologue holds one row in registers (per program)
FEW_ROWS = 16  # the most rows of x the kernels take (the tensor-core tile's 16 rows)


# fmt: off
@triton.jit
def _act(y, ACT: tl.constexpr):
    if ACT == 1:
        y = tl.maximum(y, 0.0)
    elif ACT == 2:  # exact GELU (erf), as torch.nn.functional.gelu
        y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
    elif ACT == 3:  # tanh approximation: 0.5 y (1 + tanh(sqrt(2/pi) (y + 0.044715 y^3)))
        u = 0.7978845608028654 * (y + 0.044715 * y * y * y)
        y = 0.5 * y * (2.0 - 2.0 / (tl.exp(2.0 * u) + 1.0))  # 1 + tanh(u), overflow-safe
    return y


@triton.jit
def _widen(x):
    """x as float32. bfloat16 is float32's upper half, so a shift (or, for the upper half of a
    32-bit register holding two, a mask) widens it: one instruction, where Triton's conversion
    extracts the half and shifts it (two for every other element: 8% of a 5-row call's
    instructions at K 1,280, Triton 3.6 for sm_90)."""
    if x.dtype == tl.bfloat16:
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    return x.to(tl.float32)


@triton.jit
def _halves(x, A: tl.constexpr, B: tl.constexpr, C: tl.constexpr, D: tl.constexpr, N: tl.constexpr):
    """x [A, B, C, D, N] -> (x[..., 0::2], x[..., 1::2]), [A, B, C, D, N / 2] each (a thread's
    own elements: no data moves)."""
    return tl.split(tl.reshape(x, [A, B, C, D, N // 2, 2]))


@triton.jit
def _eighths(x, A: tl.constexpr, B: tl.constexpr, C: tl.constexpr, D: tl.constexpr):
    """x [A, B, C, D * 8] (8-element vectors, a thread's own) -> its 8 [A, B, C, D] slices."""
    x = tl.reshape(x, [A, B, C, D, 8])
    x0, x1 = _halves(x, A, B, C, D, 8)
    x00, x01 = _halves(x0, A, B, C, D, 4)
    x10, x11 = _halves(x1, A, B, C, D, 4)
    a, b = _halves(x00, A, B, C, D, 2)
    c, d = _halves(x01, A, B, C, D, 2)
    e, f = _halves(x10, A, B, C, D, 2)
    g, h = _halves(x11, A, B, C, D, 2)
    return (tl.reshape(a, [A, B, C, D]), tl.reshape(b, [A, B, C, D]), tl.reshape(c, [A, B, C, D]),
            tl.reshape(d, [A, B, C, D]), tl.reshape(e, [A, B, C, D]), tl.reshape(f, [A, B, C, D]),
            tl.reshape(g, [A, B, C, D]), tl.reshape(h, [A, B, C, D]))


@triton.jit
def _chain8(w8, x8):
    """The sum of the 8 slices' products as one chain of FMAs (``tl.sum`` adds a thread's elements
    as a tree; Triton 3.9 then fuses only the leaves' products into FMAs)."""
    acc = w8[0] * x8[0]
    for i in tl.static_range(1, 8):
        acc = tl.fma(w8[i], x8[i], acc)
    return acc


@triton.jit
def _row_sum(v):
    """The sum of a [CHUNKS, CHUNK] tile (a whole row of K): the chunks within each thread first."""
    return tl.sum(tl.sum(v, 0), 0)


@triton.jit
def _gemv_kernel(X, RES, NW, NB, SUM, W, B, Y, K_CACHE, V_CACHE, SLOTS, N, stride_wn, eps,
                 K: tl.constexpr, M: tl.constexpr, M_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                 CHUNK: tl.constexpr, CHUNKS: tl.constexpr, REP: tl.constexpr, T: tl.constexpr,
                 VEC: tl.constexpr,
                 NORM: tl.constexpr,  # 0: none, 1: LayerNorm, 2: RMSNorm of (x [+ residual])
                 HAS_RESIDUAL: tl.constexpr, HAS_NORM_BIAS: tl.constexpr, HAS_BIAS: tl.constexpr,
                 ACT: tl.constexpr, AHEAD: tl.constexpr,
                 STORE_KV: tl.constexpr,  # the width of q (= of k, of v): y's k and v parts also
                 # go into cache slot SLOTS[m] (-1: none) of K_CACHE / V_CACHE [slots, STORE_KV]
                 PDL: tl.constexpr):
    """y[m, n] = act(sum_k h[m, k] W[n, k] + b[n]) for BLOCK_N rows n and each of the M rows m of x
    [M, K] (contiguous); h = x, or the norm of x (+ res), row by row. K is laid out as [CHUNKS,
    CHUNK] (CHUNKS a power of two, the tail masked); within a chunk, T threads each hold VEC
    consecutive elements (one 16-byte load) REP times. The weight rows are read once for all M
    rows. Each thread first adds up the products it holds, for every row in turn (no cross-thread
    work between rows; the chunk is viewed as [REP, T, VEC] for that, the layout Triton gives the
    [CHUNKS, CHUNK] load); then the rows' [M_PAD, BLOCK_N] partial sums cross the threads together
    (one barrier for all rows). Each row's sum is the one a one-row call makes: bit for bit the same."""
    pid = tl.program_id(0)
    if PDL:  # let the next kernel launch now: it waits (gdc_wait) before touching our outputs
        tl.extra.cuda.gdc_launch_dependents()
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    # [CHUNKS, CHUNK]: K's contiguous axis last and alone, so that Triton's layout puts the threads
    # along it in 16-byte loads whatever its version (split into [.., T, VEC] axes, Triton 3.6 put
    # threads on the outer axes: 1.6x the SASS and a third slower on an H100)
    kk = tl.arange(0, CHUNKS)[:, None] * CHUNK + tl.arange(0, CHUNK)[None, :]
    k_mask = kk < K
    # the program's weight rows, all of K at once: weights never depend on the previous kernel,
    # so with PDL they stream in while it still runs
    w = tl.load(W + offs_n.to(tl.int64)[:, None, None] * stride_wn + kk[None, :, :],
                mask=n_mask[:, None, None] & k_mask[None, :, :], other=0.0)
    # the bias and the norm's weights too: loaded after the sums, they would add a memory latency
    # to every call's critical path
    if HAS_BIAS:
        b = tl.load(B + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    if NORM != 0:
        nw = tl.load(NW + kk, mask=k_mask, other=0.0)
        if HAS_NORM_BIAS:
            nb = tl.load(NB + kk, mask=k_mask, other=0.0)
    rows = tl.arange(0, M_PAD)
    if PDL:  # the previous kernel's writes (x, residual) are complete and visible after this
        tl.extra.cuda.gdc_wait()
    if STORE_KV > 0:  # every row's slot, loaded now: it arrives while the rows are summed
        slot = tl.load(SLOTS + rows, mask=rows < M, other=-1)
    # rows are loaded AHEAD (1 or 2) ahead: row m + AHEAD's load is in flight while row m is
    # multiplied
    x_a = tl.load(X + kk, mask=k_mask, other=0.0)
    if HAS_RESIDUAL:
        r_a = tl.load(RES + kk, mask=k_mask, other=0.0)
    if AHEAD > 1 and M > 1:
        x_b = tl.load(X + K + kk, mask=k_mask, other=0.0)
        if HAS_RESIDUAL:
            r_b = tl.load(RES + K + kk, mask=k_mask, other=0.0)
    if VEC == 8:  # the weights' 8 slices, once for all rows; after x's loads are issued (their
        # latency then overlaps the weights' last arrivals, as when the products used w itself)
        w8 = _eighths(_widen(w), BLOCK_N, CHUNKS, REP, T)
    for m in tl.static_range(M):
        at = m * K + kk
        if NORM == 0:
            h = _widen(x_a)
        else:  # (the norm's prologue compiles to fewer instructions with Triton's conversion)
            h = x_a.to(tl.float32)
        if HAS_RESIDUAL:
            r = r_a.to(tl.float32)
        if AHEAD > 1:
            if m + 1 < M:
                x_a = x_b
                if HAS_RESIDUAL:
                    r_a = r_b
            if m + 2 < M:
                x_b = tl.load(X + at + 2 * K, mask=k_mask, other=0.0)
                if HAS_RESIDUAL:
                    r_b = tl.load(RES + at + 2 * K, mask=k_mask, other=0.0)
        elif m + 1 < M:
            x_a = tl.load(X + at + K, mask=k_mask, other=0.0)
            if HAS_RESIDUAL:
                r_a = tl.load(RES + at + K, mask=k_mask, other=0.0)
        if NORM != 0:  # the norm of the whole row, as encdec_kernels/norm.py computes it
            if HAS_RESIDUAL:
                s = (h + r).to(SUM.dtype.element_ty)
                if pid == 0:
                    tl.store(SUM + at, s, mask=k_mask)
                h = s.to(tl.float32)
            if NORM == 1:
                h = tl.where(k_mask, h - _row_sum(h) / K, 0.0)
            rstd = 1.0 / tl.sqrt(_row_sum(h * h) / K + eps)
            h = h * rstd * nw.to(tl.float32)
            if HAS_NORM_BIAS:
                h += nb.to(tl.float32)
            # rounded like the norm's output
            h = tl.where(k_mask, h.to(Y.dtype.element_ty).to(tl.float32), 0.0)
        # this thread's part of the row's sums, [BLOCK_N, T]: each 16-byte vector's products in
        # one chain of FMAs, then the vectors of a chunk, then the chunks (summed chunk by chunk
        # first, the products took a multiply and an add each: 12% more instructions a row at
        # K 1,280, 16% at 5,120, Triton 3.6 for sm_90; the chain written out, not tl.sum's tree:
        # Triton 3.9 fused only the tree's leaves, 824 instructions against 744 for 5 rows of qkv)
        if VEC == 8:
            part = _chain8(w8, _eighths(h[None], 1, CHUNKS, REP, T))
        else:
            part = tl.reshape(_widen(w) * h[None], [BLOCK_N, CHUNKS, REP, T, VEC])
            part = tl.sum(part, 4)
        part = tl.sum(tl.sum(part, 2), 1)
        if m == 0:
            acc = tl.where(rows[:, None, None] == 0, part[None], 0.0)
        else:
            acc = tl.where(rows[:, None, None] == m, part[None], acc)
    y = tl.sum(acc, 2)  # [M_PAD, BLOCK_N]: every row's sums cross the threads at once
    if HAS_BIAS:
        y += b[None, :]
    y = _act(y, ACT).to(Y.dtype.element_ty)
    m_mask = rows < M
    tl.store(Y + rows[:, None] * N + offs_n[None, :], y, mask=m_mask[:, None] & n_mask[None, :])
    if STORE_KV > 0:  # the layer's new K/V rows, as store_kv writes them from y
        col = offs_n - STORE_KV  # k: [0, STORE_KV), v: [STORE_KV, 2 STORE_KV)
        is_v = col >= STORE_KV
        at_kv = slot[:, None] * STORE_KV + tl.where(is_v, col - STORE_KV, col)[None, :]
        ok = (m_mask & (slot >= 0))[:, None] & n_mask[None, :]
        tl.store(K_CACHE + at_kv, y.to(K_CACHE.dtype.element_ty),
                 mask=ok & ((col >= 0) & (col < STORE_KV))[None, :])
        tl.store(V_CACHE + at_kv, y.to(V_CACHE.dtype.element_ty), mask=ok & is_v[None, :])

@triton.jit
def _tile_sum(X, RES, SUM, at, km, HAS_RESIDUAL: tl.constexpr, store):
    """x (+ residual, rounded to its dtype) at offsets ``at`` as float32; ``store``: write the sum."""
    s = tl.load(X + at, mask=km, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        s = (s + tl.load(RES + at, mask=km, other=0.0).to(tl.float32)).to(SUM.dtype.element_ty)
        if store:
            tl.store(SUM + at, s, mask=km)
        s = s.to(tl.float32)
    return s


@triton.jit
def _rows_kernel(X, RES, NW, NB, SUM, W, B, Y, PART, COUNT, M, N, stride_wn, eps,
                 K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 SPLIT: tl.constexpr, K_SPLIT: tl.constexpr,
                 NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_NORM_BIAS: tl.constexpr,
                 HAS_BIAS: tl.constexpr, ACT: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr):
    """y[m, n] = act(sum_k h[m, k] W[n, k] + b[n]) for the M (<= BLOCK_M) rows of x [M, K] and
    BLOCK_N weight rows n; h = x, or the norm of x (+ res) row by row, rounded to x's dtype.

    Split K (SPLIT > 1, axis 1: K_SPLIT columns each): each program writes its float32 partial sums
    to its slice of PART [SPLIT, BLOCK_M, N] and counts itself in COUNT[tile]; the tile's last
    program adds the partials in split order (the same sum whichever program is last) and writes y,
    then sets the count back to 0 for the next call."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    if PDL:  # the next kernel may launch now; it waits before touching our outputs
        tl.extra.cuda.gdc_launch_dependents()
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_m = tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    kk = tl.arange(0, BLOCK_K)
    w_rows = W + offs_n.to(tl.int64)[:, None] * stride_wn
    if PDL:  # x and the residual are the previous kernel's outputs
        tl.extra.cuda.gdc_wait()
    if NORM != 0:  # each row's statistics in one pass over x: RMSNorm's sum of squares, or
        # LayerNorm's mean and centred sum of squares, tile by tile, each tile's (mean, centred sum)
        # merged into the running ones (Chan et al.'s pairwise update: no E[x^2] - mean^2 cancellation)
        total = tl.zeros([BLOCK_M], dtype=tl.float32)
        mean = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            km = m_mask[:, None] & (k0 + kk < K)[None, :]
            at = offs_m[:, None] * K + k0 + kk[None, :]
            s = _tile_sum(X, RES, SUM, at, km, HAS_RESIDUAL, (pid == 0) & (pid_k == 0))
            if NORM == 1:
                seen = k0 * 1.0  # values merged so far (all rows: the same K range)
                here = tl.minimum(K - k0, BLOCK_K) * 1.0
                tile_mean = tl.sum(s, 1) / here
                d = tl.where(km, s - tile_mean[:, None], 0.0)
                delta = tile_mean - mean
                mean += delta * (here / (seen + here))
                total += tl.sum(d * d, 1) + delta * delta * (seen * here / (seen + here))
            else:
                total += tl.sum(s * s, 1)
        rstd = 1.0 / tl.sqrt(total / K + eps)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_lo = pid_k * K_SPLIT
    for k0 in range(k_lo, tl.minimum(k_lo + K_SPLIT, K), BLOCK_K):
        k_mask = (k0 + kk) < K
        km = m_mask[:, None] & k_mask[None, :]
        at = offs_m[:, None] * K + k0 + kk[None, :]
        w = tl.load(w_rows + k0 + kk[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        if NORM == 0:
            h = tl.load(X + at, mask=km, other=0.0)
        else:
            s = _tile_sum(X, RES, SUM, at, km, HAS_RESIDUAL, False)
            if NORM == 1:
                s = s - mean[:, None]
            s = s * rstd[:, None] * tl.load(NW + k0 + kk, mask=k_mask, other=0.0).to(tl.float32)[None, :]
            if HAS_NORM_BIAS:
                s += tl.load(NB + k0 + kk, mask=k_mask, other=0.0).to(tl.float32)[None, :]
            h = tl.where(km, s, 0.0).to(Y.dtype.element_ty)  # rounded like the norm's output
        if IEEE:  # float32 (or the interpreter, whose numpy has no bfloat16: exact products too)
            acc += tl.dot(h.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
        else:
            acc += tl.dot(h, tl.trans(w))
    mn_mask = m_mask[:, None] & n_mask[None, :]
    at_y = offs_m[:, None] * N + offs_n[None, :]
    if SPLIT == 1:
        _rows_out(acc, B, Y, offs_n, n_mask, at_y, mn_mask, HAS_BIAS, ACT)
    else:
        # the partial goes to L2 (.cg), every thread's store before the count (the barrier, then
        # the count's release); the last program's loads come after its acquire
        tl.store(PART + pid_k * (BLOCK_M * N) + at_y, acc, mask=mn_mask, cache_modifier=".cg")
        tl.debug_barrier()
        if tl.atomic_add(COUNT + pid, 1, sem="acq_rel") == SPLIT - 1:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for s in tl.static_range(SPLIT):
                acc += tl.load(PART + s * (BLOCK_M * N) + at_y, mask=mn_mask, other=0.0,
                               cache_modifier=".cg")
            tl.store(COUNT + pid, 0)
            _rows_out(acc, B, Y, offs_n, n_mask, at_y, mn_mask, HAS_BIAS, ACT)


@triton.jit
def _rows_out(acc, B, Y, offs_n, n_mask, at_y, mn_mask, HAS_BIAS: tl.constexpr, ACT: tl.constexpr):
    """The few-row kernel's epilogue: + bias, the activation, rounded into y."""
    if HAS_BIAS:
        acc += tl.load(B + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    acc = _act(acc, ACT)
    tl.store(Y + at_y, acc.to(Y.dtype.element_ty), mask=mn_mask)
# fmt: on


def _tiles(n: int, k: int) -> tuple[int, int, int]:
    """(BLOCK_N, CHUNK, num_warps): two weight rows per program, K in 1024-element chunks, two
    warps (the best sum over the Whisper large-v3 decoder weights in ``benchmarks/sweep_kernels.py
    --only linear``); four warps above K 2,048, where each thread's products of several rows are a
    long chain: on an H100, 5 rows of fc2 (1280 x 5120) take 8.2 us against 10.3 with two warps,
    one row 4.8 either way (``benchmarks/ab_linear.py --sweep``). The tiles depend on the weight
    only, never on the rows: a row's sum is the same whatever the rows beside it."""
    return 2, min(1024, triton.next_power_of_2(k)), 4 if k > 2048 else 2


def _ahead(width: int) -> int:
    """Rows of x the one-row kernel loads ahead of the row it sums: two while a row (its padded
    width) takes few registers, one for wide rows (Whisper large's fc2, K 5120), where two would
    crowd the weight rows the program holds."""
    return 2 if width <= 2048 else 1


# up to this many rows take the one-row kernel, each row in turn against the weight rows it holds
# (bit for bit each row's one-row result); more take ``_rows_kernel``
GEMV_ROWS = 8
SPLIT_PROGRAMS = 256  # split K until about this many programs run (two waves on 132 SMs)


def _row_tiles(n: int, k: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, SPLIT) of ``_rows_kernel``: 16 weight rows a program (the
    tensor-core tile's least: 80 programs for a 1280-row weight), K in 256-element tiles, split
    over several programs while there are fewer than SPLIT_PROGRAMS (Whisper large's fc2, 1280 x
    5120: 3 splits; unsplit, its 80 programs read it at under a third of cuBLAS's rate on an H100)."""
    block_k = min(256, max(16, triton.next_power_of_2(k)))
    split = max(1, min(triton.cdiv(k, block_k), SPLIT_PROGRAMS // triton.cdiv(n, 16)))
    return 16, block_k, 2, split


_SPLIT_BUFFERS: dict = {}


def _split_buffers(device: torch.device, n: int, split: int, tiles: int):
    """(PART [split, 16, n] float32, COUNT [tiles] int32 zeros) for a split call; one pair per
    device and shape, reused: a call leaves its counts at 0, and the calls of a stream run one
    after the other (PDL: a kernel touches them only after its wait)."""
    key = (device, n, split, tiles)
    if key not in _SPLIT_BUFFERS:
        _SPLIT_BUFFERS[key] = (
            torch.empty((split, 16, n), device=device, dtype=torch.float32),
            torch.zeros(tiles, device=device, dtype=torch.int32),
        )
    return _SPLIT_BUFFERS[key]


def _check_kv_store(kv_store, n: int, m: int, x):
    """kv_store = (k_cache, v_cache, slot_mapping): caches [NB, BS, H, D] contiguous in a 16-bit or
    float32 dtype (fp8 rows need their scales over a whole row: store_kv), H * D = n / 3 (y is
    [q | k | v]), slot_mapping [M] int64 -> q's width."""
    k_cache, v_cache, slots = kv_store
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(name, c, 4, (torch.float32, torch.bfloat16, torch.float16), device=x.device,
                     contiguous=True, first="x")  # fmt: skip
    inner = k_cache.shape[2] * k_cache.shape[3]
    if v_cache.shape != k_cache.shape or 3 * inner != n:
        raise ValueError(f"kv_store caches must both be [NB, BS, H, D] with 3 H D = N = {n}, got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")  # fmt: skip
    check_tensor("slot_mapping", slots, 1, (torch.int64,), device=x.device, contiguous=True, first="x")
    if slots.shape != (m,):
        raise ValueError(f"slot_mapping must be [M={m}], got {tuple(slots.shape)}")
    return inner


def _launch(x, residual, norm_weight, norm_bias, eps, norm, weight, bias, activation, kv_store=None):
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"activation {activation!r} not supported; one of {sorted(a for a in ACTIVATIONS if a)}"
        )
    check_tensor("x", x, 2)
    m = x.shape[0]
    if not 1 <= m <= FEW_ROWS:
        raise ValueError(f"x must be 1 to {FEW_ROWS} rows [M, K], got shape {tuple(x.shape)}")
    check_tensor("weight", weight, 2, device=x.device, first="x")
    n, k = weight.shape
    if x.shape[1] != k:
        raise ValueError(f"x has {x.shape[1]} features but weight is [{n}, {k}]")
    if bias is not None:
        check_tensor("bias", bias, 1, device=x.device, first="x")
        if bias.shape != (n,):
            raise ValueError(f"bias must be [N={n}], got {tuple(bias.shape)}")
    if norm:
        if k > MAX_NORM_K:
            raise ValueError(f"norm_gemv supports K <= {MAX_NORM_K}, got {k}")
        for name, t in (("norm_weight", norm_weight), ("norm_bias", norm_bias)):
            if t is not None:
                check_tensor(name, t, 1, device=x.device, first="x")
                if t.shape != (k,):
                    raise ValueError(f"{name} must be [K={k}], got {tuple(t.shape)}")
        if residual is not None:
            check_tensor("residual", residual, 2, device=x.device, first="x")
            if residual.shape != x.shape or residual.dtype != x.dtype:
                raise ValueError(f"residual must match x ({tuple(x.shape)} {x.dtype}), got "
                                 f"{tuple(residual.shape)} {residual.dtype}")  # fmt: skip
    rows_kernel = m > GEMV_ROWS
    store_kv = 0 if kv_store is None else _check_kv_store(kv_store, n, m, x)
    if store_kv and rows_kernel:
        raise ValueError(f"kv_store takes at most GEMV_ROWS = {GEMV_ROWS} rows, got {m}")
    if rows_kernel and weight.dtype != x.dtype:  # the tensor cores multiply like with like
        raise ValueError(f"weight must be x's dtype {x.dtype} for {m} rows, got {weight.dtype}")
    x = x.contiguous()
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if residual is not None:
        residual = residual.contiguous()
    if norm and 1 < m <= GEMV_ROWS:
        # Several rows with a norm: the norm kernel first, then the rows through the one-row
        # kernel without one. Fused, every program takes each row's statistics (three cross-warp
        # sums a row) and holds more registers: on an H100, 5 rows of Whisper large's qkv took
        # 22 us fused against 6.4 us unfused plus the norm's ~2.
        x, summed = add_norm(x, residual, norm_weight, norm_bias, eps, norm == 2)
        norm, residual, norm_bias = 0, None, None
    else:
        summed = torch.empty_like(x) if residual is not None else None
    pdl = pdl_launch(x)
    if rows_kernel:
        block_n, block_k, warps, split = _row_tiles(n, k)
        k_tiles, tiles = triton.cdiv(k, block_k), triton.cdiv(n, block_n)
        per_split = triton.cdiv(k_tiles, max(1, split))  # K tiles a program
        split = triton.cdiv(k_tiles, per_split)  # none left empty
        part, count = _split_buffers(x.device, n, split, tiles) if split > 1 else (y, y)
        # fmt: off
        _rows_kernel[(tiles, split)](
            x, residual if residual is not None else x, norm_weight if norm else x,
            norm_bias if norm_bias is not None else x, summed if summed is not None else y,
            weight, bias if bias is not None else weight, y, part, count, m, n, weight.stride(0),
            float(eps), K=k, BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT=split,
            K_SPLIT=per_split * block_k, NORM=norm,
            HAS_RESIDUAL=residual is not None, HAS_NORM_BIAS=norm_bias is not None,
            HAS_BIAS=bias is not None, ACT=ACTIVATIONS[activation],
            IEEE=x.dtype == torch.float32 or not x.is_cuda, num_warps=warps, **pdl,
        )
        # fmt: on
        return y, summed
    tiles = _gemv_tiles(n, k, m, weight.element_size())
    # fmt: off
    _gemv_kernel[(triton.cdiv(n, tiles["BLOCK_N"]),)](
        x, residual if residual is not None else x, norm_weight if norm else x,
        norm_bias if norm_bias is not None else x, summed if summed is not None else y,
        weight, bias if bias is not None else weight, y, *(kv_store or (y, y, y)), n, weight.stride(0),
        float(eps), K=k, **tiles, NORM=norm, HAS_RESIDUAL=residual is not None,
        HAS_NORM_BIAS=norm_bias is not None, HAS_BIAS=bias is not None, ACT=ACTIVATIONS[activation],
        STORE_KV=store_kv, **pdl,
    )
    # fmt: on
    return y, summed


def _gemv_tiles(n: int, k: int, m: int, weight_bytes: int) -> dict:
    """The one-row kernel's layout constants (and num_warps) for a weight [n, k] of ``weight_bytes``
    elements and m rows of x: K as [CHUNKS, CHUNK], a chunk as [REP, T, VEC] (T threads, VEC
    elements a 16-byte load)."""
    block_n, chunk, warps = _tiles(n, k)
    chunks = triton.next_power_of_2(triton.cdiv(k, chunk))
    vec = min(chunk, max(1, 16 // weight_bytes))
    threads = min(32 * warps, chunk // vec)
    return dict(M=m, M_PAD=triton.next_power_of_2(m), BLOCK_N=block_n, CHUNK=chunk, CHUNKS=chunks,
                REP=chunk // (threads * vec), T=threads, VEC=vec, AHEAD=_ahead(chunks * chunk),
                num_warps=warps)  # fmt: skip


def compile_offline(n: int, k: int, m: int = 1, norm: int = 0, residual: bool = False, bias: bool = True,
                    activation: str | None = None, kv_store: bool = False, dtype=torch.bfloat16):  # fmt: skip
    """The one-row kernel for a weight [n, k] and m rows, compiled for sm_90 without a GPU (Triton's
    own compiler; CPU tests read its PTX and ptxas' report): norm 1 LayerNorm (with its bias),
    2 RMSNorm; PDL on; pointers 16-byte aligned, as the engine's tensors are."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    t = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}[dtype]
    sig = dict.fromkeys(("X", "RES", "NW", "NB", "SUM", "W", "B", "Y", "K_CACHE", "V_CACHE"), t)
    sig.update(SLOTS="*i64", N="i32", stride_wn="i32", eps="fp32")
    tiles = _gemv_tiles(n, k, m, dtype.itemsize)
    warps = tiles.pop("num_warps")
    consts = dict(K=k, **tiles, NORM=norm, HAS_RESIDUAL=residual, HAS_NORM_BIAS=norm == 1, HAS_BIAS=bias,
                  ACT=ACTIVATIONS[activation], STORE_KV=n // 3 if kv_store else 0, PDL=True)  # fmt: skip
    sig.update(dict.fromkeys(consts, "constexpr"))
    aligned = {(i,): [["tt.divisibility", 16]] for i in range(13)}  # the pointers, N and the stride
    src = ASTSource(_gemv_kernel, sig, consts, aligned)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps))


def gemv(x, weight, bias=None, activation=None, kv_store=None):
    """act(x @ weight^T + bias) for x [M, K], M <= FEW_ROWS (one row: the one-row kernel);
    weight [N, K] (rows contiguous), bias [N]. ``kv_store`` (k_cache, v_cache, slot_mapping), for
    a self-attention's [q | k | v] projection of up to GEMV_ROWS rows: y's k and v parts also go
    into the caches' slots, as ``encdec_kernels.store_kv`` would write them (16-bit and float32
    caches)."""
    return _launch(x, None, None, None, 0.0, 0, weight, bias, activation, kv_store)[0]


def norm_gemv(
    x, residual, norm_weight, norm_bias, eps, is_rms, weight, bias=None, activation=None, kv_store=None
):
    """(act(norm(s) @ weight^T + bias), s) with s = x + residual (x itself when residual is None),
    row by row for x [M, K], M <= FEW_ROWS; norm: LayerNorm (norm_bias may be None) or, with
    is_rms, T5's RMSNorm. ``kv_store``: as for ``gemv``."""
    y, summed = _launch(
        x, residual, norm_weight, norm_bias, eps, 2 if is_rms else 1, weight, bias, activation, kv_store
    )
    return y, (x if residual is None else summed)
