"""Triton matrix-vector products for one-row activations (batch-1 decoding), with an optional
fused residual add + LayerNorm/RMSNorm before and activation after.

At one row a linear layer is a weight read: ``y = act(x @ W^T + b)`` reads W [N, K] once.
cuBLAS picks a narrow tile for that shape (20 programs for a 1280 x 1280 weight), which leaves
most SMs idle; here every program reads a few whole weight
rows (BLOCK_N x K, 16-byte loads along K, all issued before any is summed), so several
hundred programs keep the memory system busy. With programmatic dependent launch (encdec_kernels/pdl.py)
the weights are read before waiting for the previous kernel, so a layer's weight read overlaps
the kernel before it.

``norm_gemv`` also takes the pending residual of a pre-norm layer: every program forms
``s = x + residual`` (rounded to x's dtype), its LayerNorm/RMSNorm statistics and the normalised
row (rounded to x's dtype, as ``encdec_kernels.norm`` hands it to the linear layer) and multiplies
that; program 0 writes ``s``. One kernel instead of a norm and a matrix-vector product.
Sums are float32; the output is in x's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from encdec_kernels.checks import check_tensor
from encdec_kernels.pdl import pdl_launch

__all__ = ["gemv", "norm_gemv", "ACTIVATIONS"]

# transformers ACT2FN names computed in the kernel epilogue (on the float32 sum, before rounding)
ACTIVATIONS = {None: 0, "relu": 1, "gelu": 2, "gelu_new": 3, "gelu_pytorch_tanh": 3}
MAX_NORM_K = 16384  # the norm prologue holds one row in registers (per program)


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
def _gemv_kernel(X, RES, NW, NB, SUM, W, B, Y, N, stride_wn, eps,
                 K: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, CHUNKS: tl.constexpr,
                 NORM: tl.constexpr,  # 0: none, 1: LayerNorm, 2: RMSNorm of (x [+ residual])
                 HAS_RESIDUAL: tl.constexpr, HAS_NORM_BIAS: tl.constexpr, HAS_BIAS: tl.constexpr,
                 ACT: tl.constexpr, PDL: tl.constexpr):
    """y[n] = act(sum_k h[k] W[n, k] + b[n]) for BLOCK_N rows n; h = x, or the norm of x (+ res).
    K is laid out as [CHUNKS, CHUNK] (CHUNKS a power of two, the tail masked)."""
    pid = tl.program_id(0)
    if PDL:  # let the next kernel launch now: it waits (gdc_wait) before touching our outputs
        tl.extra.cuda.gdc_launch_dependents()
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    kk = tl.arange(0, CHUNKS)[:, None] * CHUNK + tl.arange(0, CHUNK)[None, :]  # [CHUNKS, CHUNK]
    k_mask = kk < K
    # the program's weight rows, all of K at once: weights never depend on the previous kernel,
    # so with PDL they stream in while it still runs
    w = tl.load(W + offs_n.to(tl.int64)[:, None, None] * stride_wn + kk[None, :, :],
                mask=n_mask[:, None, None] & k_mask[None, :, :], other=0.0)
    if PDL:  # the previous kernel's writes (x, residual) are complete and visible after this
        tl.extra.cuda.gdc_wait()
    h = tl.load(X + kk, mask=k_mask, other=0.0).to(tl.float32)
    if NORM != 0:  # the norm of the whole row, as encdec_kernels/norm.py computes it
        if HAS_RESIDUAL:
            s = (h + tl.load(RES + kk, mask=k_mask, other=0.0).to(tl.float32)).to(SUM.dtype.element_ty)
            if pid == 0:
                tl.store(SUM + kk, s, mask=k_mask)
            h = s.to(tl.float32)
        if NORM == 1:
            h = tl.where(k_mask, h - tl.sum(tl.sum(h, 1), 0) / K, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(tl.sum(h * h, 1), 0) / K + eps)
        h = h * rstd * tl.load(NW + kk, mask=k_mask, other=0.0).to(tl.float32)
        if HAS_NORM_BIAS:
            h += tl.load(NB + kk, mask=k_mask, other=0.0).to(tl.float32)
        h = tl.where(k_mask, h.to(Y.dtype.element_ty).to(tl.float32), 0.0)  # rounded like the norm's output
    y = tl.sum(tl.sum(w.to(tl.float32) * h[None, :, :], 2), 1)
    if HAS_BIAS:
        y += tl.load(B + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    y = _act(y, ACT)
    tl.store(Y + offs_n, y.to(Y.dtype.element_ty), mask=n_mask)
# fmt: on


def _tiles(n: int, k: int) -> tuple[int, int, int]:
    """(BLOCK_N, CHUNK, num_warps): two weight rows per program, K in 1024-element chunks, two
    warps; the best sum over the Whisper large-v3 decoder weights in ``benchmarks/sweep_kernels.py
    --only linear``."""
    return 2, min(1024, triton.next_power_of_2(k)), 2


def _launch(x, residual, norm_weight, norm_bias, eps, norm, weight, bias, activation):
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"activation {activation!r} not supported; one of {sorted(a for a in ACTIVATIONS if a)}"
        )
    check_tensor("x", x, 2)
    if x.shape[0] != 1:
        raise ValueError(f"x must be one row [1, K], got shape {tuple(x.shape)}")
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
    x = x.contiguous()
    y = torch.empty((1, n), device=x.device, dtype=x.dtype)
    summed = torch.empty_like(x) if residual is not None else None
    block_n, chunk, warps = _tiles(n, k)
    pdl = pdl_launch(x)
    # fmt: off
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, residual if residual is not None else x, norm_weight if norm else x,
        norm_bias if norm_bias is not None else x, summed if summed is not None else y,
        weight, bias if bias is not None else weight, y, n, weight.stride(0), float(eps),
        K=k, BLOCK_N=block_n, CHUNK=chunk, CHUNKS=triton.next_power_of_2(triton.cdiv(k, chunk)),
        NORM=norm, HAS_RESIDUAL=residual is not None, HAS_NORM_BIAS=norm_bias is not None,
        HAS_BIAS=bias is not None, ACT=ACTIVATIONS[activation], num_warps=warps, **pdl,
    )
    # fmt: on
    return y, summed


def gemv(x, weight, bias=None, activation=None):
    """act(x @ weight^T + bias) for one row x [1, K]; weight [N, K] (rows contiguous), bias [N]."""
    return _launch(x, None, None, None, 0.0, 0, weight, bias, activation)[0]


def norm_gemv(x, residual, norm_weight, norm_bias, eps, is_rms, weight, bias=None, activation=None):
    """(act(norm(s) @ weight^T + bias), s) with s = x + residual (x itself and None when residual
    is None); norm: LayerNorm (norm_bias may be None) or, with is_rms, T5's RMSNorm."""
    y, summed = _launch(
        x, residual, norm_weight, norm_bias, eps, 2 if is_rms else 1, weight, bias, activation
    )
    return y, (x if residual is None else summed)
