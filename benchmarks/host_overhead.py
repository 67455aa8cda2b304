"""Host (CPU/Python) time per engine step, without a GPU (workload W3's shape, or W2's).

A tiny random BART (d_model 32, one encoder and one decoder layer) with bart-large's vocabulary
(50264) runs W3-like requests on the CPU: inputs of 260-440 token ids, output lengths forced to
32-128 new tokens (EOS suppressed before the target, the length limit at it, as ``encdec bench``
does), beam 4, length_penalty 2.0, no_repeat_ngram_size 3. With so small a model the engine's own
per-step work is visible: scheduling, the runner's table building, the logits processors and the
beam bookkeeping.

Times are CPU seconds of this thread (``time.thread_time``: torch runs one intra-op thread here),
so other processes on a shared machine move them less; ``--wall`` uses wall-clock time instead.
The script re-runs itself with glibc's malloc told never to mmap (``MALLOC_MMAP_MAX_=0``, no
trimming): by default every logits-sized tensor is mmapped and unmapped again, page faults and an
munmap of ~50 MB each (ms, charged wherever the tensor is freed), which the GPU's caching
allocator does not have; with the heap reused, the CPU behaves more like it.

Three runs over the same requests:

1. plain: seconds per step of each engine phase (schedule / encode / decode / sample, as
   ``EngineConfig(profile=True)`` splits them) and of a few host functions (wrapped and timed);
2. metered: every aten op outside the model's own forward is counted and timed. Ops touching a
   tensor of >= BIG elements (the [B, 50264] logits, their gathers) are device work in production
   (log_softmax, topk, the [G, N, V] gather...): their time is taken off, leaving the host time
   per phase. Small ops stay in it: each is also a kernel launch or host-device copy on CUDA
   (~5-10 us), so their count is reported too. The ``encdec_kernels`` functions that are one
   Triton launch on CUDA (``KERNELS``: a beam step launched ahead's) count as one small op each,
   their torch reference's time taken off as device work. The same run gives the host time of each of
   ``FUNCTIONS`` (inclusive: with what it calls; its big ops and any model forward inside it
   taken off);
3. cProfile of the schedule and sample phases and ``runner._rows`` (not the model).

    OMP_NUM_THREADS=1 python benchmarks/host_overhead.py [--requests 128] [--max-num-seqs 256]
    OMP_NUM_THREADS=1 python benchmarks/host_overhead.py --workload W2 --requests 512 --max-num-seqs 512

``--check FILE`` stores (first run) or compares (later runs) every result's tokens and scores, to
show that a change left the outputs unchanged.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import hashlib
import io
import json
import os
import pstats
import sys
import time
from collections import Counter
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

VOCAB = 50264  # bart-large(-cnn)
MAX_POSITIONS = 1024
BIG = 100_000  # elements: an op touching a tensor this large is logits-sized (device work in production)
PHASES = ("schedule", "encode", "decode", "sample")
MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}  # reuse the heap: see above
clock = time.thread_time  # set to time.perf_counter by --wall


def tiny_bart(d_model: int, layers: int, vocab: int = VOCAB):
    """A random BART with the real vocabulary, built the way ``encdec bench`` builds its models."""
    from transformers import BartConfig, BartForConditionalGeneration, GenerationConfig

    from encdec_models.loading import LoadedModel, build_model
    from encdec_models.registry import architecture_of

    cfg = BartConfig(
        vocab_size=vocab,
        d_model=d_model,
        encoder_layers=layers,
        decoder_layers=layers,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=4 * d_model,
        decoder_ffn_dim=4 * d_model,
        max_position_embeddings=MAX_POSITIONS,
        forced_bos_token_id=None,
        architectures=["BartForConditionalGeneration"],
    )
    torch.manual_seed(0)
    hf = BartForConditionalGeneration(cfg).eval()
    arch = architecture_of(cfg)
    ours = build_model(arch, cfg, hf.state_dict().items(), torch.device("cpu"), torch.float32)
    return LoadedModel(ours, None, cfg, GenerationConfig.from_model_config(cfg), arch, Path("random"))


def workload(n: int, vocab: int = VOCAB) -> tuple[list[list[int]], list[int]]:
    """W3's seeded inputs and target lengths (encdec_cli/tasks/bench.py ``inputs_for``), first n."""
    targets = np.random.default_rng(2).integers(32, 129, n).tolist()
    lens = np.random.default_rng(1).integers(260, 441, n)
    rng = np.random.default_rng(3)
    return [rng.integers(4, vocab - 1, k).tolist() for k in lens], targets


def requests(loaded, inputs, targets, workload: str, beams: int | None):
    """The workload's requests as ``encdec bench`` makes them (exactly ``target`` new tokens each);
    ``beams`` overrides its beam count."""
    import dataclasses

    from encdec_cli.tasks.bench import WORKLOADS, workload_requests

    w = WORKLOADS[workload]
    if beams is not None:
        w = dataclasses.replace(w, num_beams=beams)
    return workload_requests(w, loaded.config, inputs, targets)


class _OpMeter(TorchDispatchMode):
    """Counts and times the aten ops of each engine phase (pending until the phase's tick).

    Big results are held until the phase ends and their release is timed as big-op time too: on
    the CPU, freeing a tensor of many MB is an munmap (the GPU's caching allocator makes it free)."""

    def __init__(self):
        super().__init__()
        self.pending: Counter = Counter()
        self.hold: list[torch.Tensor] = []
        self.by_phase: dict[str, Counter] = {}
        self.names: Counter = Counter()  # small ops by aten name, pending like ``pending``
        self.names_by_phase: dict[str, Counter] = {}
        self.stack: list[str] = []  # the host functions running (``_attributed``), outermost first
        self.by_function: dict[str, Counter] = {}  # inclusive: seconds, big_s, ops, forward_s

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        t0 = clock()
        out = func(*args, **(kwargs or {}))
        dt = clock() - t0
        outs = out if isinstance(out, (tuple, list)) else (out,)
        big = [t for t in outs if isinstance(t, torch.Tensor) and t.numel() >= BIG]
        is_big = bool(big) or any(
            isinstance(t, torch.Tensor) and t.numel() >= BIG for t in (*args, *(kwargs or {}).values())
        )
        self.pending["big_ops" if is_big else "small_ops"] += 1
        if not is_big:
            self.names[str(func.overloadpacket)] += 1
        self.pending["big_s" if is_big else "small_s"] += dt
        self.hold += big
        for label in set(self.stack):  # (a recursive function counts once)
            c = self.by_function[label]
            c["ops"] += 1
            if is_big:
                c["big_s"] += dt
        return out

    def kernel(self, dt: float) -> None:
        """One call of a kernel that is one launch on CUDA (``KERNELS``), run here as its torch
        reference unmetered: one small op (its launch) whose time is device work."""
        self.pending["small_ops"] += 1
        self.pending["big_s"] += dt
        self.names["kernel"] += 1
        for label in set(self.stack):
            c = self.by_function[label]
            c["ops"] += 1
            c["big_s"] += dt

    def flush(self, phase: str) -> None:
        t0 = clock()
        self.hold.clear()
        self.pending["big_s"] += clock() - t0
        self.by_phase.setdefault(phase, Counter()).update(self.pending)
        self.names_by_phase.setdefault(phase, Counter()).update(self.names)
        self.pending, self.names = Counter(), Counter()


def _meter_cost_per_op(n: int = 20000) -> float:
    """Seconds the meter adds to one small op (its Python dispatch and bookkeeping)."""
    x, idx = torch.zeros(64), torch.arange(8)

    def ops():
        t0 = clock()
        for _ in range(n // 2):
            x.add_(1.0)
            x[idx] = 0.0
        return clock() - t0

    plain = min(ops() for _ in range(3))
    meter = _OpMeter()
    with meter:
        metered = min(ops() for _ in range(3))
    return max(0.0, (metered - plain) / (meter.pending["small_ops"] / 3))  # ops counted per run


def _timed(patches: contextlib.ExitStack, owner, name: str, times: Counter, label: str) -> None:
    """Wrap ``owner.name`` (until ``patches`` closes) to add its time to ``times[label]``."""
    fn = getattr(owner, name)

    def wrapped(*a, **k):
        t0 = clock()
        try:
            return fn(*a, **k)
        finally:
            times[label] += clock() - t0

    patches.enter_context(mock.patch.object(owner, name, wrapped))


# the host functions of a step whose host time the metered run reports (inclusive), by owner:
# "engine" / "runner" / "scheduler" the objects, else the module of that name
FUNCTIONS = (
    ("scheduler", "schedule"),
    ("runner", "_rows"),
    ("sampling", "process_logits"),
    ("sampling", "ngram_bans_on_device"),
    ("sampling", "beam_launch"),
    ("beam", "_candidates"),
    ("beam", "_choose"),
    ("engine", "_run_beams_ahead"),
    ("runner", "decode_children"),
    ("sampling", "beam_finish"),
    ("beam", "_select"),
    ("beam", "_advance"),
    ("beam", "_grants"),
    ("engine", "_take_ahead"),
)


# encdec_kernels functions that are one Triton launch on CUDA: the metered run counts each call as
# one small op (the launch) and its time (the torch reference's few dozen ops here) as device work
KERNELS = ("beam_mask_hits", "beam_chosen", "beam_children", "ngram_bans", "copy_blocks_where")


def _one_launch(patches: contextlib.ExitStack, name: str, meter: _OpMeter) -> None:
    """Wrap ``encdec_kernels.name`` (until ``patches`` closes): see ``KERNELS``."""
    import encdec_kernels

    fn = getattr(encdec_kernels, name)

    def wrapped(*a, **k):
        t0 = clock()
        with _disable_current_modes():
            out = fn(*a, **k)
        meter.kernel(clock() - t0)
        return out

    patches.enter_context(mock.patch.object(encdec_kernels, name, wrapped))


def _attributed(patches: contextlib.ExitStack, owner, name: str, label: str, meter: _OpMeter) -> None:
    """Wrap ``owner.name`` (until ``patches`` closes) so that its time and the ops it runs (with
    everything it calls) are added to ``meter.by_function[label]``."""
    fn = getattr(owner, name)
    counts = meter.by_function.setdefault(label, Counter())

    def wrapped(*a, **k):
        meter.stack.append(label)
        t0 = clock()
        try:
            return fn(*a, **k)
        finally:
            counts["seconds"] += clock() - t0
            counts["calls"] += 1
            meter.stack.pop()

    patches.enter_context(mock.patch.object(owner, name, wrapped))


def run(loaded, reqs, engine_cfg: dict, meter: _OpMeter | None = None, prof: cProfile.Profile | None = None):
    """One engine over ``reqs`` after a 4-request warm-up. Returns (results, {phase: seconds,
    "steps": n}, {host function: seconds}: ``runner._rows`` always, more in a plain run).
    ``meter``: count and time the ops outside the model's forward; ``prof``: profile the schedule
    and sample phases and ``runner._rows``."""
    from encdec_cli.engine import Engine, beam, sampling

    engine = Engine(loaded, device="cpu", dtype="float32", **engine_cfg)
    list(engine.generate(reqs[:4]))
    phases: Counter = Counter()
    times: Counter = Counter()
    last = [clock()]
    forward = [0.0]  # the metered run: the model's forward time since the last tick
    profiling = [False]  # the profiled run: whether ``prof`` is on

    def tick(phase: str) -> None:  # Engine._tick with this script's clock; no profile flag needed
        if meter is not None:
            meter.flush(phase)
            # a beam step launched ahead runs the next step's forward inside "sample"
            times[f"forward in {phase}"] += forward[0]
            forward[0] = 0.0
        now = clock()
        phases[phase] += now - last[0]
        last[0] = now
        if prof is not None:  # profile from the end of "outside" / "decode" to the next tick
            profiling[0] = phase in ("outside", "decode")
            prof.enable() if profiling[0] else prof.disable()

    with contextlib.ExitStack() as patches:
        if meter is None and prof is None:  # the plain run (a timer costs ~2 us a call: two clock reads)
            _timed(patches, engine.scheduler, "schedule", times, "scheduler.schedule")
            _timed(patches, sampling, "process_logits", times, "process_logits")
            _timed(patches, sampling, "beam_launch", times, "beam_launch")
            _timed(patches, sampling, "beam_finish", times, "beam_finish")
            _timed(patches, beam, "_select", times, "beam._select")
            _timed(patches, beam, "_advance", times, "beam._advance")
        _timed(patches, engine.runner, "_rows", times, "runner._rows")
        patches.enter_context(mock.patch.object(engine, "_tick", tick))
        if prof is not None:
            rows = engine.runner._rows

            def profiled_rows(*a, **k):
                on = profiling[0]
                prof.enable()
                try:
                    return rows(*a, **k)
                finally:
                    if not on:
                        prof.disable()

            patches.enter_context(mock.patch.object(engine.runner, "_rows", profiled_rows))
            model_forward = engine.model.decode

            def unprofiled_forward(*a, **k):  # a beam step launched ahead runs the model inside
                # "sample": the CPU's reference kernels, not host work on a GPU
                on = profiling[0]
                if on:
                    prof.disable()
                try:
                    return model_forward(*a, **k)
                finally:
                    if on:
                        prof.enable()

            patches.enter_context(mock.patch.object(engine.model, "decode", unprofiled_forward))
        if meter is not None:
            model_decode = engine.model.decode

            def unmetered_forward(*a, **k):  # the model itself: thousands of reference-kernel ops
                t0 = clock()
                with _disable_current_modes():
                    out = model_decode(*a, **k)
                dt = clock() - t0
                forward[0] += dt
                for label in set(meter.stack):  # device work of the functions it runs inside
                    meter.by_function[label]["forward_s"] += dt
                return out

            patches.enter_context(mock.patch.object(engine.model, "decode", unmetered_forward))
            owners = dict(
                engine=engine, runner=engine.runner, scheduler=engine.scheduler, beam=beam, sampling=sampling
            )
            for owner, name in FUNCTIONS:
                _attributed(patches, owners[owner], name, f"{owner}.{name}", meter)
            for name in KERNELS:
                _one_launch(patches, name, meter)
            patches.enter_context(meter)
        gc_start = [0.0]

        def gc_timer(stage: str, info: dict) -> None:  # Python's garbage collector: part of host time
            if stage == "start":
                gc_start[0] = clock()
            else:
                times[f"gc{info['generation']}"] += clock() - gc_start[0]
                times[f"gc{info['generation']} runs"] += 1

        steps0 = engine.stats.steps
        gc.callbacks.append(gc_timer)
        try:
            last[0] = clock()
            out = list(engine.generate(reqs))
        finally:
            gc.callbacks.remove(gc_timer)
        phases["steps"] = engine.stats.steps - steps0
    if prof is not None:
        prof.disable()
    errors = [r.error for r in out if r.error]
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[0]}")
    return out, phases, times


def digest(results) -> tuple[str, dict]:
    table = {
        str(r.request_id): [[c.token_ids, round(c.score, 5), c.finish_reason] for c in r.completions]
        for r in sorted(results, key=lambda r: r.request_id)
    }
    return hashlib.sha256(json.dumps(table).encode()).hexdigest()[:16], table


def main() -> None:
    global clock
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--workload", choices=["W2", "W3"], default="W3", help="W2: greedy; W3: beam 4, n-grams")
    ap.add_argument("--beams", type=int, help="override the workload's beam count")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument(
        "--micro-batches",
        type=int,
        choices=[1, 2],
        default=1,
        help="2: steps alternate between two cohorts (EngineConfig.micro_batches; CPU default: 1)",
    )
    ap.add_argument(
        "--no-lookahead",
        action="store_true",
        help="no steps launched ahead (EngineConfig.lookahead off: beam steps choose on the host)",
    )
    ap.add_argument("--d-model", type=int, default=32)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument(
        "--vocab",
        type=int,
        default=VOCAB,
        help="a small one (e.g. 1024) leaves almost only the host work in the sample phase",
    )
    ap.add_argument("--wall", action="store_true", help="wall-clock time instead of this thread's CPU time")
    ap.add_argument("--top", type=int, default=30, help="cProfile entries shown")
    ap.add_argument("--ops", type=int, default=0, help="also list the N commonest small ops of each phase")
    ap.add_argument("--no-cprofile", action="store_true")
    ap.add_argument("--check", type=Path, help="store or compare the results (tokens, scores)")
    ap.add_argument("--out", type=Path, help="write the numbers as JSON")
    ap.add_argument("--keep-malloc", action="store_true", help="do not re-run with MALLOC_MMAP_MAX_=0")
    args = ap.parse_args()
    if not args.keep_malloc and any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_ENV})
    torch.set_num_threads(1)
    if args.wall:
        clock = time.perf_counter

    loaded = tiny_bart(args.d_model, args.layers, args.vocab)
    inputs, targets = workload(args.requests, args.vocab)
    reqs = requests(loaded, inputs, targets, args.workload, args.beams)
    engine_cfg = dict(
        max_num_seqs=args.max_num_seqs,
        max_source_len=MAX_POSITIONS,
        cpu_kv_cache_bytes=2 << 30,
        micro_batches=args.micro_batches,
        lookahead=not args.no_lookahead,
    )

    results, phases, times = run(loaded, reqs, engine_cfg)
    steps = phases["steps"]
    tokens = sum(len(r.token_ids) for r in results)
    unit = "wall" if args.wall else "CPU"
    print(
        f"{args.workload}: {args.requests} requests x beam {reqs[0].params.num_beams}, max_num_seqs "
        f"{args.max_num_seqs}, {args.micro_batches} micro-batch(es): {steps} steps, "
        f"{tokens} output tokens; times are {unit} ms per step"
    )
    h, table = digest(results)
    print(f"results digest {h}")
    if args.check:
        if args.check.exists():
            ref = json.loads(args.check.read_text())
            same = ref == table
            print(f"results vs {args.check}: {'IDENTICAL' if same else 'DIFFERENT'}")
            if not same:
                bad = [k for k in ref if ref[k] != table.get(k)]
                print(f"  {len(bad)} requests differ, e.g. {bad[:5]}")
        else:
            args.check.write_text(json.dumps(table))
            print(f"results stored in {args.check}")

    def ms(seconds: float) -> float:
        return 1e3 * seconds / steps

    print("\n1. plain run: " + ", ".join(f"{p} {ms(phases[p]):.3f}" for p in PHASES))
    print(
        "   host functions (incl. their ops): "
        + ", ".join(f"{k} {ms(v):.3f}" for k, v in times.items() if not k.startswith("gc"))
    )
    print(
        "   garbage collector (within the phases above), by generation: "
        + ", ".join(f"{k} {ms(times[k]):.3f} ({times[k + ' runs']:.0f} runs)" for k in ("gc0", "gc1", "gc2"))
    )

    overhead = _meter_cost_per_op()
    meter = _OpMeter()
    _, mphases, mtimes = run(loaded, reqs, engine_cfg, meter=meter)
    print(f"\n2. metered run (the meter's {1e6 * overhead:.1f} us per op taken off):")
    print("   host = phase - big ops; #small: small ops (launches/copies on CUDA), small: their time")
    head = ("phase", "time", "big ops", "host", "#small", "small", "#big")
    print("   {:10s} {:>8s} {:>8s} {:>8s} {:>7s} {:>7s} {:>5s}".format(*head))
    report = {}
    for p in PHASES:
        c = meter.by_phase.get(p, Counter())
        metered = mphases[p] - (c["small_ops"] + c["big_ops"]) * overhead
        if p == "sample":  # beam steps launched ahead: the next step's forward (device work)
            metered -= mtimes["forward in sample"]
        row = dict(
            time=ms(metered),
            big_ops=ms(c["big_s"]),
            host=ms(metered - c["big_s"]),
            small_ops_n=c["small_ops"] / steps,
            small_ops=ms(c["small_s"]),
            big_ops_n=c["big_ops"] / steps,
        )
        report[p] = row
        note = "  (includes the CPU model's forward)" if p in ("encode", "decode") else ""
        print(
            f"   {p:10s} {row['time']:8.3f} {row['big_ops']:8.3f} {row['host']:8.3f} "
            f"{row['small_ops_n']:7.1f} {row['small_ops']:7.3f} {row['big_ops_n']:5.1f}{note}"
        )
    for p in PHASES if args.ops else ():
        common = meter.names_by_phase.get(p, Counter()).most_common(args.ops)
        if common:
            print(f"   {p} small ops a step: " + ", ".join(f"{n} {c / steps:.1f}" for n, c in common))
    host = report["schedule"]["host"] + report["sample"]["host"] + ms(mtimes["runner._rows"])
    print(f"   host per step: schedule + sample + runner._rows = {host:.3f} ms")
    print("   by function (inclusive; host = time - big ops - the model's forward - the meter's cost):")
    functions = {}
    for label, c in meter.by_function.items():
        if c["calls"]:
            fn_host = c["seconds"] - c["big_s"] - c["forward_s"] - c["ops"] * overhead
            functions[label] = dict(host=ms(fn_host), calls=c["calls"] / steps, ops=c["ops"] / steps)
    for label, f in sorted(functions.items(), key=lambda kv: -kv[1]["host"]):
        print(f"     {label:32s} host {f['host']:7.3f}  calls {f['calls']:6.1f}  ops {f['ops']:6.1f}")
    # two micro-batches take twice the steps of half the rows: the whole run's host time compares
    print(f"   host over the run: {host * steps:.1f} ms ({steps} steps, {tokens} output tokens)")

    if not args.no_cprofile:
        prof = cProfile.Profile()
        run(loaded, reqs, engine_cfg, prof=prof)
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(args.top)
        text = s.getvalue()
        print(f"\n3. cProfile of the schedule and sample phases and runner._rows, {steps} steps, by tottime:")
        print(text[text.find("   ncalls") :])
    if args.out:
        out = dict(
            clock=unit,
            requests=args.requests,
            workload=args.workload,
            beams=reqs[0].params.num_beams,
            max_num_seqs=args.max_num_seqs,
            steps=steps,
            digest=h,
            plain_ms={p: ms(phases[p]) for p in PHASES},
            functions_ms={k: ms(v) for k, v in times.items() if not k.endswith("runs")},
            metered_ms=report,
            functions_host_ms=functions,
            host_ms=host,
            micro_batches=args.micro_batches,
            host_total_ms=host * steps,
        )
        args.out.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
