"""Tile-parameter sweep of the attention kernels on the standard shapes (CUDA only).

    python benchmarks/sweep_kernels.py [--only decode|encoder|linear|rows|hopper|splits|fp8] [--out FILE]

For the decode kernel: BLOCK_N x num_warps x num_stages (and split counts at batch 1) on the
shapes of benchmarks/kernel_table.py; for the encoder kernel: extra tile configs beyond the autotune
list, on the Whisper large-v3 shape; for the one-row linear kernel: BLOCK_N x CHUNK (block_k) x
num_warps on the Whisper large-v3 decoder weights; for a few rows (2-16: the one-row kernel row by
row, the tensor-core kernel's tiles) against cuBLAS, alone and with the fused pre-norm; for the
decode kernel on an fp8 pool (``fp8``): against bf16 on the BART workloads' and Whisper's
cross-attention shapes, with its tiles. Prints
milliseconds (CUDA-graph replays for decode) and the copy-bandwidth fraction, to choose the
defaults in encdec_kernels/paged.py and varlen.py from measurements.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import itertools
import json
import pathlib
import sys
from unittest import mock

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
_spec = importlib.util.spec_from_file_location("kbench", ROOT / "benchmarks" / "kernel_table.py")
kb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kb)
from benchmarks.kernel_rows import cycling_weights  # noqa: E402


def decode_shapes():
    self_base = np.random.default_rng(2).integers(1, kb.SELF_MAX + 1, size=kb.DECODE_BATCH).tolist()
    return [
        ("t5 self b256 bias", [n + 1 for n in self_base], kb.T5_HEADS, True, True),
        ("self b256", [n + 1 for n in self_base], kb.WHISPER_HEADS, True, False),
        ("cross b256", [kb.CROSS_LEN] * kb.DECODE_BATCH, kb.WHISPER_HEADS, False, False),
        ("cross b1", [kb.CROSS_LEN], kb.WHISPER_HEADS, False, False),
        ("cross b8", [kb.CROSS_LEN] * 8, kb.WHISPER_HEADS, False, False),
        ("cross b32", [kb.CROSS_LEN] * 32, kb.WHISPER_HEADS, False, False),
    ]


def sweep_decode(copy_bw, rows):
    import triton.testing

    from encdec_kernels import paged, reference

    gen = np.random.default_rng(0)
    for name, lens, heads, causal, with_bias in decode_shapes():
        b = len(lens)
        k_cache, v_cache, tables = kb.paged_cache(lens, heads, gen)
        seq_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
        cu = torch.arange(b + 1, dtype=torch.int32, device="cuda")
        q = torch.randn(b, heads, kb.HEAD_DIM, device="cuda", dtype=kb.DTYPE)
        rb = None
        if with_bias:
            rb = reference.RelBias(
                torch.randn(heads, kb.T5_BUCKETS, device="cuda"), kb.T5_BUCKETS, kb.T5_MAX_DISTANCE, False
            )
        moved = (2 * sum(lens) + 2 * b) * heads * kb.HEAD_DIM * 2
        ref = paged._launch_paged(q, k_cache, v_cache, tables, seq_lens, cu, 1, 1.0, causal, rb)
        splits = [None] + ([4, 8, 12, 16, 24, 32, 48] if b <= 32 else [])
        if b <= 32:  # small batches: the split count matters most
            configs = [(64, 4, 3), (32, 4, 3), (16, 4, 3), (32, 2, 3), (16, 2, 2)]
        else:
            configs = [(64, 4, 3)] + [
                c for c in itertools.product((16, 32, 64, 128), (2, 4, 8), (2, 3)) if c != (64, 4, 3)
            ]
        for (bn, nw, ns), sp in itertools.product(configs, splits):
            fn = functools.partial(
                paged._launch_paged, q, k_cache, v_cache, tables, seq_lens, cu, 1, 1.0, causal, rb,
                num_splits=sp, block_n=bn, num_warps=nw, num_stages=ns,
            )  # fmt: skip

            try:
                out = fn()
                torch.cuda.synchronize()
                err = kb.rel_err(out, ref)
                ms = triton.testing.do_bench_cudagraph(fn, rep=30, return_mode="median")
            except Exception as e:  # a config that does not compile (registers, shared memory)
                print(f"{name:<18} bn{bn} w{nw} s{ns} split {sp}: failed {type(e).__name__}")
                continue
            frac = moved / (ms * 1e-3) / copy_bw
            rows.append(dict(case=name, block_n=bn, warps=nw, stages=ns, splits=sp, ms=ms, copy=frac))
            print(
                f"{name:<18} bn{bn:<4} w{nw} s{ns} split {sp!s:<5} {ms * 1e3:7.1f} us {frac:4.0%} {err:.0e}"
            )


def fp8_shapes():
    """Decode steps of the BART workloads (W2 / W3: 16 heads, inputs of 260-440 tokens; a step's
    cross-attention over 512 rows, its self-attention over 1-128 tokens) and Whisper large-v3's
    cross-attention at 256 rows (1,500 keys, 20 heads)."""
    cross = np.random.default_rng(1).integers(260, 441, size=512).tolist()
    self_lens = np.random.default_rng(2).integers(1, 129, size=512).tolist()
    return [
        ("bart cross b512", cross, 16, False),
        ("bart self b512", self_lens, 16, True),
        ("whisper cross b256", [kb.CROSS_LEN] * 256, kb.WHISPER_HEADS, False),
    ]


def sweep_fp8(copy_bw, rows, quick=False):
    """The paged decode kernel on an fp8 pool (e4m3 values, a float32 scale per (token, head) row)
    against the same cache in bf16: microseconds per call (CUDA-graph replays), the bytes each
    reads (fp8: values and scales) over the copy bandwidth, and fp8's error against bf16's output;
    the scales as the engine's pool keeps them (each block's head-major), and once token-major.
    ``quick``: the default tiles only."""
    import triton.testing

    from encdec_kernels import paged, reference

    gen = np.random.default_rng(0)
    for name, lens, heads, causal in fp8_shapes():
        b = len(lens)
        k_cache, v_cache, tables = kb.paged_cache(lens, heads, gen)
        k8, ks_rows = reference.quantize_rows(k_cache)
        v8, vs_rows = reference.quantize_rows(v_cache)
        # each block's scales head-major, as the engine's pool keeps them (KVPool)
        ks, vs = (sc.transpose(1, 2).contiguous().transpose(1, 2) for sc in (ks_rows, vs_rows))
        seq_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
        cu = torch.arange(b + 1, dtype=torch.int32, device="cuda")
        q = torch.randn(b, heads, kb.HEAD_DIM, device="cuda", dtype=kb.DTYPE)
        base = functools.partial(
            paged._launch_paged, q, k_cache, v_cache, tables, seq_lens, cu, 1, 0.125, causal, None
        )
        ref = base()
        bf16_bytes = 2 * sum(lens) * heads * kb.HEAD_DIM * 2
        fp8_bytes = 2 * sum(lens) * heads * (kb.HEAD_DIM + 4)
        ms = triton.testing.do_bench_cudagraph(base, rep=50, return_mode="median")
        rows.append(dict(case=name, dtype="bf16", ms=ms, copy=bf16_bytes / (ms * 1e-3) / copy_bw))
        print(f"{name:<20} bf16          {ms * 1e3:7.1f} us {rows[-1]['copy']:4.0%}")
        fn = functools.partial(
            paged._launch_paged, q, k8, v8, tables, seq_lens, cu, 1, 0.125, causal, None,
            k_scales=ks_rows, v_scales=vs_rows,
        )  # fmt: skip
        ms = triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")
        frac = fp8_bytes / (ms * 1e-3) / copy_bw
        rows.append(dict(case=name, dtype="fp8", scales="token-major", ms=ms, copy=frac))
        print(f"{name:<20} fp8 token-major scales {ms * 1e3:7.1f} us {frac:4.0%}")
        configs = [(None, None, None)] + [
            c for c in itertools.product((32, 64, 128), (2, 4), (1, 2, 3)) if c != (64, 2, 2) and not quick
        ]
        for bn, nw, ns in configs:
            fn = functools.partial(
                paged._launch_paged, q, k8, v8, tables, seq_lens, cu, 1, 0.125, causal, None,
                block_n=bn, num_warps=nw, num_stages=ns, k_scales=ks, v_scales=vs,
            )  # fmt: skip
            try:
                err = kb.rel_err(fn(), ref)
                ms = triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")
            except Exception as e:  # a config that does not compile
                print(f"{name:<20} fp8 bn{bn} w{nw} s{ns}: failed {type(e).__name__}")
                continue
            frac = fp8_bytes / (ms * 1e-3) / copy_bw
            cfg = dict(block_n=bn, warps=nw, stages=ns)
            rows.append(dict(case=name, dtype="fp8", **cfg, ms=ms, copy=frac, err=err))
            cfg = f"bn{bn!s:<4} w{nw!s:<4} s{ns!s:<4}"
            print(f"{name:<20} fp8 {cfg} {ms * 1e3:7.1f} us {frac:4.0%} err {err:.1e}")


def sweep_encoder(rows):
    import triton

    from encdec_kernels import varlen

    lens = [kb.WHISPER_FRAMES] * kb.WHISPER_BATCH
    t, h, d = sum(lens), kb.WHISPER_HEADS, kb.HEAD_DIM
    qkv = torch.randn(t, 3, h, d, device="cuda", dtype=kb.DTYPE)  # the engine's fused projection layout
    q, k, v = qkv.unbind(1)
    cu = kb.pack(lens)
    scale = d**-0.5
    flops = sum(4 * h * n * n * d for n in lens)
    qp, kp, vp = (x.view(len(lens), lens[0], h, d).transpose(1, 2) for x in (q, k, v))
    sdpa = kb.bench(lambda: torch.nn.functional.scaled_dot_product_attention(qp, kp, vp, scale=scale))
    print(f"encoder sdpa (fused-qkv views) {sdpa:.3f} ms  {flops / sdpa / 1e9:.0f} TFLOP/s")
    rows.append(dict(case="encoder sdpa", ms=sdpa))
    ref = (
        torch.nn.functional.scaled_dot_product_attention(qp, kp, vp, scale=scale)
        .transpose(1, 2)
        .reshape(t, h, d)
    )
    cands = [(128, 64, 4, 3), (128, 64, 4, 4), (128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 3)]
    for bm, bn, nw, ns in cands:
        cfg = triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=nw, num_stages=ns)
        fn = functools.partial(varlen._launch_varlen, q, k, v, cu, lens[0], scale, False, None, cfg)
        try:
            ms = kb.bench(fn)
            err = kb.rel_err(fn(), ref)
        except Exception as e:
            print(f"encoder {bm}x{bn} w{nw} s{ns}: failed {type(e).__name__}: {e}"[:300])
            continue
        rows.append(dict(case="encoder", block_m=bm, block_n=bn, warps=nw, stages=ns, ms=ms))
        print(
            f"encoder {bm}x{bn} w{nw} s{ns}: {ms:.3f} ms {flops / ms / 1e9:.0f} TFLOP/s "
            f"{sdpa / ms:.3f}x sdpa, err {err:.0e}"
        )


@contextlib.contextmanager
def _tiles_set(module, name: str, tiles):
    """Within the block, ``module.name`` (a kernel's tile chooser) returns ``tiles`` (None: as is)."""
    orig = getattr(module, name)
    if tiles is not None:
        setattr(module, name, lambda *_: tiles)
    try:
        yield
    finally:
        setattr(module, name, orig)


def _graph_ms(label: str, fn) -> float | None:
    """Milliseconds of ``fn`` replayed in a CUDA graph, or None (the failure printed)."""
    try:
        return kb.bench(fn, graph=True)
    except Exception as e:
        print(f"  {label}: failed {type(e).__name__}: {e}"[:300])
        return None


def sweep_linear(copy_bw, rows):
    from encdec_kernels import linear

    d, ff = 1280, 5120
    for name, n, k in (("qkv", 3 * d, d), ("out", d, d), ("fc1", ff, d), ("fc2", d, ff)):
        x = torch.randn(1, k, device="cuda", dtype=kb.DTYPE)
        next_w = cycling_weights(n, k)
        moved = n * k * 2
        cublas = kb.bench(lambda x=x, nxt=next_w: torch.nn.functional.linear(x, *nxt()), graph=True)
        print(f"linear {name} {n}x{k}: cuBLAS {cublas * 1e3:.1f} us ({moved / cublas / 1e6:.0f} GB/s)")
        rows.append(dict(case=f"linear {name}", impl="cublas", ms=cublas))
        for bn, bk, nw in itertools.product((2, 4, 8, 16), (256, 512, 1024), (2, 4, 8)):
            with _tiles_set(linear, "_tiles", (bn, min(bk, k), nw)):
                ms = _graph_ms(f"{bn}x{bk} w{nw}", lambda x=x, nxt=next_w: linear.gemv(x, *nxt()))
            if ms is None:
                continue
            rows.append(dict(case=f"linear {name}", block_n=bn, block_k=bk, warps=nw, ms=ms))
            print(f"  {bn}x{bk} w{nw}: {ms * 1e3:.1f} us ({moved / ms / 1e6:.0f} GB/s, "
                  f"{moved / (ms * 1e-3) / copy_bw:.0%} of copy)")  # fmt: skip


def sweep_rows(copy_bw, rows):
    """A few rows (a batch-1 verification step's K + 1) on the one-row kernel row by row (up to
    ``linear.GEMV_ROWS``) and on the tensor-core kernel (``linear._rows_kernel``) against cuBLAS,
    alone and with the pre-norm (LayerNorm kernel + cuBLAS + GELU kernel against the fused one), by
    tile, on the Whisper large-v3 decoder weights."""
    import encdec_kernels
    from encdec_kernels import linear

    d, ff = 1280, 5120
    nw_, nb_ = torch.ones(d, device="cuda", dtype=kb.DTYPE), torch.zeros(d, device="cuda", dtype=kb.DTYPE)
    for name, n, k in (("qkv", 3 * d, d), ("out", d, d), ("fc1", ff, d), ("fc2", d, ff)):
        next_w = cycling_weights(n, k)
        moved = n * k * 2
        for m in (1, 2, 5, 9):
            x = torch.randn(m, k, device="cuda", dtype=kb.DTYPE)
            r = torch.randn(m, k, device="cuda", dtype=kb.DTYPE)
            cublas = kb.bench(lambda x=x, nxt=next_w: torch.nn.functional.linear(x, *nxt()), graph=True)
            rows.append(dict(case=f"rows {name} m{m}", impl="cublas", ms=cublas))
            line = f"rows {name} {n}x{k} m{m}: cuBLAS {cublas * 1e3:.1f} us ({moved / cublas / 1e6:.0f} GB/s)"
            if k == d:  # the pre-norm: add + LayerNorm kernel, cuBLAS (, GELU) against one kernel
                act = "gelu" if name == "fc1" else None

                def unfused(x=x, r=r, nxt=next_w, act=act):
                    h, _ = encdec_kernels.add_layer_norm(x, r, nw_, nb_, 1e-5)
                    y = torch.nn.functional.linear(h, *nxt())
                    return torch.nn.functional.gelu(y) if act else y

                ms = kb.bench(unfused, graph=True)
                rows.append(dict(case=f"rows {name} m{m} norm", impl="cublas", ms=ms))
                line += f", norm + cuBLAS{' + gelu' if act else ''} {ms * 1e3:.1f} us"
            print(line)
            # None: the launcher's own choice (up to linear.GEMV_ROWS rows the one-row kernel row
            # by row, else linear._row_tiles); then the tensor-core kernel's split-K counts (the
            # launcher evens them out so that no split is empty) and the unsplit tiles measured before
            tiles = [None, *((16, 256, 2, s) for s in (1, 2, 3, 4, 6)), (16, 256, 4, 3), (16, 128, 2, 4)]
            for tile in tiles if m > 1 else [None]:
                if m <= linear.GEMV_ROWS:
                    label = "one-row kernel" + (f", {m} rows in turn" if m > 1 else "")
                else:
                    label = "auto " + "x".join(map(str, linear._row_tiles(n, k)))
                if tile is not None:
                    bn, bk, nw, sp = tile
                    label, tile = f"{bn}x{bk} w{nw} split {sp}", (bn, min(bk, k), nw, sp)
                bn, bk, nw, sp = tile or (None,) * 4
                rows_kernel = mock.patch.object(linear, "GEMV_ROWS", 1) if tile else contextlib.nullcontext()
                with _tiles_set(linear, "_row_tiles", tile), rows_kernel:
                    ms = _graph_ms(label, lambda x=x, nxt=next_w: linear.gemv(x, *nxt()))
                    fused = None
                    if ms is not None and k == d:
                        act = "gelu" if name == "fc1" else None
                        fused = _graph_ms(
                            label,
                            lambda x=x, r=r, nxt=next_w, act=act: linear.norm_gemv(
                                x, r, nw_, nb_, 1e-5, False, *nxt(), act
                            ),
                        )
                if ms is None:
                    continue
                extra = ""
                if fused is not None:
                    case = f"rows {name} m{m} norm"
                    rows.append(dict(case=case, block_n=bn, block_k=bk, warps=nw, split=sp, ms=fused))
                    extra = f", fused norm {fused * 1e3:.1f} us"
                rows.append(dict(case=f"rows {name} m{m}", block_n=bn, block_k=bk, warps=nw, split=sp, ms=ms))
                print(f"  {label}: {ms * 1e3:.1f} us ({moved / ms / 1e6:.0f} GB/s){extra}")


# full configs (encdec_kernels/flash_hopper.py CONFIGS keys); the first is the default for D 64
HOPPER_CONFIGS = [
    dict(BLOCK_N=128, K_STAGES=3, CONSUMERS=3, REGS=160, PIPELINE=True),
    dict(BLOCK_N=128, K_STAGES=2, CONSUMERS=3, REGS=160, PIPELINE=False),
    dict(BLOCK_N=128, K_STAGES=3, CONSUMERS=3, REGS=160, PIPELINE=False),
    dict(BLOCK_N=128, K_STAGES=2, CONSUMERS=2, REGS=240, PIPELINE=False),
    dict(BLOCK_N=128, K_STAGES=3, CONSUMERS=2, REGS=240, PIPELINE=True),
    dict(BLOCK_N=64, K_STAGES=4, CONSUMERS=2, REGS=240, PIPELINE=False),
    dict(BLOCK_N=64, K_STAGES=4, CONSUMERS=2, REGS=240, PIPELINE=True),
]


def sweep_hopper(rows):
    """encdec_kernels/flash_hopper.py configs (full CONFIGS entries) on the Whisper large-v3 and T5
    encoder shapes, beside SDPA and the Triton kernel (each checked against SDPA)."""
    t5_lens = np.random.default_rng(1).integers(260, 441, size=64).tolist()
    sweep_hopper_shape(
        "whisper 64x1500 20x64", [kb.WHISPER_FRAMES] * kb.WHISPER_BATCH, kb.WHISPER_HEADS, rows
    )
    sweep_hopper_shape("t5 64x260-440 16x64", t5_lens, kb.T5_HEADS, rows)


def sweep_hopper_shape(name, lens, heads, rows):
    import torch.nn.functional as F

    from encdec_kernels import flash_hopper, varlen

    t, n = sum(lens), max(lens)
    q, k, v = (torch.randn(t, heads, kb.HEAD_DIM, device="cuda", dtype=kb.DTYPE) for _ in range(3))
    cu = kb.pack(lens)
    scale = kb.HEAD_DIM**-0.5
    padded = [kb.padded_views(x, lens, n) for x in (q, k, v)]
    key_ok = torch.arange(n, device="cuda")[None, :] < torch.tensor(lens, device="cuda")[:, None]
    mask = None if len(set(lens)) == 1 else key_ok[:, None, None, :]
    sdpa = kb.bench(lambda: F.scaled_dot_product_attention(*padded, attn_mask=mask, scale=scale))
    want = F.scaled_dot_product_attention(*padded, attn_mask=mask, scale=scale).transpose(1, 2)
    want = torch.cat([want[b, :m] for b, m in enumerate(lens)])
    cfg = varlen._varlen_configs_for(kb.HEAD_DIM, kb.DTYPE)[0]
    tri = kb.bench(lambda: varlen._launch_varlen(q, k, v, cu, n, scale, False, None, config=cfg))
    flops = sum(4 * heads * m * m * kb.HEAD_DIM for m in lens)
    print(f"{name}: sdpa {sdpa:.3f} ms, triton {tri:.3f} ms ({sdpa / tri:.2f}x sdpa)")
    for over in HOPPER_CONFIGS:
        try:
            err = kb.rel_err(flash_hopper.flash_attention(q, k, v, cu, n, scale, over), want)
            ms = kb.bench(lambda over=over: flash_hopper.flash_attention(q, k, v, cu, n, scale, over))
        except Exception as e:
            print(f"  {over}: failed {type(e).__name__}: {e}"[:300])
            continue
        rows.append(dict(case=f"hopper {name}", config=over, ms=ms, sdpa_ms=sdpa, triton_ms=tri, rel_err=err))
        print(f"  {over}: {ms:.3f} ms, {sdpa / ms:.2f}x sdpa, {tri / ms:.2f}x triton, "
              f"{flops / ms / 1e9:.0f} TFLOP/s, rel err {err:.1e}")  # fmt: skip


def sweep_splits(copy_bw, rows):
    """Cross-attention decode (Whisper large-v3: 20 heads x 64, 1500 keys, one query) at the batch
    sizes a W1 run passes through, against forced split-KV counts (0 = the built-in heuristic):
    how much the last, partial wave of programs costs when no split spreads them."""
    import triton.testing

    from encdec_kernels import paged

    gen = np.random.default_rng(0)
    k_cache, v_cache, tables = kb.paged_cache([kb.CROSS_LEN] * 256, kb.WHISPER_HEADS, gen)
    for b in (16, 32, 54, 96, 128, 160, 197, 233, 256):
        lens = torch.full((b,), kb.CROSS_LEN, dtype=torch.int32, device="cuda")
        cu = torch.arange(b + 1, dtype=torch.int32, device="cuda")
        q = torch.randn(b, kb.WHISPER_HEADS, kb.HEAD_DIM, device="cuda", dtype=kb.DTYPE)
        moved = 2 * b * kb.CROSS_LEN * kb.WHISPER_HEADS * kb.HEAD_DIM * 2
        line = []
        for sp in (0, 1, 2, 3, 4, 6, 8, 12):
            fn = functools.partial(paged._launch_paged, q, k_cache, v_cache, tables[:b], lens, cu, 1,
                                   0.125, False, None, num_splits=sp or None)  # fmt: skip
            fn()
            ms = triton.testing.do_bench_cudagraph(fn, rep=30, return_mode="median")
            rows.append(
                dict(
                    case=f"cross b{b}",
                    splits=sp or "auto",
                    ms=ms,
                    copy_fraction=moved / (ms * 1e-3) / copy_bw,
                )
            )
            line.append(f"{sp or 'auto'}: {ms * 1e3:.0f} us {moved / (ms * 1e-3) / copy_bw:.0%}")
        print(f"cross b{b}: " + ", ".join(line))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", choices=["decode", "encoder", "linear", "rows", "hopper", "splits", "fp8"])
    p.add_argument("--out", type=pathlib.Path)
    p.add_argument("--quick", action="store_true", help="fp8: the default tiles only")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    rows: list[dict] = []
    copy_bw = kb.copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}  copy bandwidth {copy_bw / 1e9:.0f} GB/s")
    if args.only in (None, "encoder"):
        sweep_encoder(rows)
    if args.only in (None, "hopper"):
        sweep_hopper(rows)
    if args.only in (None, "splits"):
        sweep_splits(copy_bw, rows)
    if args.only in (None, "decode"):
        sweep_decode(copy_bw, rows)
    if args.only in (None, "linear"):
        sweep_linear(copy_bw, rows)
    if args.only in (None, "fp8"):
        sweep_fp8(copy_bw, rows, args.quick)
    if args.only in (None, "rows"):
        sweep_rows(copy_bw, rows)
    if args.out:
        args.out.write_text(json.dumps(dict(device=torch.cuda.get_device_name(), rows=rows), indent=1))


if __name__ == "__main__":
    main()
