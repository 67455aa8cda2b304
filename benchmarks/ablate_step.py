"""Where a batch-1 decode or verification step's GPU time goes, by ablation (CUDA only).

A kernel's duration in a profile says little once kernels overlap (programmatic dependent launch
starts each one early, waiting inside for its predecessor): the durations of a W5 step add up to
about twice its wall time. Here each piece is taken out instead, the step's graphs captured again
without it, and their replays timed: what the step loses is that piece's share of the critical
path. The ablated graphs compute wrong values; only their time means anything.

    python benchmarks/ablate_step.py [--workload W5] [--k 4] [--out FILE]

Builds the workload's engine with oracle drafts (K ``--k``; the tokens of one plain run), runs it
once (its graphs' buffers then hold a real step's tables and lengths), then for the decode graph
(1 query) and every verification graph (K + 1, K / 2 + 1, ..., 2 queries) at batch 1 replays:

- ``base``: the graph as the engine captured it again;
- ``no-norm``: the separate norm kernel of several rows skipped (``add_norm`` returns its input);
- ``no-merge``: the split-KV merge kernels skipped;
- ``no-attn``: the paged attention kernels skipped (their merges kept);
- ``one-row``: the one-row linear kernel computes the first row only (the extra rows' cost);
- ``self-unsplit``: the self-attention (keys up to the model's target length) in one split, so
  no merge for it: a real option, as are the next;
- ``norm-warps-N``: the norm kernel of up to 16 rows in at most N warps a row (8 at 1,280 wide);
- ``one-segment``: each step's graph in one piece, not cut after layers 1, 3, 7 and 15;
- ``splits-N``: every decode attention in at most N splits.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import sys
import time
from types import SimpleNamespace
from unittest import mock

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


class _Skip:
    """A Triton kernel stand-in: ``kernel[grid](...)`` launches nothing."""

    def __getitem__(self, grid):
        return lambda *a, **kw: None


def ablations(runner) -> dict[str, callable]:
    import encdec_kernels.common as common
    import encdec_kernels.linear as linear
    import encdec_kernels.norm as norm
    import encdec_kernels.paged as paged
    from encdec_cli.engine.cuda_graphs import CudaGraphs

    self_keys = runner.self_width * runner.block_size
    real_splits = common.num_kv_splits

    def no_norm():
        return mock.patch.object(
            linear, "add_norm", lambda x, residual, *a: (x, x if residual is None else residual)
        )

    def one_row():
        tiles = linear._gemv_tiles

        def first_row(n, k, m, wb):
            t = tiles(n, k, m, wb)
            return {**t, "M": 1, "M_PAD": 1}

        return mock.patch.object(linear, "_gemv_tiles", first_row)

    def norm_warps(most):
        real = norm._warps
        return mock.patch.object(
            norm, "_warps", lambda c, rows: min(most, real(c, rows)) if rows <= 16 else real(c, rows)
        )

    def splits(limit=None, self_only=False):
        def choose(programs, max_keys, block_n, device, *a, **kw):
            n = real_splits(programs, max_keys, block_n, device, *a, **kw)
            if self_only:
                return 1 if max_keys <= self_keys else n
            return min(n, limit)

        return mock.patch.object(paged, "num_kv_splits", choose)

    return {
        "base": contextlib.nullcontext,
        "no-norm": no_norm,
        "no-merge": lambda: mock.patch.object(paged, "merge_splits_kernel", _Skip()),
        "no-attn": lambda: mock.patch.object(paged, "_paged_attn_kernel", _Skip()),
        "one-row": one_row,
        "self-unsplit": lambda: splits(self_only=True),
        "norm-warps-4": lambda: norm_warps(4),
        "norm-warps-2": lambda: norm_warps(2),
        "norm-warps-1": lambda: norm_warps(1),
        "one-segment": lambda: mock.patch.object(CudaGraphs, "segments", 1),
        "splits-8": lambda: splits(8),
        "splits-4": lambda: splits(4),
    }


def replay_ms(segments, n: int = 300) -> float:
    for g in segments:
        g.replay()
    torch.cuda.synchronize()
    best = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(n):
            for g in segments:
                g.replay()
        torch.cuda.synchronize()
        best.append(1e3 * (time.perf_counter() - t0) / n)
    return min(best)


def main(argv=None):
    from benchmarks.profile_step import oracle_engine
    from encdec_cli.engine.cuda_graphs import CudaGraphs
    from encdec_cli.tasks.bench import WORKLOADS, build_models, inputs_for, workload_requests

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workload", default="W5", choices=sorted(WORKLOADS))
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--only", help="comma-separated ablations (default: all)")
    p.add_argument("--out", type=pathlib.Path)
    args = p.parse_args(argv)
    known = list(ablations(SimpleNamespace(self_width=0, block_size=0)))  # names only: no model yet
    names = ["base", *(n for n in (args.only or "").split(",") if n and n != "base")]
    if args.only and set(names) - set(known):
        p.error(f"unknown ablations {sorted(set(names) - set(known))}; known: {', '.join(known)}")

    w = WORKLOADS[args.workload]
    enc_inputs, targets = inputs_for(w)
    _, loaded = build_models(w, "cuda", torch.bfloat16, with_hf=False)
    requests = workload_requests(w, loaded.config, enc_inputs, targets)
    engine = oracle_engine(loaded, requests, dict(max_num_seqs=1), 0.7, args.k)
    list(engine.generate(workload_requests(w, loaded.config, enc_inputs, targets)))
    torch.cuda.synchronize()
    runner = engine.runner
    sources = [runner.graphs, *(runner.verify_graphs or ())]
    chosen = ablations(runner)
    if args.only:
        chosen = {n: chosen[n] for n in names}
    res = {"workload": w.id, "k": args.k, "device": torch.cuda.get_device_name(0), "ms": {}}
    for src in sources:
        q = src.queries
        row = res["ms"].setdefault(f"queries-{q}", {})
        for name, patch in chosen.items():
            g = CudaGraphs(runner, 1, queries=q)
            for buf in (
                "tokens",
                "positions",
                "slots",
                "self_tables",
                "self_lens",
                "cross_tables",
                "cross_lens",
            ):
                getattr(g, buf).copy_(getattr(src, buf)[: len(getattr(g, buf))])
            with patch():
                g.capture(runner.model)
            row[name] = round(replay_ms(g.graphs[1]), 4)
            del g
        base = row["base"]
        print(
            f"queries {q}: " + ", ".join(f"{k} {v:.3f} ms ({v - base:+.3f})" for k, v in row.items()),
            flush=True,
        )
    engine.close()
    print(json.dumps(res, indent=1))
    if args.out:
        args.out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
