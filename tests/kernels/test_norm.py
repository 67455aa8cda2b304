"""Triton norm kernels vs encdec_kernels.reference, on the CPU through the Triton interpreter."""

from __future__ import annotations

import pytest
import torch

from encdec_kernels import reference
from tests.kernels.cases import poisoned_allocations, rel_err

# The interpreter rounds float32 -> bfloat16 toward zero (the GPU: to nearest even), so bf16
# results may differ from torch by one bf16 ulp (2**-8 relative).
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
SUM_RTOL = {torch.float32: 0.0, torch.float16: 0.0, torch.bfloat16: 2**-7}  # x + residual: exact / 1 ulp
SHAPES = [(3, 5, 40), (4, 1280), (2, 1000), (7, 1)]  # [..., C]: 3-dim, Whisper d_model, odd C, C = 1


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


def _inputs(shape, dtype, gen, bias=True):
    c = shape[-1]
    x = (torch.randn(shape, generator=gen) * 3 + 1).to(dtype)
    residual = torch.randn(shape, generator=gen).to(dtype)
    weight = (torch.randn(c, generator=gen) * 0.5 + 1).to(dtype)
    b = torch.randn(c, generator=gen).to(dtype) if bias else None
    return x, residual, weight, b


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16], ids=lambda v: str(v).removeprefix("torch.")
)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda v: str(v).removeprefix("torch."))
@pytest.mark.parametrize("has_bias", [True, False])
def test_layer_norm(norm, gen, dtype, shape, has_bias):
    x, residual, weight, bias = _inputs(shape, dtype, gen, has_bias)
    ref = reference.layer_norm(x, weight, bias, 1e-5)
    ref_n, ref_s = reference.add_layer_norm(x, residual, weight, bias, 1e-5)
    with poisoned_allocations():
        out = norm.layer_norm(x, weight, bias, 1e-5)
        out_n, out_s = norm.add_layer_norm(x, residual, weight, bias, 1e-5)
    assert out.dtype == dtype and out.shape == x.shape
    if shape[-1] == 1:  # LayerNorm of one element is exactly the bias (or 0)
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(out_n, ref_n)
    else:
        assert rel_err(out, ref) < TOL[dtype]
        assert rel_err(out_n, ref_n) < TOL[dtype]
    torch.testing.assert_close(out_s, ref_s, rtol=SUM_RTOL[dtype], atol=0)


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16], ids=lambda v: str(v).removeprefix("torch.")
)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda v: str(v).removeprefix("torch."))
def test_rms_norm(norm, gen, dtype, shape):
    x, residual, weight, _ = _inputs(shape, dtype, gen)
    ref = reference.rms_norm(x, weight, 1e-6)
    ref_n, ref_s = reference.add_rms_norm(x, residual, weight, 1e-6)
    with poisoned_allocations():
        out = norm.rms_norm(x, weight, 1e-6)
        out_n, out_s = norm.add_rms_norm(x, residual, weight, 1e-6)
    assert out.dtype == dtype and out.shape == x.shape
    assert rel_err(out, ref) < TOL[dtype]
    assert rel_err(out_n, ref_n) < TOL[dtype]
    torch.testing.assert_close(out_s, ref_s, rtol=SUM_RTOL[dtype], atol=0)


def test_float32_weight_with_bf16_activations(norm, gen):
    x, residual, _, _ = _inputs((3, 64), torch.bfloat16, gen)
    weight = torch.randn(64, generator=gen)
    assert rel_err(norm.rms_norm(x, weight, 1e-6), reference.rms_norm(x, weight, 1e-6)) < 1e-2


def test_empty_rows(norm):
    x = torch.empty(0, 16)
    assert norm.layer_norm(x, torch.ones(16), None, 1e-5).shape == (0, 16)


BAD = {
    "int x": lambda x, r, w, b: (x.long(), r, w, b),
    "x not contiguous": lambda x, r, w, b: (x.t(), r, w, b),
    "weight shape": lambda x, r, w, b: (x, r, w[:-1], b),
    "bias shape": lambda x, r, w, b: (x, r, w, b[:-1]),
    "residual shape": lambda x, r, w, b: (x, r[:-1], w, b),
    "residual dtype": lambda x, r, w, b: (x, r.double(), w, b),
    "C too large": lambda x, r, w, b: (torch.zeros(1, 40000), torch.zeros(1, 40000), torch.ones(40000), None),
}


@pytest.mark.parametrize("bad", list(BAD))
def test_rejects_bad_inputs(norm, gen, bad):
    x, r, w, b = BAD[bad](*_inputs((4, 8), torch.float32, gen))
    with pytest.raises(ValueError):
        if bad.startswith("residual"):
            norm.add_layer_norm(x, r, w, b, 1e-5)
        else:
            norm.layer_norm(x, w, b, 1e-5)
