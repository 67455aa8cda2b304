"""``copy_blocks_where``: block copies chosen on the device (a beam step launched ahead forks its
beams there), the Triton kernel in the interpreter against the reference and a plain loop."""

from __future__ import annotations

import pytest
import torch

from encdec_kernels import reference
from encdec_kernels.reference import FP8_DTYPE


def _pool(dtype, gen):
    """A [2 * layers, blocks, BS, H, D] pool of distinct values (fp8: bytes)."""
    x = torch.randn(6, 12, 4, 3, 8, generator=gen)
    return x.to(dtype) if dtype != FP8_DTYPE else (x * 8).to(FP8_DTYPE)


def _expected(pool, src, dst, mask):
    want = pool.clone()
    raw, before = want.view(torch.uint8) if pool.dtype == FP8_DTYPE else want, pool.clone()
    old = before.view(torch.uint8) if pool.dtype == FP8_DTYPE else before
    for s, d, m in zip(src.tolist(), dst.tolist(), mask.tolist(), strict=True):
        if m:
            raw[:, d] = old[:, s]
    return want


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, FP8_DTYPE], ids=["f32", "bf16", "fp8"])
def test_copy_blocks_where_copies_the_selected_pairs_only(blocks, dtype):
    gen = torch.Generator().manual_seed(0)
    pool = _pool(dtype, gen)
    # two selected copies, one pair off (its destination must stay as it was), a block copied twice
    src = torch.tensor([1, 5, 1, 3])
    dst = torch.tensor([7, 9, 10, 11])
    mask = torch.tensor([True, True, False, True])
    want = _expected(pool, src, dst, mask)
    for impl in (blocks, reference):
        got = pool.clone()
        impl.copy_blocks_where(got, src, dst, mask)
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), impl.__name__
    assert not torch.equal(want[:, 10].float(), pool[:, 1].float())  # the unselected pair did not copy


def test_copy_blocks_where_scales_layout(blocks):
    """fp8 scales: [2 * layers, blocks, BS, H] float32 rows (a pool's second part)."""
    gen = torch.Generator().manual_seed(1)
    scales = torch.rand(4, 6, 4, 3, generator=gen)
    src, dst, mask = torch.tensor([0, 2]), torch.tensor([4, 5]), torch.tensor([False, True])
    got = scales.clone()
    blocks.copy_blocks_where(got, src, dst, mask)
    assert torch.equal(got, _expected(scales, src, dst, mask))
