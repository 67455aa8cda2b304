"""Triton kernels vs encdec_kernels.reference on CUDA, with the real model shapes.

Run on a GPU machine: ``pytest tests/gpu/test_kernels_gpu.py -m gpu``. Skipped without CUDA,
and when TRITON_INTERPRET=1 (these must run compiled kernels; see tests/kernels/conftest.py).

Time goes mostly into compiling (about a second per kernel variant), so the cases are chosen
to need few distinct variants (about 60), and varlen_attention runs with ENCDEC_AUTOTUNE=0
(one fixed config per key, no benchmarking) except in test_varlen_every_autotune_config, which
checks every config the autotuner may pick and then the autotuner itself. A watchdog ends the
process, printing every thread's traceback, if one test runs past TEST_TIMEOUT_S: a hang
cannot stall the run (exit status 1).
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading

import pytest
import torch

from encdec_kernels import reference
from tests.kernels.cases import (
    hopper_shared_kv_inputs,
    paged_inputs,
    poisoned_allocations,
    rel_bias,
    rel_err,
    shared_kv_inputs,
    varlen_inputs,
)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(INTERPRET, reason="TRITON_INTERPRET=1 is set; GPU kernel tests need compiled kernels"),
]

if torch.cuda.is_available() and not INTERPRET:
    # Import (compile-mode) triton now, at collection, before tests/kernels/conftest.py could
    # switch this process to the interpreter.
    from encdec_kernels import flash_hopper, linear, norm, paged, shared_kv, varlen
else:
    flash_hopper = linear = norm = paged = shared_kv = varlen = None
HOPPER = torch.cuda.is_available() and not INTERPRET and torch.cuda.get_device_capability()[0] == 9

TEST_TIMEOUT_S = 120  # per test, compiles included (the slowest compiles ~10 kernel variants)
AUTOTUNE_ENV = "ENCDEC_AUTOTUNE"  # == encdec_kernels.varlen.AUTOTUNE_ENV
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


@pytest.fixture(autouse=True)
def _watchdog(request):
    """A test running past TEST_TIMEOUT_S prints every thread's traceback (past pytest's output
    capture) and ends the process, so a hung kernel cannot stall the run. A Python timer does it
    (the main thread releases the GIL while it waits on the GPU); faulthandler's C thread ends
    the process 30 s later in case the main thread holds the GIL."""

    def expire():
        capman = request.config.pluginmanager.getplugin("capturemanager")
        if capman is not None:
            capman.suspend_global_capture(in_=True)
        sys.stderr.write(f"\n{request.node.nodeid} ran past {TEST_TIMEOUT_S} s; stopping the run\n")
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        os._exit(1)

    timer = threading.Timer(TEST_TIMEOUT_S, expire)
    timer.daemon = True
    timer.start()
    faulthandler.dump_traceback_later(TEST_TIMEOUT_S + 30, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()
    timer.cancel()


@pytest.fixture(autouse=True, scope="module")
def _fixed_varlen_configs():
    """No autotuning here (every config would be compiled and benchmarked per key)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(AUTOTUNE_ENV, "0")
        yield


def t5_lengths(n, seed=1):
    return torch.randint(*T5_LENGTHS, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# -- encoder / prefill ------------------------------------------------------------------------


@pytest.mark.parametrize("gluon", ["1", "0"], ids=["hopper-kernel-if-any", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_whisper_encoder_attention(monkeypatch, dtype, gluon):
    monkeypatch.setenv("ENCDEC_GLUON", gluon)  # == encdec_kernels.gluon_support.ENV
    q, k, v, cu = varlen_inputs([WHISPER_FRAMES] * 4, WHISPER_HEADS, HEAD_DIM, dtype, DEVICE, fused=True)
    ref = reference.varlen_attention(q, k, v, cu, WHISPER_FRAMES, scale=HEAD_DIM**-0.5)
    with poisoned_allocations():
        out = varlen.varlen_attention(q, k, v, cu, WHISPER_FRAMES, scale=HEAD_DIM**-0.5)
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize(
    "dtype,bias",
    [(torch.bfloat16, False), (torch.bfloat16, True), (torch.float16, True), (torch.float32, True)],
    ids=str,
)
def test_t5_encoder_attention_ragged(dtype, bias):
    lens = t5_lengths(8)
    q, k, v, cu = varlen_inputs(lens, T5_HEADS, HEAD_DIM, dtype, DEVICE)
    rb = rel_bias(T5_HEADS, True, DEVICE) if bias else None
    ref = reference.varlen_attention(q, k, v, cu, max(lens), scale=1.0, rel_bias=rb)
    with poisoned_allocations():
        out = varlen.varlen_attention(q, k, v, cu, max(lens), scale=1.0, rel_bias=rb)
    assert rel_err(out, ref) < TOL[dtype]


def test_varlen_every_autotune_config(monkeypatch):
    """Each config the autotuner may pick (bf16, D = 64, T5 bias: the in-place pair gathers),
    then the autotuner itself on the same key (it reuses those compiled kernels)."""
    lens = t5_lengths(8, seed=3)
    q, k, v, cu = varlen_inputs(lens, T5_HEADS, HEAD_DIM, torch.bfloat16, DEVICE)
    rb = rel_bias(T5_HEADS, True, DEVICE)
    ref = reference.varlen_attention(q, k, v, cu, max(lens), scale=1.0, rel_bias=rb)
    configs = varlen._varlen_configs_for(HEAD_DIM, torch.bfloat16)
    assert len(configs) > 1
    for config in configs:
        with poisoned_allocations():
            out = varlen._launch_varlen(q, k, v, cu, max(lens), 1.0, False, rb, config=config)
        assert rel_err(out, ref) < TOL[torch.bfloat16], config
    monkeypatch.setenv(AUTOTUNE_ENV, "1")
    out = varlen.varlen_attention(q, k, v, cu, max(lens), scale=1.0, rel_bias=rb)
    assert rel_err(out, ref) < TOL[torch.bfloat16]
    assert varlen._varlen_attn_tuned.cache  # benchmarked and cached a choice


@pytest.mark.skipif(not HOPPER, reason="the Gluon encoder kernel is for Hopper (sm_90)")
@pytest.mark.parametrize(
    "lens,heads,head_dim,dtype,fused",
    [
        ([WHISPER_FRAMES] * 3, WHISPER_HEADS, HEAD_DIM, torch.bfloat16, True),  # 720 tiles: many per CTA
        (None, T5_HEADS, HEAD_DIM, torch.bfloat16, False),  # ragged T5 lengths
        ([1, 5, 127, 128, 129, 255, 256, 257, 700], 3, 64, torch.float16, False),  # tile edges
        ([1, 63, 64, 65, 300, 513], 2, 128, torch.bfloat16, True),
    ],
    ids=["whisper", "t5-ragged", "edges-d64-fp16", "edges-d128"],
)
def test_hopper_encoder_kernel(lens, heads, head_dim, dtype, fused):
    """encdec_kernels/flash_hopper.py against the reference, and varlen_attention dispatching to it."""
    assert flash_hopper.AVAILABLE
    lens = lens or t5_lengths(8)
    q, k, v, cu = varlen_inputs(lens, heads, head_dim, dtype, DEVICE, fused=fused)
    assert flash_hopper.supports(q, k, v, False, None)
    assert not flash_hopper.supports(q, k, v, True, None)  # causal stays on Triton
    scale = head_dim**-0.5
    ref = reference.varlen_attention(q, k, v, cu, max(lens), scale=scale)
    with poisoned_allocations():
        out = flash_hopper.flash_attention(q, k, v, cu, max(lens), scale)
    assert rel_err(out, ref) < TOL[dtype]
    if max(lens) >= varlen.HOPPER_MIN_SEQLEN:  # varlen_attention takes it for long sequences
        with poisoned_allocations():
            via_dispatch = varlen.varlen_attention(q, k, v, cu, max(lens), scale=scale)
        assert torch.equal(via_dispatch, out)


@pytest.mark.skipif(not HOPPER, reason="the Gluon encoder kernel is for Hopper (sm_90)")
def test_hopper_kernel_that_does_not_compile_falls_back_to_triton(monkeypatch):
    """A Triton whose Gluon API no longer fits the kernel: the first call logs, returns the Triton
    kernel's result, and the Hopper kernel is not tried again."""
    from triton.compiler.errors import CompilationError

    tries = []

    class Broken:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                tries.append(grid)
                raise CompilationError("", None, "AttributeError: a Gluon API this Triton lacks")

            return launch

    monkeypatch.setattr(flash_hopper, "_flash_fwd_kernel", Broken())
    monkeypatch.setattr(flash_hopper._guard, "failed", None)
    q, k, v, cu = varlen_inputs([WHISPER_FRAMES] * 2, 4, HEAD_DIM, torch.bfloat16, DEVICE, fused=True)
    ref = reference.varlen_attention(q, k, v, cu, WHISPER_FRAMES, scale=0.125)
    for _ in range(2):
        out = varlen.varlen_attention(q, k, v, cu, WHISPER_FRAMES, scale=0.125)
        assert rel_err(out, ref) < TOL[torch.bfloat16]
    assert len(tries) == 1 and "a Gluon API this Triton lacks" in flash_hopper._guard.failed
    assert not flash_hopper.supports(q, k, v, False, None)


@pytest.mark.skipif(not HOPPER, reason="the Gluon encoder kernel is for Hopper (sm_90)")
@pytest.mark.parametrize("config", [dict(CONSUMERS=2, REGS=240, PIPELINE=False, K_STAGES=2),
                                    dict(CONSUMERS=2, REGS=240, PIPELINE=True, K_STAGES=3),
                                    dict(CONSUMERS=3, REGS=160, PIPELINE=False, K_STAGES=2),
                                    dict(BLOCK_N=64, K_STAGES=4)], ids=str)  # fmt: skip
def test_hopper_encoder_kernel_configs(config):
    """The other kernel variants the sweep times (benchmarks/sweep_kernels.py --only hopper)."""
    lens = [1, 127, 129, 700, 1500, 64]
    q, k, v, cu = varlen_inputs(lens, 5, HEAD_DIM, torch.bfloat16, DEVICE, fused=True)
    ref = reference.varlen_attention(q, k, v, cu, max(lens), scale=0.125)
    with poisoned_allocations():
        out = flash_hopper.flash_attention(q, k, v, cu, max(lens), 0.125, config)
    assert rel_err(out, ref) < TOL[torch.bfloat16]


@pytest.mark.parametrize(
    "head_dim,causal,bias", [(80, True, False), (80, True, True), (80, False, False), (128, True, True)]
)
def test_varlen_other_head_dims(head_dim, causal, bias):
    lens = [1, 200, 333, 64]
    q, k, v, cu = varlen_inputs(lens, 4, head_dim, torch.bfloat16, DEVICE)
    kw = dict(causal=causal, rel_bias=rel_bias(4, not causal, DEVICE) if bias else None)
    ref = reference.varlen_attention(q, k, v, cu, 333, scale=head_dim**-0.5, **kw)
    with poisoned_allocations():
        out = varlen.varlen_attention(q, k, v, cu, 333, scale=head_dim**-0.5, **kw)
    assert rel_err(out, ref) < TOL[torch.bfloat16]


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
        out = paged.paged_attention(*case.args(), scale=HEAD_DIM**-0.5, causal=False)
    assert rel_err(out, ref) < TOL[dtype]


SELF_DECODE_CASES = [  # (dtype, q_len, T5 bias, cache block size, SINGLE_QUERY_DOT)
    (torch.bfloat16, 1, False, 16, True),
    (torch.bfloat16, 4, False, 16, True),
    (torch.bfloat16, 1, True, 16, True),
    (torch.bfloat16, 4, True, 16, True),
    (torch.bfloat16, 1, False, 32, True),
    (torch.float32, 4, True, 32, True),
    (torch.bfloat16, 1, False, 16, False),  # one query: the broadcast-multiply reduction path
    (torch.bfloat16, 1, True, 16, False),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch,q_len", [(DECODE_BATCH, 1), (3, 1), (2, 4)])
def test_absorbed_cross_attention(dtype, batch, q_len):
    """shared_kv_attention on Whisper large-v3's absorbed cross-attention: 20 heads over
    1280-wide encoder rows (two column tiles, 1024 + 256), 1500 rows in blocks of 2 * 32 layers *
    16 rows; batch 256 (no split), small batches (split + merge), 4 query tokens (prompt)."""
    case = shared_kv_inputs(
        [CROSS_LEN] * batch, [q_len] * batch, WHISPER_HEADS, 1280, 64, 16, dtype, DEVICE, spare_blocks=1
    )
    with poisoned_allocations():
        out = shared_kv.shared_kv_attention(*case.args(), scale=HEAD_DIM**-0.5)
    n = min(batch, 4)  # the reference loops over sequences in Python: check a few
    ref = reference.shared_kv_attention(
        case.q[: n * q_len], case.rows, case.block_tables[:n], case.seq_lens[:n], case.cu_seqlens_q[: n + 1],
        q_len, scale=HEAD_DIM**-0.5,
    )  # fmt: skip
    assert not out.isnan().any()
    assert rel_err(out[: n * q_len], ref) < TOL[dtype]


def _hopper_case(lens, q_lens, heads, width, chunks, dtype):
    return hopper_shared_kv_inputs(lens, q_lens, heads, width, chunks, dtype, DEVICE)


@pytest.mark.skipif(not HOPPER, reason="the Gluon cross-attention kernel is for Hopper (sm_90)")
def test_hopper_absorbed_cross_attention_several_tokens(monkeypatch):
    """Steps with prompts or several tokens of a sequence (max_seqlen_q > 1) run on the Hopper
    kernel too, one row of block table per query token."""
    from encdec_kernels import shared_kv_hopper

    calls = []
    real = shared_kv_hopper.shared_kv_attention
    monkeypatch.setattr(
        shared_kv_hopper, "shared_kv_attention", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    case = _hopper_case([1500, 20, 700], [4, 1, 2], WHISPER_HEADS, 1280, 64, torch.bfloat16)
    with poisoned_allocations():
        out = shared_kv.shared_kv_attention(*case.args(), scale=0.125)
    assert calls == [1]
    ref = reference.shared_kv_attention(*case.args(), scale=0.125)
    assert not out.isnan().any()
    assert rel_err(out, ref) < TOL[torch.bfloat16]
    # ENCDEC_GLUON_MULTI_QUERY=0: such calls take the Triton kernel (rows read once per query group)
    monkeypatch.setenv(shared_kv.MULTI_QUERY_ENV, "0")
    with poisoned_allocations():
        out = shared_kv.shared_kv_attention(*case.args(), scale=0.125)
    assert calls == [1]
    assert not out.isnan().any()
    assert rel_err(out, ref) < TOL[torch.bfloat16]


@pytest.mark.skipif(not HOPPER, reason="the Gluon cross-attention kernel is for Hopper (sm_90)")
@pytest.mark.parametrize(
    "lens,heads,width,chunks,dtype,splits",
    [
        ([CROSS_LEN] * DECODE_BATCH, WHISPER_HEADS, 1280, 64, torch.bfloat16, None),  # W1: 3 consumers
        ([CROSS_LEN, 700, 1], WHISPER_HEADS, 1280, 64, torch.bfloat16, None),  # small batch: split + merge
        ([350, 77, 1, 64, 65, 128, 129], T5_HEADS, 1024, 24, torch.float16, None),  # BART/T5-large: 2
        ([1500, 33, 191, 192], 6, 384, 4, torch.bfloat16, 3),  # Whisper tiny: 1 consumer, 3 splits
        ([200, 1, 63], 2, 128, 4, torch.float16, 1),  # a 2-head toy model, tile edges
    ],
    ids=["whisper-b256", "whisper-split", "large-16-heads", "tiny-splits", "toy"],
)
def test_hopper_absorbed_cross_attention(lens, heads, width, chunks, dtype, splits):
    """encdec_kernels/shared_kv_hopper.py (decode: one query token per sequence, q a view of [H, B, d]
    as the layer makes it) matches the reference; rows past each sequence are NaN, so a read
    past the end shows."""
    from encdec_kernels import shared_kv_hopper

    case = _hopper_case(lens, [1] * len(lens), heads, width, chunks, dtype)
    q = case.q
    assert shared_kv_hopper.supports(q, case.rows)
    with poisoned_allocations():
        out = shared_kv_hopper.shared_kv_attention(
            q, case.rows, case.block_tables, case.seq_lens, 0.125, num_splits=splits
        )
    assert out is not None  # compiled
    n = min(len(lens), 8)
    args = case.args()
    ref = reference.shared_kv_attention(
        case.q[:n], case.rows, case.block_tables[:n], case.seq_lens[:n], args[4][: n + 1], 1, scale=0.125
    )
    assert not out.isnan().any()
    assert rel_err(out[:n], ref) < TOL[dtype]
    # and through the public entry point (the dispatch takes this kernel for such inputs)
    assert rel_err(shared_kv.shared_kv_attention(q, *args[1:], scale=0.125)[:n], ref) < TOL[dtype]


def test_absorbed_cross_attention_fp32_and_other_widths():
    """float32 (exact dots) and the other families' widths: 1024 (BART/T5 large, one tile), 768,
    384 (tiny: 256 + 128)."""
    for width, heads, dtype in (
        (1024, 16, torch.bfloat16),
        (768, 12, torch.bfloat16),
        (384, 6, torch.float32),
    ):
        case = shared_kv_inputs([350, 77, 1], [1, 1, 1], heads, width, 24, 16, dtype, DEVICE)
        with poisoned_allocations():
            out = shared_kv.shared_kv_attention(*case.args(), scale=0.125)
        ref = reference.shared_kv_attention(*case.args(), scale=0.125)
        assert rel_err(out, ref) < TOL[dtype], width


@pytest.mark.parametrize("dtype,q_len,bias,block_size,single_query_dot", SELF_DECODE_CASES, ids=str)
def test_self_attention_decode(monkeypatch, dtype, q_len, bias, block_size, single_query_dot):
    """Decoder self-attention over paged blocks, lengths up to 200, T5 causal bias optional."""
    monkeypatch.setattr(paged, "SINGLE_QUERY_DOT", single_query_dot)
    batch = DECODE_BATCH
    gen = torch.Generator().manual_seed(2)
    seq_lens = torch.randint(q_len, SELF_MAX + 1, (batch,), generator=gen).tolist()
    heads = T5_HEADS if bias else WHISPER_HEADS
    case = paged_inputs(seq_lens, [q_len] * batch, heads, HEAD_DIM, block_size, dtype, DEVICE)
    rb = rel_bias(heads, False, DEVICE) if bias else None
    kw = dict(scale=1.0 if bias else HEAD_DIM**-0.5, causal=True, rel_bias=rb)
    ref = reference.paged_attention(*case.args(), **kw)
    with poisoned_allocations():
        out = paged.paged_attention(*case.args(), **kw)
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("batch,q_len,bias", [(1, 1, False), (3, 4, True), (64, 1, False)])
def test_split_kv_long_self_attention(batch, q_len, bias):
    """Few (sequence, head) programs over 4000 keys: split-KV + merge (63, 21 and 2 splits on an
    H100), with the T5 bias on the multi-query case."""
    seq_lens = [LONG_KEYS - 37 * b for b in range(batch)]
    case = paged_inputs(seq_lens, [q_len] * batch, 8, 128, 16, torch.bfloat16, DEVICE)
    kw = dict(scale=128**-0.5, causal=True, rel_bias=rel_bias(8, False, DEVICE) if bias else None)
    ref = reference.paged_attention(*case.args(), **kw)
    with poisoned_allocations():
        out = paged.paged_attention(*case.args(), **kw)
    assert rel_err(out, ref) < TOL[torch.bfloat16]


def test_decode_step_captures_in_cuda_graph():
    """store_kv + self (T5 bias) + cross paged attention captured once, replayed with new
    lengths/data. Batch 8: split-KV path on an H100."""
    batch, heads, bs, width = 8, WHISPER_HEADS, 16, 16
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
    rb = rel_bias(heads, False, DEVICE)

    def step():
        paged.store_kv(k_new, v_new, self_k, self_v, slots)
        s = paged.paged_attention(
            q, self_k, self_v, tables, seq_lens, cu_q, 1, scale=0.125, causal=True, rel_bias=rb
        )
        c = paged.paged_attention(
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
        step()  # warm-up: compiles the kernels and caches the bias bucket table outside capture
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
            q, k_ref, v_ref, tables, seq_lens, cu_q, 1, scale=0.125, causal=True, rel_bias=rb
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
    paged.store_kv(k, v, caches[2], caches[3], slots)
    assert torch.equal(caches[0].isnan(), caches[2].isnan())
    assert torch.equal(caches[0].nan_to_num(), caches[2].nan_to_num())
    assert torch.equal(caches[1].nan_to_num(), caches[3].nan_to_num())


# -- norms ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype,c",
    [(torch.bfloat16, 1280), (torch.bfloat16, 1024), (torch.float16, 1280), (torch.float32, 4096)],
    ids=str,
)
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


# -- one-row and few-row linear layers (batch-1 decoding, its verification steps) -----------------


@pytest.mark.parametrize("m", [1, 5, 16], ids=lambda m: f"m{m}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize(
    "n,k,act",
    [(3840, 1280, None), (1280, 1280, None), (5120, 1280, "gelu"), (1280, 5120, None), (4096, 1024, "relu"),
     (2816, 1024, "gelu_new"), (51866, 1280, None)],
    ids=str,
)  # fmt: skip
def test_gemv(dtype, n, k, act, m):
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    w = (torch.randn(n, k, device=DEVICE) / k**0.5).to(dtype)
    b = torch.randn(n, device=DEVICE).to(dtype)
    with poisoned_allocations():
        got = linear.gemv(x, w, b, act)
    assert rel_err(got, reference.gemv(x, w, b, act)) < TOL[dtype]


@pytest.mark.parametrize("m", [1, 5, 9], ids=lambda m: f"m{m}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("is_rms,residual", [(False, True), (False, False), (True, True)], ids=str)
def test_norm_gemv(dtype, is_rms, residual, m):
    d, n = 1280, 3840
    x = (torch.randn(m, d, device=DEVICE) * 3 + torch.arange(m, device=DEVICE)[:, None]).to(dtype)
    r = torch.randn(m, d, device=DEVICE).to(dtype) if residual else None
    nw, nb = (
        torch.randn(d, device=DEVICE).to(dtype),
        None if is_rms else torch.randn(d, device=DEVICE).to(dtype),
    )
    w = (torch.randn(n, d, device=DEVICE) / d**0.5).to(dtype)
    b = torch.randn(n, device=DEVICE).to(dtype)
    with poisoned_allocations():
        got, summed = linear.norm_gemv(x, r, nw, nb, 1e-5, is_rms, w, b, "gelu")
    want, want_sum = reference.norm_gemv(x, r, nw, nb, 1e-5, is_rms, w, b, "gelu")
    assert rel_err(got, want) < TOL[dtype]
    assert torch.equal(summed, want_sum)


def _rows_inputs(m, n, k):
    """bf16 x [m, K] (rows of growing scale), residual, LayerNorm weight and bias, weight [n, K], bias."""
    x = (torch.randn(m, k, device=DEVICE) * torch.arange(1, m + 1, device=DEVICE)[:, None]).bfloat16()
    r = torch.randn(m, k, device=DEVICE).bfloat16()
    nw, nb = torch.rand(k, device=DEVICE).bfloat16() + 0.5, torch.randn(k, device=DEVICE).bfloat16()
    w = (torch.randn(n, k, device=DEVICE) / k**0.5).bfloat16()
    return x, r, nw, nb, w, torch.randn(n, device=DEVICE).bfloat16()


@pytest.mark.parametrize("m", [1, 5], ids=lambda m: f"m{m}")
def test_gemv_kv_store_writes_what_store_kv_writes(m):
    """Whisper large-v3's self-attention qkv projection (20 heads of 64, LayerNorm before it) with
    ``kv_store``, compiled: y as without it, and the bf16 cache slots exactly as ``store_kv``
    writes them from y (one slot -1: untouched)."""
    k, h, d = 1280, 20, 64
    x, r, nw, nb, w, b = _rows_inputs(m, 3 * h * d, k)
    slots = torch.tensor([37, -1, 5, 63, 12][:m], device=DEVICE)
    caches = [torch.full((4, 16, h, d), 7.0, device=DEVICE, dtype=torch.bfloat16) for _ in range(4)]
    with poisoned_allocations():
        y, _ = linear.norm_gemv(x, r, nw, nb, 1e-5, False, w, b, None, (caches[0], caches[1], slots))
        plain, _ = linear.norm_gemv(x, r, nw, nb, 1e-5, False, w, b, None)
        _, key, value = plain.view(m, 3, h, d).unbind(1)
        paged.store_kv(key, value, caches[2], caches[3], slots)
    assert torch.equal(y, plain)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])


@pytest.mark.parametrize("m", [2, 5, 8], ids=lambda m: f"m{m}")
@pytest.mark.parametrize("n,k,norm", [(5120, 1280, True), (1280, 5120, False), (3840, 1280, True)], ids=str)
def test_gemv_several_rows_equal_their_one_row_results(n, k, norm, m):
    """2 to 8 rows on the one-row kernel (``linear.GEMV_ROWS``), compiled: each row's output bit for
    bit what a call with that row alone gives; with a norm, what its row normed by the norm kernel
    gives alone (several rows take the norm kernel, then the one-row kernel without its norm)."""
    from encdec_kernels.norm import add_norm

    assert m <= linear.GEMV_ROWS
    x, r, nw, nb, w, b = _rows_inputs(m, n, k)
    with poisoned_allocations():
        if norm:
            out, summed = linear.norm_gemv(x, r, nw, nb, 1e-5, False, w, b, "gelu")
            h, want_sum = add_norm(x, r, nw, nb, 1e-5, False)
            assert torch.equal(summed, want_sum)
        else:
            out, h = linear.gemv(x, w, b, "gelu"), x
        for i in range(m):
            assert torch.equal(out[i : i + 1], linear.gemv(h[i : i + 1], w, b, "gelu")), i


@pytest.mark.parametrize("n", [1, 200, 512, 1030])
def test_beam_children_on_cuda(n):
    """The children's tables and slots of a beam step launched ahead (``beams.beam_children``): the
    kernel equals the reference at W3's sizes and past one program's rows."""
    from encdec_kernels import beams
    from tests.kernels.test_beams import _children_case

    gen = torch.Generator().manual_seed(n)
    case = _children_case(n, 40, 16, gen)[:4]
    self_tables, parents, fork, up = (t.cuda() for t in case)
    want = reference.beam_children(self_tables, parents, fork, up, n, 16)
    got = beams.beam_children(self_tables, parents, fork, up, n, 16)
    for w, g in zip(want, got, strict=True):
        assert g.dtype == w.dtype and torch.equal(g, w)


@pytest.mark.parametrize("subset", [False, True])
def test_ngram_bans_on_cuda(subset):
    """The no-repeat-n-gram rule (``beams.ngram_bans``) at W3's sizes: bart-large's vocabulary,
    512 rows of up to 200 tokens, a small token range so that many n-grams repeat."""
    from encdec_kernels import beams

    gen = torch.Generator().manual_seed(3)
    rows, width = 512, 200
    tokens = torch.randint(0, 5, (rows, width), generator=gen)
    lengths = torch.randint(0, width + 1, (rows,), generator=gen)
    tokens[torch.arange(width) >= lengths[:, None]] = -1
    logits = torch.randn(rows, 50264, generator=gen)
    index = torch.arange(0, rows, 3) if subset else None
    want = logits.cuda()
    reference.ngram_bans(want, tokens.cuda(), lengths.cuda(), 3, None if index is None else index.cuda())
    got = logits.cuda()
    beams.ngram_bans(got, tokens.cuda(), lengths.cuda().int(), 3, None if index is None else index.cuda())
    assert torch.equal(got, want)
    assert torch.isinf(want).sum() > 300  # the case bans many tokens


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_beam_mask_hits_and_chosen_on_cuda(dtype):
    """A beam step's choice on the device (``beams.beam_mask_hits``, ``beams.beam_chosen``) at W3's
    sizes (128 requests, 4 beams, K 8): the kernels equal the reference."""
    from encdec_kernels import beams
    from tests.kernels.test_beams import _candidates_case

    gen = torch.Generator().manual_seed(5)
    packed, info, _, _ = (t.cuda() for t in _candidates_case(128, 4, 8, 50264, dtype, gen))
    masked = beams.beam_mask_hits(packed, info, 50264)
    assert torch.equal(masked, reference.beam_mask_hits(packed, info, 50264))
    chosen = torch.topk(masked, 4).indices
    for w, g in zip(reference.beam_chosen(packed, chosen, 50264), beams.beam_chosen(packed, chosen, 50264)):
        assert g.dtype == w.dtype and torch.equal(g, w)
