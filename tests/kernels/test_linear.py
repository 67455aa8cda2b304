"""Triton one-row and few-row linear kernels (gemv, norm + gemv) vs encdec_kernels.reference, on the
CPU through the Triton interpreter."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import encdec_kernels
from encdec_kernels import reference
from tests.kernels.cases import TOL, poisoned_allocations, rel_err

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# [N, K]: odd sizes (masked rows and K tail), Whisper's d_model, a long K (fc2: several chunks)
SHAPES = [(37, 200), (300, 1280), (9, 5120)]
ACTS = [None, "relu", "gelu", "gelu_new"]


def _ids(v):
    return str(v).removeprefix("torch.")


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


def _weights(n, k, dtype, gen, bias=True):
    w = (torch.randn(n, k, generator=gen) / k**0.5).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    return w, b


@pytest.fixture(params=["gemv", "rows"])
def path(request, lin, monkeypatch):
    """Which kernel takes 2 to 8 rows: the one-row kernel row by row (the default) or the
    tensor-core few-row kernel (``GEMV_ROWS`` = 1: every call of 2 rows or more)."""
    if request.param == "rows":
        monkeypatch.setattr(lin, "GEMV_ROWS", 1)
    return request.param


def test_activation_names_match_dispatch(lin):
    assert set(lin.ACTIVATIONS) - {None} == encdec_kernels.GEMV_ACTIVATIONS


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("act", ACTS, ids=_ids)
def test_gemv(lin, gen, dtype, shape, act):
    n, k = shape
    x = torch.randn(1, k, generator=gen).to(dtype)
    w, b = _weights(n, k, dtype, gen, bias=act != "relu")  # relu cases run without bias
    with poisoned_allocations():
        out = lin.gemv(x, w, b, act)
    ref = reference.gemv(x, w, b, act)
    assert out.shape == (1, n) and out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("m", [2, 5, 16], ids=lambda m: f"m{m}")
@pytest.mark.parametrize(
    "shape,act", [((37, 200), "gelu"), ((9, 5120), None), ((300, 1280), "relu")], ids=_ids
)
def test_gemv_few_rows(lin, gen, path, dtype, m, shape, act):
    """2..16 rows (2..8 on either kernel, 16 on the tensor-core one): every row as the reference
    computes it, rows that differ (each its own scale) kept apart, no output element left
    unwritten."""
    n, k = shape
    x = (torch.randn(m, k, generator=gen) * torch.arange(1, m + 1)[:, None]).to(dtype)
    w, b = _weights(n, k, dtype, gen, bias=act != "relu")
    with poisoned_allocations():
        out = lin.gemv(x, w, b, act)
    ref = reference.gemv(x, w, b, act)
    assert out.shape == (m, n) and out.dtype == dtype
    for i in range(m):
        assert rel_err(out[i], ref[i]) < TOL[dtype], i


@pytest.mark.parametrize("split", [1, 2, 4, 9], ids=lambda s: f"split{s}")
def test_few_rows_split_k(lin, gen, monkeypatch, split):
    """K split over programs (``_rows_kernel``, axis 1), the tile's last program summing the partials
    in split order: the reference's rows for each split (4 over 6 K tiles: 3 splits of 2, none
    empty; 9: one tile each), the same values on a second call (the counts set back to 0 and the
    sum's order fixed), and the fused norm's statistics over all of K in every split."""
    monkeypatch.setattr(lin, "_row_tiles", lambda n, k: (16, 256, 2, split))
    monkeypatch.setattr(lin, "GEMV_ROWS", 1)  # 5 rows on the tensor-core kernel
    m, n, k = 5, 40, 1300
    x = (torch.randn(m, k, generator=gen) * torch.arange(1, m + 1)[:, None]).to(torch.bfloat16)
    res = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    w, b = _weights(n, k, torch.bfloat16, gen)
    nw, nb = (
        torch.rand(k, generator=gen).to(torch.bfloat16) + 0.5,
        torch.randn(k, generator=gen).to(torch.bfloat16),
    )
    ref = reference.gemv(x, w, b, "gelu")
    ref_norm, _ = reference.norm_gemv(x, res, nw, nb, 1e-5, False, w, b, None)
    with poisoned_allocations():
        first = lin.gemv(x, w, b, "gelu")
        second = lin.gemv(x, w, b, "gelu")
        normed, _ = lin.norm_gemv(x, res, nw, nb, 1e-5, False, w, b, None)
    assert torch.equal(first, second)
    for i in range(m):
        assert rel_err(first[i], ref[i]) < TOL[torch.bfloat16], i
        assert rel_err(normed[i], ref_norm[i]) < TOL[torch.bfloat16], i


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=_ids)
@pytest.mark.parametrize("norm", [None, "layer", "rms"])
def test_several_rows_equal_their_one_row_results(lin, gen, dtype, norm):
    """2 to 8 rows on the one-row kernel: each row's output is bit for bit what a call with that
    row alone gives, whatever the other rows hold: a verification step's linear layers give each
    row what a plain step gives it. With a norm, the rows go through the norm kernel first and
    then the one-row kernel without its norm: each row's output is bit for bit that of its normed
    row alone, its residual sum the norm kernel's."""
    n, k = 70, 1300
    w, b = _weights(n, k, dtype, gen)
    nw = (torch.rand(k, generator=gen) + 0.5).to(dtype)
    nb = torch.randn(k, generator=gen).to(dtype) if norm == "layer" else None
    for m in (2, 5, 8):
        x = (torch.randn(m, k, generator=gen) * torch.arange(1, m + 1)[:, None]).to(dtype)
        res = torch.randn(m, k, generator=gen).to(dtype)
        with poisoned_allocations():
            if norm is None:
                out = lin.gemv(x, w, b, "gelu")
                alone = [lin.gemv(x[i : i + 1], w, b, "gelu") for i in range(m)]
            else:
                out, summed = lin.norm_gemv(x, res, nw, nb, 1e-5, norm == "rms", w, b, "gelu")
                h, want_sum = lin.add_norm(x, res, nw, nb, 1e-5, norm == "rms")
                assert torch.equal(summed, want_sum)
                alone = [lin.gemv(h[i : i + 1], w, b, "gelu") for i in range(m)]
        for i, y in enumerate(alone):
            assert torch.equal(out[i : i + 1], y), (m, i)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_ids)
@pytest.mark.parametrize("norm", [None, "layer"])
def test_kv_store_writes_the_caches_as_store_kv(lin, gen, dtype, norm):
    """A self-attention's [q | k | v] projection with ``kv_store``: y as without it, and the k and
    v parts of each row in its cache slot exactly as ``store_kv`` writes them from y (slot -1: no
    write; every other slot untouched), for 1, 3 and 5 rows (the several-row path)."""
    h, d, k = 2, 8, 40
    w, b = _weights(3 * h * d, k, dtype, gen)
    nw = (torch.rand(k, generator=gen) + 0.5).to(dtype)
    for m, slots in ((1, [5]), (3, [2, -1, 9]), (5, [0, 15, 3, 4, 11])):
        x = torch.randn(m, k, generator=gen).to(dtype)
        res = torch.randn(m, k, generator=gen).to(dtype)
        slot_mapping = torch.tensor(slots)
        caches = [torch.full((4, 4, h, d), 7.0, dtype=dtype) for _ in range(4)]
        with poisoned_allocations():
            if norm is None:
                y = lin.gemv(x, w, b, None, kv_store=(caches[0], caches[1], slot_mapping))
                plain = lin.gemv(x, w, b, None)
            else:
                y, _ = lin.norm_gemv(
                    x, res, nw, None, 1e-5, False, w, b, None, (caches[0], caches[1], slot_mapping)
                )
                plain, _ = lin.norm_gemv(x, res, nw, None, 1e-5, False, w, b, None)
        assert torch.equal(y, plain)
        _, key, value = plain.view(m, 3, h, d).unbind(1)
        reference.store_kv(key, value, caches[2], caches[3], slot_mapping)
        assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3]), m
        assert (caches[0] != 7.0).any() and (caches[0] == 7.0).any()


def test_kv_store_refuses_what_it_cannot_write(lin, gen):
    """fp8 caches (scales over whole rows), a weight that is not 3 H D rows, a slot per row."""
    w, b = _weights(48, 40, torch.float32, gen)
    x = torch.randn(2, 40, generator=gen)
    cache = torch.zeros(4, 4, 2, 8)
    slots = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="dtype"):
        fp8 = cache.to(torch.float8_e4m3fn)
        lin.gemv(x, w, b, kv_store=(fp8, fp8, slots))
    with pytest.raises(ValueError, match="3 H D"):
        lin.gemv(x, w[:40], b[:40], kv_store=(cache, cache.clone(), slots))
    with pytest.raises(ValueError, match="slot_mapping must be"):
        lin.gemv(x, w, b, kv_store=(cache, cache.clone(), slots[:1]))


def test_gemv_takes_a_strided_weight(lin, gen):
    """A weight whose rows are a slice of a wider matrix (row stride > K)."""
    wide = torch.randn(40, 96, generator=gen)
    x = torch.randn(1, 64, generator=gen)
    assert rel_err(lin.gemv(x, wide[:, :64], None), reference.gemv(x, wide[:, :64], None)) < 1e-5


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("is_rms", [False, True], ids=["layer", "rms"])
@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "first-layer"])
@pytest.mark.parametrize("act", [None, "gelu"], ids=_ids)
@pytest.mark.parametrize("m", [1, 5], ids=lambda m: f"m{m}")
def test_norm_gemv(lin, gen, path, dtype, is_rms, with_residual, act, m):
    """One row, and five (each row normalised with its own statistics: rows of different mean
    and scale)."""
    n, k = 300, 1300  # K in several tiles of the few-row kernel, the last one partial
    x = torch.randn(m, k, generator=gen) * torch.arange(3, m + 3)[:, None] + torch.arange(m)[:, None]
    x = x.to(dtype)
    residual = torch.randn(m, k, generator=gen).to(dtype) if with_residual else None
    nw = (torch.randn(k, generator=gen) * 0.5 + 1).to(dtype)
    nb = None if is_rms else torch.randn(k, generator=gen).to(dtype)
    w, b = _weights(n, k, dtype, gen)
    with poisoned_allocations():
        out, summed = lin.norm_gemv(x, residual, nw, nb, 1e-5, is_rms, w, b, act)
    ref, ref_sum = reference.norm_gemv(x, residual, nw, nb, 1e-5, is_rms, w, b, act)
    for i in range(m):
        assert rel_err(out[i], ref[i]) < TOL[dtype], i
    torch.testing.assert_close(summed, ref_sum, rtol=0 if dtype != torch.bfloat16 else 2**-7, atol=0)
    if not with_residual:
        assert summed is x


BAD = {
    "seventeen rows": lambda x, w, b: (x.repeat(17, 1), w, b, None),
    "no rows": lambda x, w, b: (x[:0], w, b, None),
    "rows of another dtype": lambda x, w, b: (x.repeat(2, 1).double(), w, b, None),
    "K mismatch": lambda x, w, b: (x[:, :-1], w, b, None),
    "bias shape": lambda x, w, b: (x, w, b[:-1], None),
    "int weight": lambda x, w, b: (x, w.long(), b, None),
    "activation": lambda x, w, b: (x, w, b, "swish"),
}


@pytest.mark.parametrize("bad", list(BAD))
def test_rejects_bad_inputs(lin, gen, bad):
    x = torch.randn(1, 32, generator=gen)
    w, b = _weights(16, 32, torch.float32, gen)
    with pytest.raises(ValueError):
        lin.gemv(*BAD[bad](x, w, b))


def test_norm_gemv_rejects_bad_norm_inputs(lin, gen):
    x, r = torch.randn(1, 32, generator=gen), torch.randn(1, 32, generator=gen)
    w, b = _weights(16, 32, torch.float32, gen)
    ones = torch.ones(32)
    for args in [
        (x, r, ones[:-1], None),  # norm weight of the wrong length
        (x, r, ones, ones[:-1]),  # norm bias of the wrong length
        (x, r[:, :-1], ones, None),  # residual shape
        (x, r.double(), ones, None),  # residual dtype
    ]:
        with pytest.raises(ValueError):
            lin.norm_gemv(*args, 1e-5, False, w, b)


@pytest.mark.parametrize(
    "env, rows, kv_store",
    [
        ({}, 5, True),
        ({"ENCDEC_GEMV_ROWS": "1", "ENCDEC_GEMV_KV_STORE": "0"}, 1, False),  # everything on cuBLAS / store_kv
        ({"ENCDEC_GEMV_ROWS": "99"}, 16, True),  # at most FEW_ROWS
    ],
)
def test_measuring_switches_are_read_at_import(env, rows, kv_store):
    """ENCDEC_GEMV_ROWS and ENCDEC_GEMV_KV_STORE, which benchmarks/gpu_session.sh sets to compare."""
    clean = {k: v for k, v in os.environ.items() if k not in ("ENCDEC_GEMV_ROWS", "ENCDEC_GEMV_KV_STORE")}
    code = "import encdec_kernels as k; print(k.GEMV_MAX_ROWS, k.GEMV_KV_STORE)"
    proc = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(rows), str(kv_store)]
