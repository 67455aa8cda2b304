"""Constants, device helpers and the split-KV merge shared by the Triton attention kernels
(``varlen.py``, ``paged.py``, ``shared_kv.py``) and the Gluon ones (``flash_hopper.py``,
``shared_kv_hopper.py``). It imports none of them, so the kernel modules form no import loop.

- Softmax runs online (flash attention) in base 2. Raw scores s are turned into log2 units by
  one FMA together with the max subtraction, ``exp2(s * exp2_scale - m)``, so ``scale`` must be
  > 0; statistics and the output accumulator are float32.
- Decode kernels split the key range over several programs when too few programs would run
  (flash-decoding, ``num_kv_splits``); each split writes its partial output and the log2 of its
  softmax sum, and ``merge_splits_kernel`` combines them. Every launch parameter derives from
  tensor shapes and Python ints, never from tensor values, so the launches can be captured in a
  CUDA graph.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from encdec_kernels.pdl import pdl_launch

LOG2E = 1.4426950408889634  # 1 / ln(2): softmax in base 2, exp(x) == exp2(x * LOG2E)
NEG_INIT = tl.constexpr(-1.0e30)  # finite start for the running max: fully masked tiles never give inf - inf
MIN_DOT = tl.constexpr(16)  # tl.dot needs every tile dim >= 16
FP8_MAX = tl.constexpr(448.0)  # largest finite e4m3fn value (reference.FP8_MAX)

# Split-KV (flash-decoding) heuristic, see num_kv_splits.
SPLIT_PROGRAMS_PER_SM = 4  # split until ~4 programs per SM run: batch-1 Whisper cross = 24 splits x 20 heads
SPLIT_MAX = 64  # at most 64 splits (the merge reads all partials of a row as one tile)


@functools.lru_cache(maxsize=8)
def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: pretend a tiny GPU so small test shapes also take the split path
    return torch.cuda.get_device_properties(device).multi_processor_count


def num_kv_splits(
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
    target = per_sm * sm_count(device)
    if programs >= target:
        return 1
    tiles = max(1, triton.cdiv(max_keys, block_n))
    splits = max(1, min(triton.cdiv(target, programs), tiles, max_splits))
    return triton.cdiv(tiles, triton.cdiv(tiles, splits))


def tile_dim(d: int) -> int:
    """The head dim as a tile width: a power of two, at least MIN_DOT."""
    return max(MIN_DOT.value, triton.next_power_of_2(d))


def dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs: exact fp32 products ("ieee"), not TF32; 16-bit inputs ignore it.
    return "ieee" if dtype == torch.float32 else "tf32"


# Device code. Kept out of ruff format: Triton kernels read better with packed argument lists.
# fmt: off


@triton.jit
def load_rows(ptrs, rows, n_rows, offs_d, MASK_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
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
def scores(q, k, USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """q [BLOCK_M, BLOCK_D] . k [BLOCK_N, BLOCK_D]^T -> [BLOCK_M, BLOCK_N] float32 (unscaled).

    Without USE_DOT (a single query row, BLOCK_M == 1) a broadcast multiply + row sum.
    """
    if USE_DOT:
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    else:
        s = tl.sum(k.to(tl.float32) * q.to(tl.float32), 1)[None, :]
    return s


@triton.jit
def softmax_update(acc, m_i, l_i, s, exp2_scale, v, USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
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
def quantize_rows(x):
    """x [R, C] -> (x / s [R, C] float32 within +-FP8_MAX, s [R] float32): one scale per row,
    s = max|x| / FP8_MAX (1 for an all-zero row), as ``reference.quantize_rows``; the caller
    stores the first as e4m3 (round to nearest)."""
    xf = x.to(tl.float32)
    amax = tl.max(tl.abs(xf), 1)
    s = tl.where(amax > 0.0, amax / FP8_MAX, 1.0)
    return tl.clamp(xf / s[:, None], -FP8_MAX, FP8_MAX), s


@triton.jit(do_not_specialize=["num_splits"])
def merge_splits_kernel(O_PART, LSE_PART, Out, stride_ot, stride_oh, num_heads, num_splits, part_stride,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
                        PDL: tl.constexpr):
    """Merge the S = num_splits <= BLOCK_S partial results of one (token, head), columns
    [BLOCK_D * axis 1, + BLOCK_D): weights exp2(lse_s - max lse). A partial row holds part_stride
    floats."""
    if PDL:  # encdec_kernels/pdl.py
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


# fmt: on


def merge_rows(o_part, lse_part, out):
    """Merge split partial results of d-wide rows (shared_kv_attention's): o_part [Tq, H, S, d]
    float32, lse_part [Tq, H, S] (log2 of each split's softmax sum) -> out [Tq, H, d]."""
    tq, h, num_splits, d = o_part.shape
    merge_d = min(256, triton.next_power_of_2(d))
    merge_splits_kernel[(tq * h, triton.cdiv(d, merge_d))](
        o_part, lse_part, out, out.stride(0), out.stride(1), h, num_splits, d,
        HEAD_DIM=d, BLOCK_D=merge_d, BLOCK_S=max(16, triton.next_power_of_2(num_splits)),
        num_warps=4, **pdl_launch(out),
    )  # fmt: skip
