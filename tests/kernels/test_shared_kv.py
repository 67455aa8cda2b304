"""The shared-K/V (absorbed cross-attention) kernel vs encdec_kernels.reference, on the CPU through the
Triton interpreter (``shared_kv`` fixture, see conftest.py). Query rows are (token, head) pairs in
groups of 16; row widths that are not a power of two run as two column tiles."""

from __future__ import annotations

import pytest
import torch

from encdec_kernels import reference
from tests.kernels.cases import TOL, poisoned_allocations, rel_err, shared_kv_inputs


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


# (width, heads, q_lens): widths 32 (one tile), 48 = 32 + 16 and 40 = 32 + 8 (masked second
# tile); 20 heads x 1 token: two row groups, the second partly empty; 3 tokens x 6 heads.
SHAPES = [(32, 3, [1, 1, 1]), (48, 20, [1, 1, 1]), (40, 6, [3, 1, 2])]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("width,heads,q_lens", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("splits", [1, 3])
def test_shared_kv_matches_reference(shared_kv, gen, bf16_dot_ok, dtype, width, heads, q_lens, splits):
    if dtype == torch.bfloat16 and not bf16_dot_ok:
        pytest.skip("this Triton interpreter cannot run tl.dot on bfloat16")
    case = shared_kv_inputs([5, 37, 70], q_lens, heads, width, 2, 8, dtype, "cpu", gen=gen)
    ref = reference.shared_kv_attention(*case.args(), scale=width**-0.5)
    with poisoned_allocations():
        out = shared_kv._launch_shared_kv(*case.args(), width**-0.5, num_splits=splits)
    assert out.shape == case.q.shape and out.dtype == dtype
    assert out.transpose(0, 1).is_contiguous()  # head-major storage for the value projection
    assert rel_err(out, ref) < TOL[dtype]


def test_shared_kv_strided_rows(shared_kv, gen):
    """Chunks of 5 rows followed by 2 unused rows (a strided view): T5's pool layout when
    heads * d_kv is wider than d_model."""
    case = shared_kv_inputs([30, 11], [1, 2], 4, 48, 3, 5, torch.float32, "cpu", pad_rows=2, gen=gen)
    assert not case.rows.is_contiguous()
    ref = reference.shared_kv_attention(*case.args(), scale=0.2)
    with poisoned_allocations():
        out = shared_kv.shared_kv_attention(*case.args(), scale=0.2)
    assert rel_err(out, ref) < 1e-5


def test_shared_kv_beams_empty_rows_and_default_splits(common, shared_kv, gen):
    """Beams read one table row; a padding sequence has no queries; the launcher's own split
    choice (the interpreter pretends 4 SMs: few programs, so it splits)."""
    case = shared_kv_inputs(
        [23, 23, 9, 9], [1, 1, 0, 1], 4, 32, 3, 4, torch.float32, "cpu", share=[(1, 0), (3, 2)], gen=gen
    )
    assert (
        common.num_kv_splits(
            4,
            case.block_tables.shape[1] * 12,
            16,
            case.q.device,
            shared_kv.SHARED_SPLIT_PER_SM,
            shared_kv.SHARED_SPLIT_MAX,
        )
        > 1
    )
    ref = reference.shared_kv_attention(*case.args(), scale=0.2)
    with poisoned_allocations():
        out = shared_kv.shared_kv_attention(*case.args(), scale=0.2)
    assert rel_err(out, ref) < 1e-5


def test_reference_equals_kv_attention_with_projections(gen):
    """The identity the absorbed path rests on: softmax(q Wk . e) (e Wv) per head equals
    (softmax((q Wk^T) . e) e) Wv^T, and a key bias changes nothing (softmax is shift-invariant)."""
    heads, dh, d, n = 3, 8, 24, 19
    e = torch.randn(n, d, generator=gen, dtype=torch.float64)
    wk, wv = (torch.randn(heads, dh, d, generator=gen, dtype=torch.float64) for _ in range(2))
    bk = torch.randn(heads, dh, generator=gen, dtype=torch.float64)
    q = torch.randn(2, heads, dh, generator=gen, dtype=torch.float64)
    k = torch.einsum("nc,hdc->nhd", e, wk) + bk
    v = torch.einsum("nc,hdc->nhd", e, wv)
    want = reference._attend(q, k, v, 0.3)
    rows = e.view(1, 1, n, d)  # one chunk, one block of n rows
    qe = torch.einsum("thd,hdc->thc", q, wk)
    o = reference.shared_kv_attention(
        qe, rows, torch.zeros(1, 1, dtype=torch.int32), torch.tensor([n], dtype=torch.int32),
        torch.tensor([0, 2], dtype=torch.int32), 2, scale=0.3,
    )  # fmt: skip
    # _attend computes in float32
    torch.testing.assert_close(torch.einsum("thc,hdc->thd", o, wv), want, rtol=1e-4, atol=1e-5)


def test_shared_kv_rejects_bad_inputs(shared_kv, gen):
    case = shared_kv_inputs([5], [1], 2, 32, 1, 8, torch.float32, "cpu", gen=gen)
    with pytest.raises(ValueError, match="rows are 32 wide"):
        shared_kv.shared_kv_attention(case.q[..., :16], *case.args()[1:], scale=1.0)
    with pytest.raises(ValueError, match="scale"):
        shared_kv.shared_kv_attention(*case.args(), scale=0.0)
    with pytest.raises(ValueError, match="int32"):
        shared_kv.shared_kv_attention(
            case.q, case.rows, case.block_tables.long(), *case.args()[3:], scale=1.0
        )


@pytest.mark.parametrize("pad_rows", [0, 3], ids=["packed", "strided"])
def test_store_rows_matches_reference_and_skips_padding(shared_kv, gen, pad_rows):
    """Encoder rows into the row cache (the absorbed layout, gaps between chunks when H * D !=
    d_model): the Triton kernel writes what the reference writes, -1 slots nowhere."""
    chunks, blocks, rc, width, n = 3, 4, 8, 48, 20
    base = torch.full((chunks, blocks, rc + pad_rows, width), float("nan"))
    rows, ref = base[:, :, :rc], base.clone()[:, :, :rc]
    x = torch.randn(n, width, generator=gen)
    slots = torch.randperm(chunks * blocks * rc, generator=gen)[:n]
    slots[[2, 7]] = -1
    reference.store_rows(x, ref, slots)
    shared_kv.store_rows(x, rows, slots)
    assert torch.equal(rows.isnan(), ref.isnan())
    assert rows.isnan().sum() == (chunks * blocks * rc - (n - 2)) * width
    torch.testing.assert_close(rows.nan_to_num(), ref.nan_to_num(), rtol=0, atol=0)
    assert base[:, :, rc:].isnan().all()  # the gaps untouched
    with pytest.raises(ValueError, match="slot_mapping"):
        shared_kv.store_rows(x, rows, slots.int())
