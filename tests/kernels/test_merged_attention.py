"""The pieces of T5Gemma 2's merged attention in encdec_kernels (reference path): paged attention's
log-sum-exp output, the exact merge of two attentions into one softmax over both key sets, and the
asymmetric (before, after) sliding window of the bidirectional encoder."""

from __future__ import annotations

import pytest
import torch

import encdec_kernels
from encdec_kernels import reference


def _paged(keys: list[torch.Tensor], values: list[torch.Tensor], bs: int, nb: int):
    """Caches [NB, BS, H, D] holding sequence b's keys in blocks b * per, b * per + 1, .."""
    h, d = keys[0].shape[1:]
    per = nb // len(keys)
    k_cache, v_cache = torch.zeros(nb, bs, h, d), torch.zeros(nb, bs, h, d)
    tables = torch.zeros(len(keys), per, dtype=torch.int32)
    for b, (k, v) in enumerate(zip(keys, values)):
        tables[b] = torch.arange(b * per, (b + 1) * per, dtype=torch.int32)
        n = k.shape[0]
        k_cache[b * per : (b + 1) * per].view(-1, h, d)[:n] = k
        v_cache[b * per : (b + 1) * per].view(-1, h, d)[:n] = v
    lens = torch.tensor([k.shape[0] for k in keys], dtype=torch.int32)
    return k_cache, v_cache, tables, lens


def test_merged_softmax_equals_one_softmax_over_both_key_sets():
    g = torch.Generator().manual_seed(0)
    h, d, scale, window = 3, 8, 0.3, 3
    self_lens, cross_lens, q_lens = [5, 9], [7, 4], [2, 1]  # 1..k queries per sequence, the last ones
    sk = [torch.randn(n, h, d, generator=g) for n in self_lens]
    sv = [torch.randn(n, h, d, generator=g) for n in self_lens]
    ck = [torch.randn(n, h, d, generator=g) * 2 for n in cross_lens]
    cv = [torch.randn(n, h, d, generator=g) for n in cross_lens]
    q = torch.randn(sum(q_lens), h, d, generator=g)
    cu_q = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    s_cache = _paged(sk, sv, 4, 8)
    c_cache = _paged(ck, cv, 4, 8)
    o_s, lse_s = encdec_kernels.paged_attention(
        q, *s_cache, cu_q, max(q_lens), scale=scale, causal=True, window=window, return_lse=True
    )
    o_c, lse_c = encdec_kernels.paged_attention(q, *c_cache, cu_q, max(q_lens), scale=scale, causal=False,
                                                return_lse=True)  # fmt: skip
    plain = encdec_kernels.paged_attention(q, *c_cache, cu_q, max(q_lens), scale=scale, causal=False)
    assert torch.equal(o_c, plain)  # return_lse changes nothing else
    merged = encdec_kernels.merge_attention(o_s, lse_s, o_c, lse_c)
    for b in range(2):
        rows = slice(int(cu_q[b]), int(cu_q[b + 1]))
        n = self_lens[b]
        q_pos = torch.arange(n - q_lens[b], n)
        dist = q_pos[:, None] - torch.arange(n)[None, :]
        keep_self = (dist >= 0) & (dist < window)
        keep = torch.cat([keep_self, torch.ones(q_lens[b], cross_lens[b], dtype=torch.bool)], dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[rows], torch.cat([sk[b], ck[b]])) * scale
        scores = scores.masked_fill(~keep[None], float("-inf"))
        expected = torch.einsum("hqk,khd->qhd", scores.softmax(-1), torch.cat([sv[b], cv[b]]))
        torch.testing.assert_close(merged[rows], expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lse_c[rows], torch.logsumexp(scores[:, :, n:], -1).T, rtol=1e-5, atol=1e-6)


def test_asymmetric_encoder_window():
    """(before, after): keys before or more positions behind, or after or more ahead, are masked;
    an int W is (W, W)."""
    pos = torch.arange(8)
    keep = reference.window_mask(pos, pos, causal=False, window=(2, 3))
    dist = pos[:, None] - pos[None, :]  # q - k
    assert torch.equal(keep, (dist <= 1) & (dist >= -2))
    assert torch.equal(
        reference.window_mask(pos, pos, causal=False, window=3),
        reference.window_mask(pos, pos, causal=False, window=(3, 3)),
    )
    assert torch.equal(reference.window_mask(pos, pos, causal=True, window=3), (dist >= 0) & (dist < 3))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("num_splits", [None, 1, 3])
def test_triton_paged_log_sum_exp_matches_reference(paged, causal, num_splits):
    """The Triton kernel's (out, lse), through the split partials with one split or several (the
    Triton interpreter on the CPU): the reference's."""
    from tests.kernels.cases import paged_inputs, poisoned_allocations

    gen = torch.Generator().manual_seed(3)
    case = paged_inputs([5, 40, 23], [2, 1, 5], 2, 16, 16, torch.float32, "cpu", gen=gen)
    ref_out, ref_lse = reference.paged_attention(*case.args(), scale=0.3, causal=causal, return_lse=True)
    with poisoned_allocations():
        out, lse = paged._launch_paged(
            *case.args(), 0.3, causal, None, num_splits=num_splits, return_lse=True
        )
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
    plain = paged.paged_attention(*case.args(), scale=0.3, causal=causal)
    torch.testing.assert_close(plain, ref_out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [1, 3, 16, 37])
@pytest.mark.parametrize("num_splits", [None, 1, 3])
@pytest.mark.parametrize("q_len", [1, 5, 20])
def test_triton_paged_causal_sliding_window_matches_reference(paged, window, num_splits, q_len):
    """The Triton kernel's causal sliding window (keys q - k < window; whole tiles before the window
    skipped) on 1..k queries, with and without split-KV, with its log-sum-exp: the reference's."""
    from tests.kernels.cases import paged_inputs, poisoned_allocations

    gen = torch.Generator().manual_seed(window * 100 + q_len)
    case = paged_inputs([q_len, 40, 70], [q_len, 1, q_len], 2, 16, 16, torch.float32, "cpu", gen=gen)
    kw = dict(scale=0.3, causal=True, window=window)
    ref_out, ref_lse = reference.paged_attention(*case.args(), **kw, return_lse=True)
    with poisoned_allocations():
        out, lse = paged._launch_paged(
            *case.args(), 0.3, True, None, num_splits=num_splits, window=window, return_lse=True
        )
        plain = paged.paged_attention(*case.args(), **kw)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain, ref_out, rtol=1e-5, atol=1e-5)
    full = reference.paged_attention(*case.args(), scale=0.3, causal=True)
    if window < 40:
        assert not torch.allclose(full, ref_out)  # the window changes the result
