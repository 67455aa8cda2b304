"""Absorbed cross-attention vs cross K/V on the H100: kernel tiles and the whole layer step.

    python benchmarks/sweep_shared_kv.py [--quick] [--fp8 [ring|registers|producer]] [--out FILE]

Per shape (Whisper large-v3 cross: 20 heads x 64, d_model 1280, 1500 encoder rows; BART-large:
16 x 64, d_model 1024, 350 rows), batch 256 / 32 / 1, one query token per sequence:
- ``kv``: ``paged_attention`` over the per-layer cross K/V cache (2 x 1500 x 1280 bf16 a layer);
- ``absorbed``: q -> q Wk_h (bmm), ``shared_kv_attention`` over the encoder rows (1 x 1500 x
  1280), -> Wv_h (+ bv, baddbmm): the whole replacement, for each kernel tile config.
Times are CUDA-graph replays (median); the fraction is of the copy bandwidth on the bytes each
must read (K + V, or the rows). Every config is checked against encdec_kernels.reference first.
``--fp8``: the rows quantized to e4m3 with a scale per row (``--kv-dtype fp8``: half the bytes; the
Gluon kernel's fp8 variant in the given form (``shared_kv_hopper._fp8_mode``; default ring), then
the Triton kernel's); ``kv`` stays bf16.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import itertools
import json
import pathlib
import sys

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
_spec = importlib.util.spec_from_file_location("kbench", ROOT / "benchmarks" / "kernel_table.py")
kb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kb)

SHAPES = [  # (name, batch, heads, d_model, encoder rows, decoder layers)
    ("whisper b256", 256, 20, 1280, 1500, 32),
    ("whisper b32", 32, 20, 1280, 1500, 32),
    ("whisper b1", 1, 20, 1280, 1500, 32),
    ("bart b256", 256, 16, 1024, 350, 12),
]
BLOCK_SIZE = 16


def sweep_shape(shape, quick, copy_bw, gen, bench, paged, shared_kv, reference, fp8=False) -> list[dict]:
    name, b, h, d, n, layers = shape
    rows = []
    dh = d // h
    dev, dt = "cuda", torch.bfloat16
    # kv: the engine's paged cross K/V, blocks shuffled
    k_cache, v_cache, kv_tables = kb.paged_cache([n] * b, h, gen)
    lens = torch.full((b,), n, dtype=torch.int32, device=dev)
    cu = torch.arange(b + 1, dtype=torch.int32, device=dev)
    q = torch.randn(b, h, dh, device=dev, dtype=dt)
    kv_ms = bench(
        lambda: paged._launch_paged(q, k_cache, v_cache, kv_tables, lens, cu, 1, dh**-0.5, False, None)
    )
    kv_bytes = 2 * b * n * d * 2
    # absorbed: rows in a pool laid out as the engine's ([2 L, NB, BS, d], 2 L * BS rows a block)
    per_block = 2 * layers * BLOCK_SIZE
    nblk = -(-n // per_block)
    pool = torch.randn(2 * layers, b * nblk + 3, BLOCK_SIZE, d, device=dev, dtype=dt)
    sc = None
    if fp8:
        pool, sc = reference.quantize_rows(pool)
    perm = torch.randperm(b * nblk + 3, device=dev)[: b * nblk].view(b, nblk).to(torch.int32)
    w = torch.randn(2, h, dh, d, device=dev, dtype=dt) * d**-0.5
    bias = torch.randn(h, 1, dh, device=dev, dtype=dt)

    def absorbed(**launch):
        qe = torch.bmm(q.transpose(0, 1), w[0])
        o = shared_kv._launch_shared_kv(
            qe.transpose(0, 1), pool, perm, lens, cu, 1, dh**-0.5, row_scales=sc, **launch
        )
        return torch.baddbmm(bias, o.transpose(0, 1), w[1].transpose(1, 2))

    qe = torch.bmm(q.transpose(0, 1), w[0]).transpose(0, 1)
    ref = reference.shared_kv_attention(
        qe[: min(b, 8)],
        pool,
        perm[: min(b, 8)],
        lens[: min(b, 8)],
        cu[: min(b, 8) + 1],
        1,
        scale=dh**-0.5,
        row_scales=sc,
    )
    row_bytes = b * n * (d + 4 if fp8 else d * 2)
    configs = [{}, {"triton": True}]  # default: the Hopper kernel where it applies; then the Triton one
    if not quick and b == 256:
        configs += [
            dict(BLOCK_R=r, BLOCK_N=bn, num_warps=nw, num_stages=ns)
            for r, bn, nw, ns in itertools.product((16, 32), (32, 64), (4, 8, 16), (1, 2))
        ]
        configs += [dict(BLOCK_R=32, BLOCK_N=32, num_warps=16, num_stages=ns) for ns in (2, 3)]
    splits = [None] + ([1, 4, 8, 16, 32] if b <= 32 else [])
    name = name + (" fp8" if fp8 else "")  # (the form: --fp8's)
    print(f"{name}: kv {kv_ms * 1e3:.1f} us ({kv_bytes / kv_ms / 1e-3 / copy_bw:.0%} of copy)")
    best = None
    for cfg, sp in itertools.product(configs, splits):
        if sp is not None and cfg:
            continue  # split counts with the default tiles only
        launch = (
            dict(num_splits=sp, tiles=None, hopper=False)
            if cfg.get("triton")
            else dict(num_splits=sp, tiles=cfg or None)
        )
        try:
            out = shared_kv._launch_shared_kv(qe, pool, perm, lens, cu, 1, dh**-0.5, row_scales=sc, **launch)
            err = kb.rel_err(out[: min(b, 8)], ref)
            ms = bench(functools.partial(absorbed, **launch))
            kern = bench(
                functools.partial(
                    shared_kv._launch_shared_kv,
                    qe,
                    pool,
                    perm,
                    lens,
                    cu,
                    1,
                    dh**-0.5,
                    row_scales=sc,
                    **launch,
                )
            )
        except Exception as e:  # noqa: BLE001 (a config that does not compile)
            print(f"  {cfg} splits={sp}: FAILED {type(e).__name__}: {str(e)[:120]}")
            continue
        frac = row_bytes / (kern * 1e-3) / copy_bw
        row = dict(shape=name, config=cfg or "default", splits=sp, err=err, absorbed_us=ms * 1e3,
                   kernel_us=kern * 1e3, kv_us=kv_ms * 1e3, speedup=kv_ms / ms,
                   kernel_copy_fraction=frac)  # fmt: skip
        rows.append(row)
        flag = "" if err < 1e-2 else "  WRONG"
        label = str(cfg or "default")
        print(f"  {label:<70} splits={sp}: step {ms * 1e3:7.1f} us  kernel {kern * 1e3:7.1f} us "
              f"({frac:.0%} of copy)  x{kv_ms / ms:.2f} vs kv  err {err:.1e}{flag}")  # fmt: skip
        if err < 1e-2 and (best is None or ms < best["absorbed_us"] / 1e3):
            best = dict(row, absorbed_ms=ms)
    if best:
        us, x = best["absorbed_us"], best["speedup"]
        print(f"  BEST {name}: {best['config']} splits={best['splits']} {us:.1f} us, x{x:.2f}")
    return rows


def main(argv=None):
    import triton.testing

    from encdec_kernels import paged, reference, shared_kv

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=pathlib.Path)
    p.add_argument("--quick", action="store_true", help="default tiles only")
    p.add_argument(
        "--fp8",
        nargs="?",
        const="ring",
        choices=["ring", "registers", "producer"],
        help="fp8 (e4m3) rows with a scale per row; the Gluon kernel's form (default ring)",
    )
    args = p.parse_args(argv)
    if args.fp8:
        from encdec_kernels import shared_kv_hopper

        shared_kv_hopper.FP8_PRODUCER_CONVERTS = args.fp8 == "producer"
        shared_kv_hopper.FP8_VALUES_SMEM = args.fp8 != "registers"
    torch.manual_seed(0)
    gen = np.random.default_rng(0)
    copy_bw = kb.copy_bandwidth()
    bench = functools.partial(triton.testing.do_bench_cudagraph, rep=40, return_mode="median")
    rows_out = []
    for shape in SHAPES:
        rows_out += sweep_shape(
            shape, args.quick, copy_bw, gen, bench, paged, shared_kv, reference, bool(args.fp8)
        )
        torch.cuda.empty_cache()
    if args.out:
        args.out.write_text(
            json.dumps(dict(device=torch.cuda.get_device_name(), copy_bw=copy_bw, rows=rows_out), indent=1)
        )


if __name__ == "__main__":
    main()
