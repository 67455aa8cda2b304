"""Where a workload's time goes on the GPU: torch.profiler over one run of ours (CUDA only).

    python benchmarks/profile_step.py W5            # batch-1 Whisper large-v3
    python benchmarks/profile_step.py W1 --scale 0.125

Prints the kernels by total GPU time, the kernel count and GPU-busy time per engine step, the
wall time, and (for a pure decode step at batch 1) the replay time of the CUDA graph alone, so
host overhead = wall - GPU busy is visible. Optionally writes the numbers as JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None):
    from torch.profiler import ProfilerActivity, profile

    from encdec_cli.engine import Engine
    from encdec_cli.tasks.bench import WORKLOADS, Workload, build_models, inputs_for, workload_requests

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("workload", choices=sorted(WORKLOADS))
    p.add_argument("--scale", type=float, default=1.0, help="fraction of the workload's requests")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--rows", type=int, default=30, help="kernel table rows")
    p.add_argument("--out", type=pathlib.Path)
    p.add_argument("--cprofile", action="store_true", help="also print the host-side (Python) profile")
    args = p.parse_args(argv)

    w = WORKLOADS[args.workload]
    w = Workload(**{**w.__dict__, "requests": max(1, int(w.requests * args.scale))})
    enc_inputs, targets = inputs_for(w)
    _, loaded = build_models(w, "cuda", torch.bfloat16, with_hf=False)
    engine = Engine(loaded, max_num_seqs=args.max_num_seqs)

    def run():
        out = list(engine.generate(workload_requests(w, loaded.config, enc_inputs, targets)))
        torch.cuda.synchronize()
        return out

    run()  # warm-up: compiles, autotunes
    steps0 = engine.stats.get("steps", 0)
    t0 = time.perf_counter()
    run()
    wall_plain = time.perf_counter() - t0
    steps = engine.stats["steps"] - steps0
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        run()
        wall_prof = time.perf_counter() - t0
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_us = sum(e.device_time for e in events)
    print(prof.key_averages().table(sort_by="device_time_total", row_limit=args.rows))
    res = {
        "workload": w.id,
        "requests": w.requests,
        "steps": steps,
        "wall_s": wall_plain,
        "wall_profiled_s": wall_prof,
        "gpu_busy_s": gpu_us / 1e6,
        "kernels_per_step": len(events) / steps,
        "wall_ms_per_step": 1e3 * wall_plain / steps,
        "gpu_ms_per_step": gpu_us / 1e3 / steps,
    }
    graphs = engine.runner.graphs
    if graphs is not None and 1 in graphs.graphs:
        segments = graphs.graphs[1]
        for g in segments:
            g.replay()
        torch.cuda.synchronize()
        n = 200
        t0 = time.perf_counter()
        for _ in range(n):
            for g in segments:
                g.replay()
        torch.cuda.synchronize()
        res["graph_b1_replay_ms"] = 1e3 * (time.perf_counter() - t0) / n
    if args.cprofile:
        import cProfile
        import pstats

        prof_host = cProfile.Profile()
        prof_host.enable()
        run()
        prof_host.disable()
        pstats.Stats(prof_host).sort_stats("tottime").print_stats(30)
    print(json.dumps(res, indent=1))
    if args.out:
        args.out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
