"""The one-row linear kernel on the Whisper large-v3 decoder shapes, as the tree it runs in has it:
1 and 5 rows, plain and with the fused add + LayerNorm prologue, as CUDA-graph replays over
cycling weight copies (beyond the L2 cache, as in a decode step), with cuBLAS beside it and the
compiled kernels' registers and spills. Run it in two trees to compare them (CUDA only):

    PYTHONPATH=. python3 benchmarks/ab_linear.py [--sweep[=fc2,..]] [OUT.json]   # this tree
    (cd out/prev && PYTHONPATH=. python3 ../../benchmarks/ab_linear.py)           # another

--sweep also times the kernel's tiles (BLOCK_N, chunk, warps) at 1 and 5 rows, on every layer or
the ones named.
"""

from __future__ import annotations

import itertools
import json
import sys

import torch
from kernel_rows import bench, cycling_weights  # this script's folder (nothing of encdec's)

D, FF = 1280, 5120  # Whisper large-v3's decoder: (name, N, K, activation) of its linear layers
LAYERS = (("qkv", 3 * D, D, None), ("out", D, D, None), ("fc1", FF, D, "gelu"), ("fc2", D, FF, None))


def _us(fn) -> float:
    return 1e3 * bench(fn, graph=True)  # CUDA-graph replays, median ms -> us


def _table(linear) -> list[dict]:
    """Each layer at 1 and 5 rows: cuBLAS, the kernel, and the kernel with the add + LayerNorm."""
    nw = torch.ones(D, device="cuda", dtype=torch.bfloat16)
    nb = torch.zeros(D, device="cuda", dtype=torch.bfloat16)
    rows = []
    for name, n, k, act in LAYERS:
        nxt = cycling_weights(n, k)
        for m in (1, 5):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            r = torch.randn_like(x)
            row = dict(
                case=f"{name} m{m}",
                cublas=_us(lambda x=x, nxt=nxt: torch.nn.functional.linear(x, *nxt())),
                gemv=_us(lambda x=x, nxt=nxt, act=act: linear.gemv(x, *nxt(), act)),
            )
            if k == D:
                row["norm_gemv"] = _us(
                    lambda x=x, r=r, nxt=nxt, act=act: linear.norm_gemv(
                        x, r, nw, nb, 1e-5, False, *nxt(), act
                    )
                )
            rows.append(row)
            print(" ".join(f"{key} {v:.1f}" if isinstance(v, float) else v for key, v in row.items()))
    for cache in getattr(linear._gemv_kernel, "device_caches", {}).values():
        for compiled in cache[0].values():
            regs, spills, warps = compiled.n_regs, compiled.n_spills, compiled.metadata.num_warps
            print(f"compiled: regs {regs} spills {spills} warps {warps}")
    return rows


def _sweep(linear, layers: list[str]) -> list[dict]:
    """The kernel's tiles (BLOCK_N, chunk, warps) on the named layers at 1 and 5 rows."""
    rows = []
    orig = linear._tiles
    for name, n, k, act in LAYERS:
        if name not in layers:
            continue
        nxt = cycling_weights(n, k)
        for m in (1, 5):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            line = [f"sweep {name} m{m}:"]
            for bn, chunk, warps in itertools.product((1, 2, 4), (512, 1024), (1, 2, 4, 8)):
                if chunk < 256 * warps:
                    continue
                linear._tiles = lambda *_, t=(bn, min(chunk, k), warps): t
                try:
                    us = _us(lambda x=x, nxt=nxt, act=act: linear.gemv(x, *nxt(), act))
                except Exception as e:  # noqa: BLE001 - a tile that does not compile
                    line.append(f"{bn}/{chunk}/w{warps} {type(e).__name__}")
                    continue
                finally:
                    linear._tiles = orig
                rows.append(dict(case=f"sweep {name} m{m}", block_n=bn, chunk=chunk, warps=warps, us=us))
                line.append(f"{bn}/{chunk}/w{warps} {us:.1f}")
            print(" ".join(line))
    return rows


def main() -> None:
    from encdec_kernels import linear

    rows = _table(linear)
    for a in sys.argv[1:]:
        if a.startswith("--sweep"):
            rows += _sweep(linear, a.split("=")[1].split(",") if "=" in a else [x[0] for x in LAYERS])
    out = [a for a in sys.argv[1:] if not a.startswith("--")]
    if out:
        with open(out[0], "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
