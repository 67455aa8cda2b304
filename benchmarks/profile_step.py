"""Where a workload's time goes on the GPU: torch.profiler over one run of ours (CUDA only).

    python benchmarks/profile_step.py W5            # batch-1 Whisper large-v3
    python benchmarks/profile_step.py W1 --scale 0.125
    python benchmarks/profile_step.py W5 --oracle 0.7:4   # speculative: verification steps' kernels

Prints the kernels by total GPU time, the kernel count and GPU-busy time per engine step, the
wall time, and (for a pure decode step at batch 1) the replay time of the CUDA graph alone, so
host overhead = wall - GPU busy is visible. Also: the GPU's idle time between kernels by gap
length (where the GPU waited for the host) and the kernels around the long gaps, the host-side
CUDA runtime calls (count, total and longest: a long cudaStreamSynchronize or cudaMemcpyAsync is
the host waiting for the GPU), host milliseconds per step inside a few engine functions, rows per
decoder run, and the host cost of launching a step's graphs onto an idle GPU. Optionally writes the
numbers as JSON (--out).

``--oracle ALPHA:K`` profiles speculative decoding with oracle drafts (``encdec bench --speculative
oracle``: an untimed plain run's greedy tokens as drafts, each wrong with probability 1 - ALPHA);
beside the batch-1 decode graph (``graph_b1_replay_ms``, ``graph_b1_kernels_ms``) it replays the
verification graphs alone, one a query count (K + 1, K / 2 + 1, ..., 2: ``verify_graphs_b1``):
what a verification step of that many rows costs over a plain one, kernel by kernel.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import sys
import time
from unittest import mock

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def idle_gaps(events) -> dict:
    """GPU idle time between the first and the last kernel of the profiled run, by gap length."""
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in events)
    buckets = {k: [0, 0.0] for k in ("<10us", "10us-100us", "0.1-1ms", "1-10ms", ">=10ms")}
    end, last = spans[0][1], spans[0][2]
    largest = []
    between: dict[str, list] = {}  # gaps >= 100 us by (kernel before, kernel after): [count, ms]
    for s, e, name in spans[1:]:
        gap = s - end
        if gap >= 100:
            entry = between.setdefault(f"{last[:60]} -> {name[:60]}", [0, 0.0])
            entry[0] += 1
            entry[1] += gap / 1e3
        if e >= end:
            last = name
        if gap > 0:
            key = (
                "<10us" if gap < 10 else "10us-100us" if gap < 100 else "0.1-1ms" if gap < 1e3
                else "1-10ms" if gap < 1e4 else ">=10ms"
            )  # fmt: skip
            buckets[key][0] += 1
            buckets[key][1] += gap / 1e6
            largest.append(gap)
        end = max(end, e)
    span = end - spans[0][0]
    idle = sum(b[1] for b in buckets.values())
    return {
        "span_s": span / 1e6,
        "idle_s": idle,
        "by_gap": {k: {"count": n, "s": round(t, 4)} for k, (n, t) in buckets.items()},
        "largest_ms": [round(g / 1e3, 2) for g in sorted(largest)[-20:]],
        "gaps_over_100us_between": {
            k: [n, round(ms, 2)] for k, (n, ms) in sorted(between.items(), key=lambda kv: -kv[1][1])[:10]
        },
    }


def _timed(fn, entry: list):
    """fn, adding each call's host seconds to entry = [calls, seconds]."""

    def timed(*a, **kw):
        t0 = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            entry[0] += 1
            entry[1] += time.perf_counter() - t0

    return timed


def runtime_calls(all_events) -> dict:
    """Host-side CUDA runtime / driver calls of the profiled run: {name: [calls, total ms, max ms]}
    (long copies or synchronizations are where the host waited for the GPU)."""
    out: dict[str, list] = {}
    for e in all_events:
        if e.device_type != torch.autograd.DeviceType.CPU or not e.name.startswith(("cuda", "cu")):
            continue
        ms = (e.time_range.end - e.time_range.start) / 1e3
        t = out.setdefault(e.name, [0, 0.0, 0.0])
        t[0] += 1
        t[1] += ms
        t[2] = max(t[2], ms)
    return {
        k: [n, round(ms, 2), round(mx, 2)] for k, (n, ms, mx) in sorted(out.items(), key=lambda kv: -kv[1][1])
    }


def kernel_totals(events, rows: int) -> dict:
    """{kernel name: [calls, total ms]} of the `rows` kernels with the most GPU time."""
    totals: dict[str, list] = {}
    for e in events:
        t = totals.setdefault(e.name, [0, 0.0])
        t[0] += 1
        t[1] += e.device_time / 1e3
    top = sorted(totals.items(), key=lambda kv: -kv[1][1])[:rows]
    return {name[:160]: [n, round(ms, 2)] for name, (n, ms) in top}


def replay_profile(segments, rows: int, n: int = 200) -> tuple[float, dict]:
    """A batch's graph segments replayed alone: (ms a replay, over ``n``; {kernel: [calls, ms]} a
    replay, from 10 profiled ones)."""
    from torch.profiler import ProfilerActivity, profile

    for g in segments:
        g.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        for g in segments:
            g.replay()
    torch.cuda.synchronize()
    ms = 1e3 * (time.perf_counter() - t0) / n
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            for g in segments:
                g.replay()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    totals = kernel_totals(events, rows)
    kernels = {name: [calls / 10, round(t / 10, 4)] for name, (calls, t) in totals.items()}
    return ms, kernels


def graph_launch_times(graphs) -> dict:
    """Per captured batch size (a few): host ms to launch one step's graph segments onto an idle
    GPU, and ms until the GPU has run them (host-timed, synchronised)."""
    out = {}
    sizes = graphs.sizes
    for b in sorted({sizes[0], sizes[len(sizes) // 4], sizes[len(sizes) // 2], sizes[-1]}):
        segments = graphs.graphs[b]
        host, total = [], []
        for _ in range(20):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for g in segments:
                g.replay()
            t1 = time.perf_counter()
            torch.cuda.synchronize()
            host.append(t1 - t0)
            total.append(time.perf_counter() - t0)
        # the same segments launched twice back to back: does the second launch wait on the host
        # for the first one to run (same graph executables)?
        again = []
        for _ in range(20):
            torch.cuda.synchronize()
            for g in segments:
                g.replay()
            t0 = time.perf_counter()
            for g in segments:
                g.replay()
            again.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
        out[b] = {
            "host_launch_ms": round(1e3 * sorted(host)[10], 3),
            "gpu_done_ms": round(1e3 * sorted(total)[10], 3),
            "host_relaunch_ms": round(1e3 * sorted(again)[10], 3),
            "segments": len(segments),
        }
    return out


def oracle_engine(loaded, requests, cfg: dict, alpha: float, k: int):
    """An engine (no prefix cache) with oracle drafts: a plain engine's greedy tokens for
    ``requests``, each wrong with probability 1 - ``alpha``, K ``k``."""
    from encdec_cli.engine import Engine, OracleDrafter

    plain = Engine(loaded, **cfg)
    recorded = {r.request_id: r.token_ids for r in plain.generate(requests)}
    plain.close()
    del plain
    drafter = OracleDrafter(recorded, alpha, k, loaded.model.vocab_size)
    return Engine(loaded, drafter=drafter, prefix_cache=False, **cfg)


def main(argv=None):
    from torch.profiler import ProfilerActivity, profile

    from encdec_cli.engine import Engine
    from encdec_cli.tasks.bench import WORKLOADS, Workload, build_models, inputs_for, workload_requests

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("workload", choices=sorted(WORKLOADS))
    p.add_argument("--scale", type=float, default=1.0, help="fraction of the workload's requests")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument(
        "--micro-batches",
        type=int,
        choices=[1, 2],
        default=1,
        help="EngineConfig.micro_batches: 2 runs beam / sampled steps in two cohorts (1: off)",
    )
    p.add_argument("--oracle", metavar="ALPHA:K", help="speculative decoding with oracle drafts")
    p.add_argument("--rows", type=int, default=30, help="kernel table rows")
    p.add_argument("--out", type=pathlib.Path)
    p.add_argument("--cprofile", action="store_true", help="also print the host-side (Python) profile")
    args = p.parse_args(argv)

    w = WORKLOADS[args.workload]
    w = Workload(**{**w.__dict__, "requests": max(1, int(w.requests * args.scale))})
    enc_inputs, targets = inputs_for(w)
    _, loaded = build_models(w, "cuda", torch.bfloat16, with_hf=False)
    cfg = dict(max_num_seqs=args.max_num_seqs, micro_batches=args.micro_batches)
    if args.oracle:
        alpha, k = args.oracle.split(":")
        engine = oracle_engine(
            loaded, workload_requests(w, loaded.config, enc_inputs, targets), cfg, float(alpha), int(k)
        )
    else:
        engine = Engine(loaded, prefix_cache=False, **cfg)

    def run():
        out = list(engine.generate(workload_requests(w, loaded.config, enc_inputs, targets)))
        torch.cuda.synchronize()
        return out

    run()  # warm-up: compiles, autotunes
    rows_per_step: list[int] = []  # sequences of every decoder run (the plain run below)
    decode = engine.runner.decode

    def counted_decode(seqs, *a, **kw):
        rows_per_step.append(len(seqs))
        return decode(seqs, *a, **kw)

    import encdec_cli.engine.sampling as sampling

    timed_fns = [
        (engine.scheduler, "schedule"),
        (engine.runner, "encode"),
        (engine.runner, "_rows"),
        (engine, "_can_run_ahead"),
        (engine.sampler, "_argmax_ahead"),
        (sampling, "process_logits"),
        (sampling, "choose_tokens_on_device"),
    ]
    if engine.runner.graphs is not None:
        timed_fns.append((engine.runner.graphs, "run"))
    host_s: dict[str, list] = {}  # host [calls, seconds] inside those functions (plain run, no sync)
    with contextlib.ExitStack() as patches:  # undone after it: the profiled run times the engine as is
        patches.enter_context(mock.patch.object(engine.runner, "decode", counted_decode))
        for obj, name in timed_fns:
            host_s[name] = [0, 0.0]
            patches.enter_context(mock.patch.object(obj, name, _timed(getattr(obj, name), host_s[name])))
        steps0 = engine.stats.steps
        t0 = time.perf_counter()
        run()
        wall_plain = time.perf_counter() - t0
        steps = engine.stats.steps - steps0
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        run()
        wall_prof = time.perf_counter() - t0
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_us = sum(e.device_time for e in events)
    gaps = idle_gaps(events)
    runtime = runtime_calls(prof.events())
    print(prof.key_averages().table(sort_by="device_time_total", row_limit=args.rows))
    res = {
        "workload": w.id,
        "oracle": args.oracle,
        "verify_steps": engine.stats.verify_steps,
        "micro_batches": engine.micro_batches,
        "requests": w.requests,
        "steps": steps,
        "wall_s": wall_plain,
        "wall_profiled_s": wall_prof,
        "gpu_busy_s": gpu_us / 1e6,
        "kernels_per_step": len(events) / steps,
        "wall_ms_per_step": 1e3 * wall_plain / steps,
        "gpu_ms_per_step": gpu_us / 1e3 / steps,
        "gpu_idle": gaps,
        "decoder_runs": len(rows_per_step),
        "rows_per_decoder_run": {
            "mean": sum(rows_per_step) / max(1, len(rows_per_step)),
            "quartiles": [
                sorted(rows_per_step)[int(q * (len(rows_per_step) - 1))] for q in (0, 0.25, 0.5, 0.75, 1)
            ]
            if rows_per_step
            else [],
        },
        "host_ms_per_step": {k: round(1e3 * t / steps, 3) for k, (n, t) in host_s.items()},
        "kernels_ms": kernel_totals(events, args.rows),
        "cuda_runtime_calls": runtime,
    }
    graphs = engine.runner.graphs
    if graphs is not None and 1 in graphs.graphs:
        res["graph_b1_replay_ms"], res["graph_b1_kernels_ms"] = replay_profile(graphs.graphs[1], args.rows)
        res["graph_launch"] = graph_launch_times(graphs)
    # speculative: each verification graph at batch 1 (K + 1, K / 2 + 1, ..., 2 queries; its
    # buffers: the last step's), what a step of that many rows costs over a plain one
    for verify in engine.runner.verify_graphs or ():
        if 1 in verify.graphs:
            ms, kernels = replay_profile(verify.graphs[1], args.rows)
            res.setdefault("verify_graphs_b1", []).append(
                {"queries": verify.queries, "replay_ms": ms, "kernels_ms": kernels}
            )
    if args.cprofile:
        import cProfile
        import pstats

        prof_host = cProfile.Profile()
        prof_host.enable()
        run()
        prof_host.disable()
        pstats.Stats(prof_host).sort_stats("tottime").print_stats(30)
        pstats.Stats(prof_host).sort_stats("cumulative").print_stats(45)
    print(json.dumps(res, indent=1))
    if args.out:
        args.out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
