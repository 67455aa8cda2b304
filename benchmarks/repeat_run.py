"""One workload's timed run repeated on one engine, under host settings taken in turn: what moves a
host-bound run (W3's beam search spreads by ~25% between runs of one tree on one machine).

    python benchmarks/repeat_run.py W3 --rounds 4 --out w3-repeat.json
    python benchmarks/repeat_run.py W3 --variants default,pin --max-num-seqs 512

The engine is built and warmed up once; every round runs each variant once, in turn, so a drift of
the machine spreads over all of them. Each run records its wall time and rate, the engine's steps
and preemptions, the main thread's and the process's CPU seconds (a host-bound loop's thread is
busy the whole run: thread CPU well below the wall means it waited, for the GPU or for a core),
context switches, and the distribution of its steps' wall times (whether a slow run is slow on
every step or on a few long ones). Variants:

- ``default``: as ``encdec bench`` runs;
- ``threads1``: ``torch.set_num_threads(1)`` (no intra-op pool for the host's small CPU ops);
- ``pin``: the main thread on one core (``os.sched_setaffinity``), the one it ran on;
- ``nogc``: the garbage collector off for the run (``gc_frozen`` already hides older objects).

Speed only: the outputs are not checked here (``encdec bench`` and the tests do that).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import pathlib
import resource
import statistics
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from encdec_cli.tasks import bench  # noqa: E402
from tests.support.text_models import single_thread  # noqa: E402


@contextlib.contextmanager
def variant(name: str):
    if name == "default":
        yield
    elif name == "threads1":
        with single_thread():
            yield
    elif name == "pin":
        before = os.sched_getaffinity(0)
        core = os.sched_getcpu() if hasattr(os, "sched_getcpu") else min(before)
        os.sched_setaffinity(0, {core})
        try:
            yield
        finally:
            os.sched_setaffinity(0, before)
    elif name == "nogc":
        gc.disable()
        try:
            yield
        finally:
            gc.enable()
    else:
        raise SystemExit(f"unknown variant {name!r}: default, threads1, pin, nogc")


def step_stats(ms: list[float]) -> dict:
    s = sorted(ms)
    med = statistics.median(s)
    pick = lambda q: s[min(len(s) - 1, int(q * len(s)))]  # noqa: E731
    long = [x for x in s if x > 3 * med]
    return {
        "steps": len(s),
        "median_ms": round(med, 3),
        "p90_ms": round(pick(0.9), 3),
        "p99_ms": round(pick(0.99), 3),
        "max_ms": round(s[-1], 3),
        "sum_ms": round(sum(s), 1),
        "over_3x_median": [len(long), round(sum(long), 1)],
    }


def one_run(w, engine, loaded, enc_inputs, targets) -> dict:
    """The workload once on ``engine`` (warm), every engine step timed."""
    times: list[float] = []
    step = engine.step

    def timed_step():
        t0 = time.perf_counter()
        try:
            return step()
        finally:
            times.append((time.perf_counter() - t0) * 1e3)

    engine.step = timed_step
    r0, c0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.thread_time(), time.process_time()
    try:
        wall, out = bench._timed(w, engine, loaded, enc_inputs, targets, warmup=False)
    finally:
        del engine.step
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    tokens = sum(len(r.token_ids) for r in out)
    stats = engine.stats
    return {
        "wall_s": round(wall, 4),
        "rate": round(tokens / wall, 1),
        "tokens": tokens,
        "engine_steps": stats.steps,
        "preemptions": stats.preemptions,
        "thread_cpu_s": round(time.thread_time() - c0, 4),
        "process_cpu_s": round(time.process_time() - t0, 4),
        "ctx_switches": [r1.ru_nvcsw - r0.ru_nvcsw, r1.ru_nivcsw - r0.ru_nivcsw],
        "loadavg": os.getloadavg()[0],
        "step_ms": step_stats(times),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workload", help="W2, W3, W4 ... (benchmarks/WORKLOADS.md)")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--variants", default="default,threads1,pin,nogc")
    p.add_argument("--max-num-seqs", type=int, default=bench.ENGINE_SEQS)
    p.add_argument("--scale", type=float, default=1.0, help="run this share of the requests")
    p.add_argument("--out", type=pathlib.Path)
    a = p.parse_args()
    from encdec_cli.engine import Engine

    w = bench.WORKLOADS[a.workload]
    if a.scale != 1.0:
        w = bench.Workload(**{**bench.asdict(w), "requests": max(1, int(w.requests * a.scale))})
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    enc_inputs, targets = bench.inputs_for(w)
    _, loaded = bench.build_models(w, dev, dtype, with_hf=False)
    cfg = bench._engine_cfg(w, {"max_num_seqs": a.max_num_seqs}, len(enc_inputs))
    engine = Engine(loaded, **cfg)
    t0 = time.perf_counter()
    bench._timed(w, engine, loaded, enc_inputs, targets)  # the warm-up batch, then one whole run
    first = time.perf_counter() - t0
    cores = len(os.sched_getaffinity(0))
    print(f"{a.workload}: first run (warm-up + compiles) {first:.1f} s, torch threads "
          f"{torch.get_num_threads()}, cores {cores}", flush=True)  # fmt: skip
    names = a.variants.split(",")
    runs = []
    for r in range(a.rounds):
        for name in names:
            with variant(name):
                res = one_run(w, engine, loaded, enc_inputs, targets)
            runs.append({"round": r, "variant": name, **res})
            st = res["step_ms"]
            print(f"round {r} {name:9s} {res['rate']:10.1f}/s  wall {res['wall_s']:.3f} s  thread cpu "
                  f"{res['thread_cpu_s']:.3f}  proc cpu {res['process_cpu_s']:.3f}  steps {st['steps']}  "
                  f"step median {st['median_ms']} p90 {st['p90_ms']} max {st['max_ms']} ms  long "
                  f"{st['over_3x_median']}  csw {res['ctx_switches']}  preempt {res['preemptions']}",
                  flush=True)  # fmt: skip
    summary = {
        n: {
            "median_rate": statistics.median(x["rate"] for x in runs if x["variant"] == n),
            "rates": [x["rate"] for x in runs if x["variant"] == n],
        }
        for n in names
    }
    for n, s in summary.items():
        print(f"{n:9s} median {s['median_rate']:10.1f}  {s['rates']}")
    if a.out:
        env = bench.environment() if dev == "cuda" else {"device": "cpu"}
        a.out.write_text(json.dumps({"workload": a.workload, "config": cfg, "environment": env,
                                     "runs": runs, "summary": summary}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
