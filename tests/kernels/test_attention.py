"""Triton attention kernels vs encdec_kernels.reference, on the CPU through the Triton interpreter.

The ``varlen``, ``paged`` and ``common`` fixtures (conftest.py) are those modules of encdec_kernels
with interpreted kernels. Shapes are small; the interpreter uses 16-wide tiles
(INTERPRET_*_TILES) so they still cover several tiles, ragged tails and the masked / unmasked
tile paths.
"""

from __future__ import annotations

import pytest
import torch

from encdec_kernels import reference
from encdec_kernels.reference import RelBias
from tests.kernels.cases import TOL, paged_inputs, poisoned_allocations, rel_bias, rel_err, varlen_inputs


def case_id(v) -> str:
    """Readable test ids: fp32, causal-bias, L1+17+40-H2-D16, ..."""
    if isinstance(v, torch.dtype):
        return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[v]
    if isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], bool):  # (causal, bias)
        return ("causal" if v[0] else "full") + (f"-{v[1]}-bias" if v[1] else "")
    if isinstance(v, tuple):  # (lengths, heads, head dim)
        return f"L{'+'.join(map(str, v[0]))}-H{v[1]}-D{v[2]}"
    return str(v)


def skip_bf16_dot(dtype, bf16_dot_ok):
    if dtype == torch.bfloat16 and not bf16_dot_ok:
        pytest.skip("this Triton interpreter cannot run tl.dot on bfloat16")


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


# -- varlen (encoder / prefill) ---------------------------------------------------------------

VARLEN_SHAPES = [  # (lengths, heads, head dim)
    ([1, 17, 40], 2, 16),
    ([33, 5], 3, 24),  # head dim padded to 32 with masking
    ([16, 31, 2], 1, 64),
    ([20], 2, 80),  # Whisper-style odd head dim, padded to 128
]
VARLEN_MODES = [  # (causal, bias): encoder without / with bidirectional T5 bias, causal prefill
    (False, None),
    (False, "bidirectional"),
    (True, None),
    (True, "causal"),
]


# float32: every shape x mode; bfloat16: every mode on one shape (keeps the interpreter run short).
VARLEN_CASES = [(torch.float32, m, s) for s in VARLEN_SHAPES for m in VARLEN_MODES] + [
    (torch.bfloat16, m, VARLEN_SHAPES[1]) for m in VARLEN_MODES
]


@pytest.mark.parametrize("dtype,mode,shape", VARLEN_CASES, ids=case_id)
def test_varlen_matches_reference(varlen, gen, bf16_dot_ok, dtype, mode, shape):
    (causal, bias), (lens, heads, head_dim) = mode, shape
    skip_bf16_dot(dtype, bf16_dot_ok)
    q, k, v, cu = varlen_inputs(lens, heads, head_dim, dtype, "cpu", gen=gen)
    rb = (
        rel_bias(heads, bias == "bidirectional", "cpu", num_buckets=16, max_distance=24, gen=gen)
        if bias
        else None
    )
    kw = dict(scale=head_dim**-0.5, causal=causal, rel_bias=rb)
    ref = reference.varlen_attention(q, k, v, cu, max(lens), **kw)
    with poisoned_allocations():
        out = varlen.varlen_attention(q, k, v, cu, max(lens), **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel_err(out, ref) < TOL[dtype]


def test_varlen_strided_views_and_loose_max_seqlen(varlen, gen):
    """q/k/v as views of a fused [T, 3, H, D] projection; max_seqlen larger than needed."""
    lens = [7, 19]
    q, k, v, cu = varlen_inputs(lens, 2, 32, torch.float32, "cpu", fused=True, gen=gen)
    ref = reference.varlen_attention(q, k, v, cu, 19, scale=0.2)
    with poisoned_allocations():
        out = varlen.varlen_attention(q, k, v, cu, 40, scale=0.2)
    assert rel_err(out, ref) < 1e-5


def test_varlen_empty_sequences(varlen, gen):
    lens = [0, 5, 0, 3]
    q, k, v, cu = varlen_inputs(lens, 2, 16, torch.float32, "cpu", gen=gen)
    ref = reference.varlen_attention(q, k, v, cu, 5, scale=0.25)
    with poisoned_allocations():
        out = varlen.varlen_attention(q, k, v, cu, 5, scale=0.25)
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("bidirectional", [True, False])
def test_varlen_bias_long_distances(varlen, gen, monkeypatch, bidirectional):
    """Distances far beyond max_distance (clamped lookup) with T5's real bucket config."""
    monkeypatch.setitem(varlen.INTERPRET_VARLEN_TILES, "BLOCK_M", 64)
    monkeypatch.setitem(varlen.INTERPRET_VARLEN_TILES, "BLOCK_N", 64)
    lens = [300, 45]
    q, k, v, cu = varlen_inputs(lens, 1, 16, torch.float32, "cpu", gen=gen)
    rb = rel_bias(1, bidirectional, "cpu", num_buckets=32, max_distance=128, gen=gen)
    kw = dict(scale=0.1, causal=not bidirectional, rel_bias=rb)
    ref = reference.varlen_attention(q, k, v, cu, 300, **kw)
    out = varlen.varlen_attention(q, k, v, cu, 300, **kw)
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize(
    "num_buckets,max_distance,bidirectional",
    [(32, 128, True), (32, 128, False), (16, 24, True), (8, 20, False), (64, 256, True), (4, 3, True)],
)
def test_bias_lookup_matches_reference_bucket_for_every_distance(
    varlen, paged, num_buckets, max_distance, bidirectional
):
    """Both bias lookups == transformers' bucket formula, for every distance in [-5000, 5000]
    (incl. the exact log boundaries such as rel = 16 for 32/128): the clamped bucket table of
    paged_attention and the distance-pair table of varlen_attention."""
    rel = torch.arange(-5000, 5001)
    want = reference.relative_position_bucket(rel, num_buckets, max_distance, bidirectional)
    lut = paged._bucket_lut(num_buckets, max_distance, bidirectional, rel.device)
    assert lut.dtype == torch.int32
    assert torch.equal(lut[rel.clamp(-max_distance, max_distance) + max_distance].long(), want)
    table = torch.randn(3, num_buckets)
    center = 5000
    pairs = varlen._bias_pairs(RelBias(table, num_buckets, max_distance, bidirectional), center)
    assert pairs.shape == (3, 2 * center + 1, 2) and pairs.is_contiguous()
    assert torch.equal(pairs[:, rel + center, 0], table[:, want])  # bias(d)
    assert torch.equal(pairs[:, rel[:-1] + center, 1], table[:, want[1:]])  # bias(d + 1)


def test_bias_table_covers_every_tile(varlen):
    """The varlen pair table reaches past max_seqlen by more than any tile (ragged tile ends read
    it unmasked), for the interpreter tiles and every CUDA config."""
    tiles = [varlen.INTERPRET_VARLEN_TILES] + [c.kwargs for c in varlen._VARLEN_CONFIGS]
    assert max(max(t["BLOCK_M"], t["BLOCK_N"]) for t in tiles) <= varlen.BIAS_PAD
    for max_seqlen in (1, 5, 440, 1500, 4097):
        assert varlen._bias_center(max_seqlen) >= max_seqlen + varlen.BIAS_PAD


# -- paged decode attention -------------------------------------------------------------------

PAGED_MODES = [  # (causal, bias): cross-attention, decoder self-attention with / without T5 bias
    (False, None),
    (True, None),
    (True, "causal"),
]


# float32: cache block sizes 8 and 32 (16 is in the split tests); bfloat16: block size 16.
PAGED_CASES = [(torch.float32, m, q, bs) for m in PAGED_MODES for q in (1, 3) for bs in (8, 32)] + [
    (torch.bfloat16, m, q, 16) for m in PAGED_MODES for q in (1, 3)
]


@pytest.mark.parametrize("dtype,mode,q_len,block_size", PAGED_CASES, ids=case_id)
def test_paged_matches_reference(paged, gen, bf16_dot_ok, dtype, mode, q_len, block_size):
    causal, bias = mode
    skip_bf16_dot(dtype, bf16_dot_ok)
    seq_lens = [q_len, 17, 40, 70]  # shortest: only the new tokens (self) / one block part (cross)
    q_lens = [q_len, q_len, 1, q_len]  # ragged query counts within the batch
    heads, head_dim = 2, 24
    case = paged_inputs(seq_lens, q_lens, heads, head_dim, block_size, dtype, "cpu", gen=gen)
    rb = rel_bias(heads, False, "cpu", num_buckets=16, max_distance=24, gen=gen) if bias else None
    kw = dict(scale=head_dim**-0.5, causal=causal, rel_bias=rb)
    ref = reference.paged_attention(*case.args(), **kw)
    with poisoned_allocations():
        out = paged.paged_attention(*case.args(), **kw)
    assert out.shape == case.q.shape and out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]


# max_seqlen_q 1, 4, 20, 70: query tiles of 1 (no tl.dot), 16, 32 and 2 x 64 rows.
SPLIT_CASES = [(torch.float32, m, q) for m in PAGED_MODES for q in (1, 4, 20, 70)] + [
    (torch.bfloat16, m, 4) for m in PAGED_MODES
]


@pytest.mark.parametrize("dtype,mode,max_seqlen_q", SPLIT_CASES, ids=case_id)
def test_paged_split_kv_matches_reference(
    common, paged, gen, monkeypatch, bf16_dot_ok, dtype, mode, max_seqlen_q
):
    causal, bias = mode
    """Few (sequence, head) programs and long keys: the split-KV path (flash-decoding + merge)."""
    seq_lens = [max_seqlen_q + 60, max_seqlen_q + 3]
    q_lens = [max_seqlen_q, 1]
    case = paged_inputs(seq_lens, q_lens, 1, 16, 16, dtype, "cpu", gen=gen)
    assert common.num_kv_splits(2, case.block_tables.shape[1] * 16, 16, case.q.device) > 1
    rb = rel_bias(1, False, "cpu", num_buckets=16, max_distance=24, gen=gen) if bias else None
    kw = dict(scale=0.25, causal=causal, rel_bias=rb)
    ref = reference.paged_attention(*case.args(), **kw)
    with poisoned_allocations():
        out = paged.paged_attention(*case.args(), **kw)
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("num_splits", [2, 5])
def test_paged_splits_longer_than_keys(paged, gen, num_splits):
    """More splits than key tiles: empty splits must not disturb the merge."""
    case = paged_inputs([3, 20], [1, 2], 2, 16, 16, torch.float32, "cpu", gen=gen)
    ref = reference.paged_attention(*case.args(), scale=0.3, causal=True)
    with poisoned_allocations():
        out = paged._launch_paged(*case.args(), 0.3, True, None, num_splits=num_splits)
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_paged_single_query_reduction_path(paged, gen, monkeypatch, causal, bias):
    """SINGLE_QUERY_DOT=False: plain decode through the broadcast-multiply reduction instead of
    the padded tl.dot tile (the default)."""
    monkeypatch.setattr(paged, "SINGLE_QUERY_DOT", False)
    case = paged_inputs([1, 17, 40], [1, 1, 1], 2, 16, 16, torch.float32, "cpu", gen=gen)
    rb = rel_bias(2, False, "cpu", num_buckets=16, max_distance=24, gen=gen) if bias else None
    ref = reference.paged_attention(*case.args(), scale=0.25, causal=causal, rel_bias=rb)
    with poisoned_allocations():
        out = paged.paged_attention(*case.args(), scale=0.25, causal=causal, rel_bias=rb)
    assert rel_err(out, ref) < 1e-5


def test_paged_beams_share_cross_blocks_and_empty_query_rows(paged, gen):
    """Beams of one request reuse the same block table row; a padded sequence has no queries."""
    seq_lens = [23, 23, 23, 9, 9]
    q_lens = [1, 1, 1, 0, 1]
    case = paged_inputs(
        seq_lens, q_lens, 2, 16, 8, torch.float32, "cpu", share=[(1, 0), (2, 0), (4, 3)], gen=gen
    )
    ref = reference.paged_attention(*case.args(), scale=0.25, causal=False)
    with poisoned_allocations():
        out = paged.paged_attention(*case.args(), scale=0.25, causal=False)
    assert rel_err(out, ref) < 1e-5


def test_num_kv_splits_heuristic(common, monkeypatch):
    monkeypatch.setattr(common, "sm_count", lambda device: 132)  # an H100: split below 4 * 132 programs
    dev = torch.device("cuda")
    assert common.num_kv_splits(256 * 20, 1504, 64, dev) == 1  # big decode batch: no split
    assert common.num_kv_splits(20, 1504, 64, dev) == 24  # batch 1, Whisper cross: one 64-key tile each
    assert common.num_kv_splits(8 * 20, 1504, 64, dev) == 4  # batch 8: cdiv(528, 160), 6 tiles each
    assert common.num_kv_splits(16 * 8, 1504, 64, dev) == 5  # cdiv(528, 128) = 5 -> 5 tiles each
    assert common.num_kv_splits(1, 1 << 20, 64, dev) == common.SPLIT_MAX
    assert common.num_kv_splits(20, 200, 64, dev) == 4  # short keys: at most one split per tile
    assert common.num_kv_splits(20, 48, 64, dev) == 1
    for programs in (1, 3, 20, 100, 527):  # never an empty split at full length
        for keys in (64, 200, 1504, 4096):
            splits = common.num_kv_splits(programs, keys, 64, dev)
            tiles = -(-keys // 64)
            assert 1 <= splits <= min(tiles, common.SPLIT_MAX)
            assert (splits - 1) * -(-tiles // splits) < tiles


def test_scale_must_be_positive(varlen, paged):
    a = _varlen_ok()
    for scale in (0.0, -0.125, True):
        with pytest.raises(ValueError):
            varlen.varlen_attention(a["q"], a["k"], a["v"], a["cu_seqlens"], 6, scale=scale)
    p = _paged_ok()
    with pytest.raises(ValueError):
        paged.paged_attention(*p.values(), scale=0.0, causal=True)


def test_varlen_configs(varlen, monkeypatch):
    """Every head dim / dtype has candidates (its first is the ENCDEC_AUTOTUNE=0 config), the
    autotuner's prune keeps exactly those, and the autotune key buckets max_seqlen."""
    for block_d in (16, 32, 64, 128, 256):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            allowed = varlen._varlen_configs_for(block_d, dtype)
            assert allowed and all(any(c is a for a in varlen._VARLEN_CONFIGS) for c in allowed)
            kept = varlen._varlen_prune(
                varlen._VARLEN_CONFIGS, {"Q": torch.empty(0, dtype=dtype)}, BLOCK_D=block_d
            )
            assert kept == [c for c in varlen._VARLEN_CONFIGS if any(c is a for a in allowed)]
    assert len(varlen._varlen_configs_for(64, torch.bfloat16)) > len(
        varlen._varlen_configs_for(128, torch.bfloat16)
    )
    assert varlen._seq_bucket(1500) == 2048 and varlen._seq_bucket(440) == 512 and varlen._seq_bucket(3) == 64
    monkeypatch.setenv(varlen.AUTOTUNE_ENV, "0")
    assert not varlen._autotune_enabled()
    monkeypatch.setenv(varlen.AUTOTUNE_ENV, "1")
    assert varlen._autotune_enabled()


# -- store_kv ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "src_dtype,cache_dtype",
    [(torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16)],
    ids=case_id,
)
def test_store_kv_matches_reference_and_skips_padding(paged, gen, src_dtype, cache_dtype):
    n, heads, head_dim, blocks, block_size = 9, 3, 20, 4, 8
    kv = torch.randn(n, 2, heads, head_dim, generator=gen).to(src_dtype)
    k, v = kv.unbind(1)  # strided views, like a fused projection
    slots = torch.randperm(blocks * block_size, generator=gen)[:n]
    slots[[1, 4, 8]] = -1  # padding rows
    k_cache = torch.full((blocks, block_size, heads, head_dim), float("nan"), dtype=cache_dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    reference.store_kv(k, v, k_ref, v_ref, slots)
    paged.store_kv(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache.isnan(), k_ref.isnan())  # skipped rows untouched, others written
    # the interpreter rounds float32 -> bfloat16 toward zero (torch and the GPU: to nearest even)
    tol = dict(rtol=2**-7, atol=0) if src_dtype != cache_dtype else dict(rtol=0, atol=0)
    torch.testing.assert_close(k_cache.nan_to_num(), k_ref.nan_to_num(), **tol)
    torch.testing.assert_close(v_cache.nan_to_num(), v_ref.nan_to_num(), **tol)
    assert k_cache.isnan().sum() == (blocks * block_size - 6) * heads * head_dim


# -- launcher input checks --------------------------------------------------------------------


def _varlen_ok():
    q = torch.randn(10, 2, 16)
    return dict(
        q=q, k=q.clone(), v=q.clone(), cu_seqlens=torch.tensor([0, 4, 10], dtype=torch.int32), max_seqlen=6
    )


VARLEN_BAD = {
    "int q": lambda a: a.update(q=a["q"].long()),
    "k shape": lambda a: a.update(k=a["k"][:9]),
    "v dtype": lambda a: a.update(v=a["v"].half()),
    "last dim not contiguous": lambda a: a.update(q=torch.randn(10, 16, 2).transpose(1, 2)),
    "2-dim q": lambda a: a.update(q=a["q"][:, 0]),
    "int64 cu_seqlens": lambda a: a.update(cu_seqlens=a["cu_seqlens"].long()),
    "tensor max_seqlen": lambda a: a.update(max_seqlen=torch.tensor(6)),
    "head dim 512": lambda a: a.update(
        q=torch.randn(10, 1, 512), k=torch.randn(10, 1, 512), v=torch.randn(10, 1, 512)
    ),
}


@pytest.mark.parametrize("bad", list(VARLEN_BAD))
def test_varlen_rejects_bad_inputs(varlen, bad):
    a = _varlen_ok()
    VARLEN_BAD[bad](a)
    with pytest.raises(ValueError):
        varlen.varlen_attention(a["q"], a["k"], a["v"], a["cu_seqlens"], a["max_seqlen"], scale=1.0)


def test_rel_bias_checks(varlen):
    a = _varlen_ok()
    for rb in (
        RelBias(torch.randn(3, 32), 32, 128, True),  # wrong head count
        RelBias(torch.randn(2, 32).double(), 32, 128, True),  # not float32
        RelBias(torch.randn(2, 16), 32, 128, True),  # table / num_buckets mismatch
        RelBias(torch.randn(2, 32), 32, 4, True),
    ):  # max_distance inside the exact range
        with pytest.raises(ValueError):
            varlen.varlen_attention(a["q"], a["k"], a["v"], a["cu_seqlens"], 6, scale=1.0, rel_bias=rb)


def _paged_ok(gen=None):
    case = paged_inputs([5, 9], [1, 2], 2, 16, 8, torch.float32, "cpu", gen=gen)
    return dict(
        zip(
            ["q", "k_cache", "v_cache", "block_tables", "seq_lens", "cu_seqlens_q", "max_seqlen_q"],
            case.args(),
            strict=True,
        )
    )


PAGED_BAD = {
    "cache dtype": lambda a: a.update(k_cache=a["k_cache"].half(), v_cache=a["v_cache"].half()),
    "cache heads": lambda a: a.update(
        k_cache=a["k_cache"][:, :, :1].contiguous(), v_cache=a["v_cache"][:, :, :1].contiguous()
    ),
    "block size 12": lambda a: a.update(k_cache=torch.zeros(4, 12, 2, 16), v_cache=torch.zeros(4, 12, 2, 16)),
    "cache not contiguous": lambda a: a.update(k_cache=a["k_cache"].transpose(0, 1)),
    "int64 block_tables": lambda a: a.update(block_tables=a["block_tables"].long()),
    "seq_lens length": lambda a: a.update(seq_lens=a["seq_lens"][:1]),
    "cu_seqlens_q length": lambda a: a.update(cu_seqlens_q=a["cu_seqlens_q"][:2]),
    "tensor max_seqlen_q": lambda a: a.update(max_seqlen_q=torch.tensor(2)),
    "float max_seqlen_q": lambda a: a.update(max_seqlen_q=2.0),
}


@pytest.mark.parametrize("bad", list(PAGED_BAD))
def test_paged_rejects_bad_inputs(paged, bad):
    a = _paged_ok()
    PAGED_BAD[bad](a)
    with pytest.raises(ValueError):
        paged.paged_attention(*a.values(), scale=1.0, causal=True)


def test_store_kv_rejects_bad_inputs(paged):
    k = torch.randn(3, 2, 16)
    cache = torch.zeros(2, 4, 2, 16)
    slots = torch.tensor([0, -1, 5])
    paged.store_kv(k, k, cache, cache.clone(), slots)  # fine
    for args in (
        (k, k, cache, cache.clone(), slots.int()),  # int32 slots
        (k, k, cache, cache.clone(), slots[:2]),  # wrong length
        (k, k[:, :1], cache, cache.clone(), slots),  # k/v shape mismatch
        (k, k, cache[:, :, :1], cache[:, :, :1].clone(), slots),  # cache heads
        (k.int(), k, cache, cache.clone(), slots),  # int k
        (k, k, cache.transpose(0, 1), cache.clone(), slots),
    ):  # cache not contiguous
        with pytest.raises(ValueError):
            paged.store_kv(*args)


@pytest.mark.parametrize("bias", [None, "causal"])
def test_paged_query_rows_before_the_first_key(paged, gen, bias):
    """Speculative verification graphs pad each sequence to K + 1 query rows, padding first: a
    padding row may sit before position 0 (the causal rule gives it no key). Such rows come out as
    zeros (never NaN, never a read past the sequence), and the rows after them are exact."""
    seq_lens, q_lens = [3, 12], [9, 9]
    case = paged_inputs(seq_lens, q_lens, 2, 16, 8, torch.float32, "cpu", gen=gen)
    rb = rel_bias(2, False, "cpu", num_buckets=16, max_distance=24, gen=gen) if bias else None
    kw = dict(scale=0.25, causal=True, rel_bias=rb)
    ref = reference.paged_attention(*case.args(), **kw)
    with poisoned_allocations():
        out = paged.paged_attention(*case.args(), **kw)
    start = 0
    for n, q in zip(seq_lens, q_lens):
        first = max(0, q - n)  # rows before this one see no key
        assert torch.equal(out[start : start + first], torch.zeros_like(out[start : start + first]))
        assert rel_err(out[start + first : start + q], ref[start + first : start + q]) < TOL[torch.float32]
        start += q
