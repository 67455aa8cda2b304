"""Triton kernels vs kernels.reference on CUDA, with the real model shapes.

Run on a GPU machine: ``pytest tests/gpu/test_kernels_gpu.py -m gpu``. Skipped without CUDA,
and when TRITON_INTERPRET=1 (these must run compiled kernels; see tests/kernels/conftest.py).
"""

from __future__ import annotations

import os

import pytest
import torch

from kernels import reference
from tests.kernels.cases import paged_inputs, poisoned_allocations, rel_bias, rel_err, varlen_inputs

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(INTERPRET, reason="TRITON_INTERPRET=1 is set; GPU kernel tests need compiled kernels"),
]

if torch.cuda.is_available() and not INTERPRET:
    # Import (compile-mode) triton now, at collection, before tests/kernels/conftest.py could
    # switch this process to the interpreter.
    from kernels import attention, norm
else:
    attention = norm = None

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# ||out - ref|| / ||ref||; float32 dots run as exact fp32 FMAs ("ieee"), not TF32
TOL = {torch.float32: 5e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
WHISPER_HEADS, T5_HEADS, HEAD_DIM = 20, 16, 64  # whisper-large-v3: 1280 / 20; flan-t5-large: 16 x 64
WHISPER_FRAMES = 1500  # encoder positions of a 30 s window
CROSS_LEN = 1500  # Whisper cross-attention keys
T5_LENGTHS = (260, 441)  # ragged T5 inputs, as the W2/W4 workloads
DECODE_BATCH, SELF_MAX = 256, 200  # decode batch, longest decoder self-attention
LONG_KEYS = 4000  # split-KV test length
NORM_ROWS = 4096
DEVICE = "cuda"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def t5_lengths(n, seed=1):
    return torch.randint(*T5_LENGTHS, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# -- encoder / prefill ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_whisper_encoder_attention(dtype):
    q, k, v, cu = varlen_inputs([WHISPER_FRAMES] * 4, WHISPER_HEADS, HEAD_DIM, dtype, DEVICE, fused=True)
    ref = reference.varlen_attention(q, k, v, cu, WHISPER_FRAMES, scale=HEAD_DIM**-0.5)
    with poisoned_allocations():
        out = attention.varlen_attention(q, k, v, cu, WHISPER_FRAMES, scale=HEAD_DIM**-0.5)
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [False, True])
def test_t5_encoder_attention_ragged(dtype, bias):
    lens = t5_lengths(8)
    q, k, v, cu = varlen_inputs(lens, T5_HEADS, HEAD_DIM, dtype, DEVICE)
    rb = rel_bias(T5_HEADS, True, DEVICE) if bias else None
    ref = reference.varlen_attention(q, k, v, cu, max(lens), scale=1.0, rel_bias=rb)
    with poisoned_allocations():
        out = attention.varlen_attention(q, k, v, cu, max(lens), scale=1.0, rel_bias=rb)
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("head_dim", [80, 128])
def test_varlen_other_head_dims_causal(head_dim):
    lens = [1, 200, 333, 64]
    q, k, v, cu = varlen_inputs(lens, 4, head_dim, torch.bfloat16, DEVICE)
    rb = rel_bias(4, False, DEVICE)
    for kw in (dict(causal=True), dict(causal=True, rel_bias=rb), dict(causal=False)):
        ref = reference.varlen_attention(q, k, v, cu, 333, scale=head_dim**-0.5, **kw)
        out = attention.varlen_attention(q, k, v, cu, 333, scale=head_dim**-0.5, **kw)
        assert rel_err(out, ref) < TOL[torch.bfloat16], kw


# -- decode -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("q_len", [1, 4])
@pytest.mark.parametrize("batch", [DECODE_BATCH, 2])  # 2: few programs -> split-KV path
def test_cross_attention_decode(dtype, q_len, batch):
    """Whisper cross-attention: 1500 encoder keys; groups of 4 beams share block table rows."""
    share = [(b, b - b % 4) for b in range(batch) if b % 4]
    case = paged_inputs(
        [CROSS_LEN] * batch, [q_len] * batch, WHISPER_HEADS, HEAD_DIM, 16, dtype, DEVICE, share=share
    )
    ref = reference.paged_attention(*case.args(), scale=HEAD_DIM**-0.5, causal=False)
    with poisoned_allocations():
        out = attention.paged_attention(*case.args(), scale=HEAD_DIM**-0.5, causal=False)
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("q_len", [1, 4])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("block_size", [16, 32])
def test_self_attention_decode(dtype, q_len, bias, block_size):
    """Decoder self-attention over paged blocks, lengths up to 200, T5 causal bias optional."""
    batch = DECODE_BATCH
    gen = torch.Generator().manual_seed(2)
    seq_lens = torch.randint(q_len, SELF_MAX + 1, (batch,), generator=gen).tolist()
    heads = T5_HEADS if bias else WHISPER_HEADS
    case = paged_inputs(seq_lens, [q_len] * batch, heads, HEAD_DIM, block_size, dtype, DEVICE)
    rb = rel_bias(heads, False, DEVICE) if bias else None
    kw = dict(scale=1.0 if bias else HEAD_DIM**-0.5, causal=True, rel_bias=rb)
    ref = reference.paged_attention(*case.args(), **kw)
    with poisoned_allocations():
        out = attention.paged_attention(*case.args(), **kw)
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("batch,q_len", [(1, 1), (3, 4), (64, 1)])
def test_split_kv_long_self_attention(batch, q_len):
    seq_lens = [LONG_KEYS - 37 * b for b in range(batch)]
    case = paged_inputs(seq_lens, [q_len] * batch, 8, 128, 16, torch.bfloat16, DEVICE)
    ref = reference.paged_attention(*case.args(), scale=128**-0.5, causal=True)
    with poisoned_allocations():
        out = attention.paged_attention(*case.args(), scale=128**-0.5, causal=True)
    assert rel_err(out, ref) < TOL[torch.bfloat16]


def test_decode_step_captures_in_cuda_graph():
    """store_kv + self + cross paged attention captured once, replayed with new lengths/data."""
    batch, heads, bs, width = 8, WHISPER_HEADS, 16, 16  # 8 x 20 programs: split-KV path on an H100
    pool = batch * width + 1
    self_k = torch.zeros(pool, bs, heads, HEAD_DIM, device=DEVICE, dtype=torch.bfloat16)
    self_v = torch.zeros_like(self_k)
    cross = paged_inputs([CROSS_LEN] * batch, [1] * batch, heads, HEAD_DIM, bs, torch.bfloat16, DEVICE)
    tables = torch.arange(batch * width, device=DEVICE, dtype=torch.int32).view(batch, width)
    seq_lens = torch.ones(batch, device=DEVICE, dtype=torch.int32)
    cu_q = torch.arange(batch + 1, device=DEVICE, dtype=torch.int32)
    slots = torch.zeros(batch, device=DEVICE, dtype=torch.int64)
    q = torch.zeros(batch, heads, HEAD_DIM, device=DEVICE, dtype=torch.bfloat16)
    k_new, v_new = torch.zeros_like(q), torch.zeros_like(q)

    def step():
        attention.store_kv(k_new, v_new, self_k, self_v, slots)
        s = attention.paged_attention(q, self_k, self_v, tables, seq_lens, cu_q, 1, scale=0.125, causal=True)
        c = attention.paged_attention(
            s,
            cross.k_cache,
            cross.v_cache,
            cross.block_tables,
            cross.seq_lens,
            cu_q,
            1,
            scale=0.125,
            causal=False,
        )
        return s, c

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up: compiles the kernels outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        s_out, c_out = step()

    for pos in range(3):  # three decode steps, fresh data each
        seq_lens.fill_(pos + 1)
        slots.copy_(tables[:, pos // bs].long() * bs + pos % bs)
        for t in (q, k_new, v_new):
            t.copy_(torch.randn_like(t))
        graph.replay()
        k_ref, v_ref = self_k.clone(), self_v.clone()
        reference.store_kv(k_new, v_new, k_ref, v_ref, slots)
        s_ref = reference.paged_attention(
            q, k_ref, v_ref, tables, seq_lens, cu_q, 1, scale=0.125, causal=True
        )
        c_ref = reference.paged_attention(
            s_out,
            cross.k_cache,
            cross.v_cache,
            cross.block_tables,
            cross.seq_lens,
            cu_q,
            1,
            scale=0.125,
            causal=False,
        )
        torch.cuda.synchronize()
        assert rel_err(s_out, s_ref) < 1e-2
        assert rel_err(c_out, c_ref) < 1e-2


def test_store_kv():
    n, slots_total = 512, 64 * 16
    k = torch.randn(n, 2, WHISPER_HEADS, HEAD_DIM, device=DEVICE).unbind(1)[0]
    v = torch.randn(n, WHISPER_HEADS, HEAD_DIM, device=DEVICE)
    slots = torch.randperm(slots_total, device=DEVICE)[:n]
    slots[::7] = -1
    caches = [
        torch.full((64, 16, WHISPER_HEADS, HEAD_DIM), float("nan"), device=DEVICE, dtype=torch.bfloat16)
        for _ in range(4)
    ]
    reference.store_kv(k, v, caches[0], caches[1], slots)
    attention.store_kv(k, v, caches[2], caches[3], slots)
    assert torch.equal(caches[0].isnan(), caches[2].isnan())
    assert torch.equal(caches[0].nan_to_num(), caches[2].nan_to_num())
    assert torch.equal(caches[1].nan_to_num(), caches[3].nan_to_num())


# -- norms ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("c", [1280, 1024, 4096])
def test_norms(dtype, c):
    x = (torch.randn(NORM_ROWS, c, device=DEVICE) * 3).to(dtype)
    r = torch.randn(NORM_ROWS, c, device=DEVICE).to(dtype)
    w = torch.randn(c, device=DEVICE).to(dtype)
    b = torch.randn(c, device=DEVICE).to(dtype)
    tol = TOL[dtype]
    with poisoned_allocations():
        assert rel_err(norm.layer_norm(x, w, b, 1e-5), reference.layer_norm(x, w, b, 1e-5)) < tol
        assert rel_err(norm.layer_norm(x, w, None, 1e-5), reference.layer_norm(x, w, None, 1e-5)) < tol
        assert rel_err(norm.rms_norm(x, w, 1e-6), reference.rms_norm(x, w, 1e-6)) < tol
        for got, want in zip(
            norm.add_layer_norm(x, r, w, b, 1e-5), reference.add_layer_norm(x, r, w, b, 1e-5), strict=True
        ):
            assert rel_err(got, want) < tol
        for got, want in zip(
            norm.add_rms_norm(x, r, w, 1e-6), reference.add_rms_norm(x, r, w, 1e-6), strict=True
        ):
            assert rel_err(got, want) < tol
