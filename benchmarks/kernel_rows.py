"""The timing helper, device and Whisper shapes of ``benchmarks/kernel_table.py``, and its norm and
one-row linear rows: each kernel against the torch ops it replaces, as bandwidth beside the
measured copy bandwidth."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

DEVICE = "cuda"
DTYPE = torch.bfloat16
WHISPER_HEADS, WHISPER_FRAMES, WHISPER_BATCH = 20, 1500, 64  # whisper-large-v3 encoder


def bench(fn, graph=False) -> float:
    """Median milliseconds of fn (after one untimed call: compiles / autotunes). graph: time
    replays of a CUDA graph of fn (how the engine runs decode steps; no launch overhead)."""
    import triton.testing

    fn()
    torch.cuda.synchronize()
    if graph:
        return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def norm_cases(norm, copy_bw):
    rows, c = WHISPER_BATCH * WHISPER_FRAMES, 1280
    x = torch.randn(rows, c, device=DEVICE, dtype=DTYPE)
    r = torch.randn_like(x)
    w = torch.randn(c, device=DEVICE, dtype=DTYPE)
    bias = torch.randn(c, device=DEVICE, dtype=DTYPE)
    size = x.numel() * x.element_size()

    def torch_rms(t):
        var = t.float().pow(2).mean(-1, keepdim=True)
        return (w.float() * (t.float() * torch.rsqrt(var + 1e-6))).to(t.dtype)

    cases = [
        (
            "layer_norm [96000, 1280]",
            lambda: norm.layer_norm(x, w, bias, 1e-5),
            lambda: F.layer_norm(x, (c,), w, bias, 1e-5),
            2 * size,
        ),
        (
            "add_layer_norm [96000, 1280]",
            lambda: norm.add_layer_norm(x, r, w, bias, 1e-5),
            lambda: F.layer_norm(x + r, (c,), w, bias, 1e-5),
            4 * size,
        ),
        ("rms_norm [96000, 1280]", lambda: norm.rms_norm(x, w, 1e-6), lambda: torch_rms(x), 2 * size),
        (
            "add_rms_norm [96000, 1280]",
            lambda: norm.add_rms_norm(x, r, w, 1e-6),
            lambda: torch_rms(x + r),
            4 * size,
        ),
    ]
    return [
        bandwidth_row(name, "norm", bench(ours_fn), bench(base_fn), "torch ops", moved, copy_bw)
        for name, ours_fn, base_fn, moved in cases
    ]


def bandwidth_row(name, kind, ours, base, baseline, moved, copy_bw) -> dict:
    """A memory-bound case's result: times (ms), ratio, GB/s on ``moved`` bytes, copy fraction."""
    return dict(
        name=name,
        kind=kind,
        ours_ms=ours,
        baseline_ms=base,
        baseline=baseline,
        ratio=base / ours,
        ours_GBps=moved / (ours * 1e-3) / 1e9,
        copy_fraction=moved / (ours * 1e-3) / copy_bw,
    )


# -- one-row linear layers (batch-1 decoding) -------------------------------------------------


def cycling_weights(n: int, k: int):
    """A function giving the next of several (weight [n, k], bias [n]) copies, cycled per call (each
    captured call reads another): 120 MB in all, more than the L2 cache, as a decode step's 32
    layers are."""
    copies = max(2, 120 * 2**20 // (n * k * 2))
    ws = [
        (torch.randn(n, k, device=DEVICE, dtype=DTYPE) / k**0.5, torch.randn(n, device=DEVICE, dtype=DTYPE))
        for _ in range(copies)
    ]
    return itertools.cycle(ws).__next__


def linear_cases(copy_bw):
    """encdec_kernels.gemv / norm_gemv on Whisper large-v3 decoder weights at one row, against cuBLAS
    (F.linear, + F.gelu, after our norm kernel). CUDA-graph timings: the kernels as a captured
    decode step runs them."""
    from encdec_kernels import linear, norm

    d, ff = 1280, 5120
    x = torch.randn(1, d, device=DEVICE, dtype=DTYPE)
    r = torch.randn_like(x)
    h = torch.randn(1, ff, device=DEVICE, dtype=DTYPE)
    nw, nb = torch.randn(d, device=DEVICE, dtype=DTYPE), torch.randn(d, device=DEVICE, dtype=DTYPE)
    out = []

    def weights(n, k):
        return cycling_weights(n, k), n * k * DTYPE.itemsize

    qkv, o, fc1, fc2 = weights(3 * d, d), weights(d, d), weights(ff, d), weights(d, ff)

    def normed(w, b):
        return linear.norm_gemv(x, r, nw, nb, 1e-5, False, w, b)

    def normed_cublas(w, b):
        return F.linear(norm.add_layer_norm(x, r, nw, nb, 1e-5)[0], w, b)

    cases = [
        ("gemv qkv 3840x1280", lambda w, b: linear.gemv(x, w, b), lambda w, b: F.linear(x, w, b), qkv),
        ("gemv out 1280x1280", lambda w, b: linear.gemv(x, w, b), lambda w, b: F.linear(x, w, b), o),
        ("gemv fc1 5120x1280 + gelu", lambda w, b: linear.gemv(x, w, b, "gelu"),
         lambda w, b: F.gelu(F.linear(x, w, b)), fc1),
        ("gemv fc2 1280x5120", lambda w, b: linear.gemv(h, w, b), lambda w, b: F.linear(h, w, b), fc2),
        ("add_layer_norm + gemv qkv 3840x1280", normed, normed_cublas, qkv),
        ("add_layer_norm + gemv out 1280x1280", normed, normed_cublas, o),
    ]  # fmt: skip
    for name, ours_fn, base_fn, (next_w, moved) in cases:
        ours = bench(lambda f=ours_fn, nxt=next_w: f(*nxt()), graph=True)
        base = bench(lambda f=base_fn, nxt=next_w: f(*nxt()), graph=True)
        out.append(bandwidth_row(name, "linear", ours, base, "cuBLAS (F.linear)", moved, copy_bw))
    return out


# -- main --------------------------------------------------------------------------------------
