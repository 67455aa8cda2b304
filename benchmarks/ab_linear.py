"""The one-row linear kernel on the Whisper large-v3 decoder shapes, as the tree it runs in has it:
1 and 5 rows, plain and with the fused add + LayerNorm prologue, as CUDA-graph replays over
cycling weight copies (beyond the L2 cache, as in a decode step), with cuBLAS beside it and the
compiled kernels' registers and spills. Run it in two trees to compare them (CUDA only):

    PYTHONPATH=. python3 benchmarks/ab_linear.py [--sweep[=fc2,..]] [OUT.json]  # this tree (--sweep: tiles at 1 and 5 rows)
    (cd out/prev && PYTHONPATH=. python3 ../../benchmarks/ab_linear.py)   # another
"""

from __future__ import annotations

import itertools
import json
import sys

import torch
import triton.testing


def _weights(n: int, k: int):
    ws = [
        (torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5,
         torch.randn(n, device="cuda", dtype=torch.bfloat16))
        for _ in range(max(2, 120 * 2**20 // (n * k * 2)))
    ]  # fmt: skip
    return itertools.cycle(ws).__next__


def _us(fn) -> float:
    fn()
    torch.cuda.synchronize()
    return 1e3 * triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")


def main() -> None:
    from encdec_kernels import linear

    d, ff = 1280, 5120
    nw, nb = torch.ones(d, device="cuda", dtype=torch.bfloat16), torch.zeros(d, device="cuda", dtype=torch.bfloat16)
    rows = []
    for name, n, k, act in (("qkv", 3 * d, d, None), ("out", d, d, None), ("fc1", ff, d, "gelu"), ("fc2", d, ff, None)):
        nxt = _weights(n, k)
        for m in (1, 5):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            r = torch.randn_like(x)
            row = dict(case=f"{name} m{m}", cublas=_us(lambda: torch.nn.functional.linear(x, *nxt())),
                       gemv=_us(lambda: linear.gemv(x, *nxt(), act)))  # fmt: skip
            if k == d:
                row["norm_gemv"] = _us(lambda: linear.norm_gemv(x, r, nw, nb, 1e-5, False, *nxt(), act))
            rows.append(row)
            print(" ".join(f"{key} {v:.1f}" if isinstance(v, float) else v for key, v in row.items()), flush=True)
    for dev, cache in getattr(linear._gemv_kernel, "device_caches", {}).items():
        for compiled in cache[0].values():
            c = compiled.metadata
            print(f"compiled: regs {compiled.n_regs} spills {compiled.n_spills} warps {c.num_warps}")
    sweep = next((a.split("=")[1].split(",") if "=" in a else ["qkv", "out", "fc1", "fc2"]
                  for a in sys.argv if a.startswith("--sweep")), [])  # fmt: skip
    if sweep:  # the one-row kernel's tiles for one row and several (a verification step)
        orig = linear._tiles
        for name, n, k, act in (("qkv", 3 * d, d, None), ("out", d, d, None), ("fc1", ff, d, "gelu"), ("fc2", d, ff, None)):
            if name not in sweep:
                continue
            nxt = _weights(n, k)
            for m in (1, 5):
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                line = [f"sweep {name} m{m}:"]
                for bn, chunk, warps in itertools.product((1, 2, 4), (512, 1024), (1, 2, 4, 8)):
                    if chunk < 256 * warps:
                        continue
                    linear._tiles = lambda *_, t=(bn, min(chunk, k), warps): t
                    try:
                        us = _us(lambda: linear.gemv(x, *nxt(), act))
                    except Exception as e:  # noqa: BLE001 - a tile that does not compile
                        line.append(f"{bn}/{chunk}/w{warps} {type(e).__name__}")
                        continue
                    finally:
                        linear._tiles = orig
                    rows.append(dict(case=f"sweep {name} m{m}", block_n=bn, chunk=chunk, warps=warps, us=us))
                    line.append(f"{bn}/{chunk}/w{warps} {us:.1f}")
                print(" ".join(line), flush=True)
    out = [a for a in sys.argv[1:] if not a.startswith("--")]
    if out:
        json.dump(rows, open(out[0], "w"), indent=1)


if __name__ == "__main__":
    main()
