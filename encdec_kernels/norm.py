"""Triton LayerNorm / RMSNorm (+ fused residual add) over the last dim of [..., C] tensors.

Same signatures and semantics as ``encdec_kernels/reference.py``: statistics in float32, output in
x's dtype; the fused variants also return ``x + residual`` (rounded to x's dtype, and the norm
is taken of that rounded sum, exactly like the reference). One program normalises one row held
in registers, so C is limited to MAX_C.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from encdec_kernels.pdl import pdl_launch

__all__ = ["layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm", "add_norm"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_C = 32768  # one row lives in registers: 32768 floats = 32 per thread at 32 warps


# fmt: off
@triton.jit
def _norm_kernel(X, RES, W, B, Y, SUM,  # RES/SUM only with HAS_RESIDUAL, B only with HAS_BIAS
                 C, eps,
                 BLOCK_C: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr,
                 IS_RMS: tl.constexpr, PDL: tl.constexpr):
    """One row: y = (x - mean) * rstd * w + b (LayerNorm) or x * rstd * w (RMSNorm)."""
    if PDL:  # encdec_kernels/pdl.py
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    row = tl.program_id(0).to(tl.int64)  # rows * C can exceed int32
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    offs = row * C + cols
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(RES + offs, mask=mask, other=0.0).to(tl.float32)
        s = (x + r).to(SUM.dtype.element_ty)  # the sum in x's dtype, as torch's x + residual
        tl.store(SUM + offs, s, mask=mask)
        x = s.to(tl.float32)
    if IS_RMS:
        xc = x
    else:
        mean = tl.sum(x, 0) / C
        xc = tl.where(mask, x - mean, 0.0)
    var = tl.sum(xc * xc, 0) / C  # biased variance (LayerNorm) / mean square (RMSNorm)
    rstd = 1.0 / tl.sqrt(var + eps)
    y = xc * rstd * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
# fmt: on


def _warps(block_c: int, rows: int) -> int:
    """Warps a row: about 8 elements a thread, 1 to 32."""
    return min(max(block_c // 256, 1), 32)


def _check(name, t, like=None):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name} must have dtype in {[str(d) for d in SUPPORTED_DTYPES]}, got {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous; call .contiguous() on it")
    if like is not None and t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but x is on {like.device}; move all inputs to one device")


def add_norm(x, residual, weight, bias, eps, is_rms):
    """(norm(x [+ residual]), x + residual or None): LayerNorm (bias may be None) or, with is_rms,
    RMSNorm, row by row over the last dim."""
    _check("x", x)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must be [..., C] with C >= 1, got shape {tuple(x.shape)}")
    c = x.shape[-1]
    if c > MAX_C:
        raise ValueError(f"C = {c} is larger than the supported {MAX_C}; use encdec_kernels.reference")
    _check("weight", weight, x)
    if weight.shape != (c,):
        raise ValueError(f"weight must be [C={c}], got {tuple(weight.shape)}")
    if bias is not None:
        _check("bias", bias, x)
        if bias.shape != (c,):
            raise ValueError(f"bias must be [C={c}], got {tuple(bias.shape)}")
    if residual is not None:
        _check("residual", residual, x)
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(
                f"residual must match x ({tuple(x.shape)} {x.dtype}), got "
                f"{tuple(residual.shape)} {residual.dtype}"
            )
    y = torch.empty_like(x)
    summed = torch.empty_like(x) if residual is not None else None
    rows = x.numel() // c
    if rows:
        block_c = triton.next_power_of_2(c)
        # fmt: off
        _norm_kernel[(rows,)](
            x, residual if residual is not None else x, weight, bias if bias is not None else weight, y,
            summed if summed is not None else y, c, float(eps),
            BLOCK_C=block_c, HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None, IS_RMS=is_rms,
            num_warps=_warps(block_c, rows),
            **pdl_launch(x),
        )
        # fmt: on
    return y, summed


def layer_norm(x, weight, bias, eps):
    """LayerNorm over the last dim of x [..., C]; weight, bias: [C] (bias may be None)."""
    return add_norm(x, None, weight, bias, eps, False)[0]


def rms_norm(x, weight, eps):
    """T5's RMSNorm (no mean subtraction, no bias) over the last dim of x [..., C]."""
    return add_norm(x, None, weight, None, eps, True)[0]


def add_layer_norm(x, residual, weight, bias, eps):
    """(layer_norm(x + residual), x + residual) for x, residual [..., C]."""
    return add_norm(x, residual, weight, bias, eps, False)


def add_rms_norm(x, residual, weight, eps):
    """(rms_norm(x + residual), x + residual) for x, residual [..., C]."""
    return add_norm(x, residual, weight, None, eps, True)
