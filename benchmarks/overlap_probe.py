"""Can a Whisper encoder run overlap decode steps on the GPU? (CUDA only; a measurement to decide
whether the engine should encode on a second stream.)

    python benchmarks/overlap_probe.py [--clips 10] [--steps 3] [--green 32,66]

Times on the Whisper large-v3 shapes (random weights): the encoder over --clips 30 s windows;
--steps decode-like steps of the dominant decode kernel (cross-attention over 1500 keys at batch
256, 32 layers); and both launched together on two streams (decode at high priority). Prints the
share of the shorter one hidden by running them together. --green: each alone on a CUDA green
context (an SM partition) of that many SMs: how many SMs the decode kernels need for their
bandwidth, and what the encoder loses on fewer.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import pathlib
import sys

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
_spec = importlib.util.spec_from_file_location("kbench", ROOT / "benchmarks" / "kernel_table.py")
kb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kb)


def timed(fn, streams, reps=5) -> float:
    """Median ms of fn() (which launches on the given streams), all streams joined."""
    out = []
    for _ in range(reps):
        torch.cuda.synchronize()
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        for s in streams:
            s.wait_event(start)
        fn()
        end = torch.cuda.Event(enable_timing=True)
        cur = torch.cuda.current_stream()
        for s in streams:
            cur.wait_stream(s)
        end.record()
        torch.cuda.synchronize()
        out.append(start.elapsed_time(end))
    return float(np.median(out))


def main(argv=None):
    from encdec_cli.tasks.bench import WORKLOADS, build_models
    from encdec_kernels import paged

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clips", type=int, default=10)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument(
        "--green",
        default="",
        help="comma-separated SM counts: also time each alone on a "
        "green context (CUDA SM partition) of that many SMs",
    )
    p.add_argument(
        "--split",
        default="",
        help="comma-separated SM counts: the encoder on that many SMs "
        "and the decode kernels on the rest (two disjoint green contexts), alone and together",
    )
    p.add_argument(
        "--linears",
        action="store_true",
        help="decode steps also run the decoder's six "
        "linear layers per layer (batch 256, cuBLAS), as an engine step does",
    )
    args = p.parse_args(argv)
    _, loaded = build_models(WORKLOADS["W1"], "cuda", torch.bfloat16, with_hf=False)
    model = loaded.model
    rngs = [np.random.default_rng(i) for i in range(args.clips)]
    waves = [r.standard_normal(480000).astype(np.float32) * 0.1 for r in rngs]
    gen = np.random.default_rng(0)
    k_cache, v_cache, tables = kb.paged_cache([1500] * 256, 20, gen)
    lens = torch.full((256,), 1500, dtype=torch.int32, device="cuda")
    cu = torch.arange(257, dtype=torch.int32, device="cuda")
    q = torch.randn(256, 20, 64, device="cuda", dtype=torch.bfloat16)

    def encode():
        with torch.inference_mode():
            model.encode(model.prepare_encoder_batch(waves, torch.device("cuda")))

    x = torch.randn(256, 1280, device="cuda", dtype=torch.bfloat16)
    weights = [
        torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        for n, k in ((3840, 1280), (1280, 1280), (1280, 1280), (1280, 1280), (5120, 1280), (1280, 5120))
    ]

    def decode():
        for _ in range(args.steps * 32):
            paged._launch_paged(q, k_cache, v_cache, tables, lens, cu, 1, 0.125, False, None)
            if args.linears:
                for w in weights:
                    torch.nn.functional.linear(x if w.shape[1] == 1280 else x.repeat(1, 4), w)

    lo, hi = torch.cuda.Stream(priority=0), torch.cuda.Stream(priority=-1)

    def on(stream, fn):
        def run():
            with torch.cuda.stream(stream):
                fn()

        return run

    def both():
        on(hi, decode)()
        on(lo, encode)()

    encode(), decode(), both()  # warm-up: compiles, autotunes
    t_enc = timed(on(lo, encode), [lo])
    t_dec = timed(on(hi, decode), [hi])
    t_both = timed(both, [lo, hi])
    hidden = (t_enc + t_dec - t_both) / min(t_enc, t_dec)
    print(f"{torch.cuda.get_device_name()}: encoder ({args.clips} clips) {t_enc:.1f} ms, decode kernels "
          f"({args.steps} steps x 32 layers, b256) {t_dec:.1f} ms, together {t_both:.1f} ms "
          f"(serial {t_enc + t_dec:.1f}): {hidden:.0%} of the shorter hidden")  # fmt: skip
    contexts = []  # a green context must outlive its streams' work
    for n in [int(x) for x in args.green.split(",") if x]:
        ctx, stream = green_stream(n)
        contexts.append(ctx)
        on(stream, encode)(), on(stream, decode)()
        e, d = timed(on(stream, encode), [stream]), timed(on(stream, decode), [stream])
        print(f"  on {n} of {_sm_total()} SMs (a green context): encoder {e:.1f} ms ({e / t_enc:.2f}x), "
              f"decode kernels {d:.1f} ms ({d / t_dec:.2f}x)")  # fmt: skip
    for n in [int(x) for x in args.split.split(",") if x]:
        split = SmSplit(n)
        contexts.append(split)
        a, b = split.first, split.rest
        on(a, encode)(), on(b, decode)()
        e, d = timed(on(a, encode), [a]), timed(on(b, decode), [b])

        def together(a=a, b=b):
            on(b, decode)()
            on(a, encode)()

        t = timed(together, [a, b])
        serial = t_enc + t_dec
        print(f"  split {split.sm_counts[0]} + {split.sm_counts[1]} SMs: encoder alone {e:.1f} ms, decode "
              f"alone {d:.1f} ms, together {t:.1f} ms: {(serial - t) / serial:.0%} less than serial on the "
              f"whole GPU ({serial:.1f} ms)")  # fmt: skip


# -- two disjoint SM partitions (CUDA green contexts, through the driver API) -----------------
# torch 2.11's GreenContext.create(num_sms) takes the first SMs each time (two such contexts share
# SMs), so the device's SMs are split here by the driver: a group of N SMs and the rest, a green
# context with one stream for each. Memory is shared with the primary context.

_SM_RESOURCE = 1  # CU_DEV_RESOURCE_TYPE_SM
_GREEN_CTX_DEFAULT_STREAM = 1  # CU_GREEN_CTX_DEFAULT_STREAM
_STREAM_NON_BLOCKING = 1  # CU_STREAM_NON_BLOCKING


class _DevResource(ctypes.Structure):
    # CUdevResource: type, 92 bytes internal, then a 48-byte union whose first field (for SMs)
    # is smCount. Extra room at the end in case a newer driver writes a longer struct.
    _fields_ = [
        ("type", ctypes.c_int),
        ("_internal", ctypes.c_ubyte * 92),
        ("sm_count", ctypes.c_uint),
        ("_rest", ctypes.c_ubyte * (44 + 256)),
    ]


def _check(result: int, call: str) -> None:
    if result != 0:
        raise RuntimeError(f"CUDA driver {call} failed with error {result}")


class SmSplit:
    """Streams on two disjoint SM groups of device 0: ``first`` (num_sms SMs, rounded by the
    driver to its granularity) and ``rest``. Keep the object alive while their work runs."""

    def __init__(self, num_sms: int, device: int = 0):
        torch.cuda.init()
        cuda = ctypes.CDLL("libcuda.so.1")
        dev = ctypes.c_int()
        _check(cuda.cuDeviceGet(ctypes.byref(dev), device), "cuDeviceGet")
        whole, group, rest = _DevResource(), _DevResource(), _DevResource()
        _check(cuda.cuDeviceGetDevResource(dev, ctypes.byref(whole), _SM_RESOURCE), "cuDeviceGetDevResource")
        groups = ctypes.c_uint(1)
        _check(
            cuda.cuDevSmResourceSplitByCount(
                ctypes.byref(group), ctypes.byref(groups), ctypes.byref(whole), ctypes.byref(rest), 0,
                ctypes.c_uint(num_sms),
            ),
            "cuDevSmResourceSplitByCount",
        )  # fmt: skip
        self.sm_counts = (group.sm_count, rest.sm_count)
        self._contexts = []
        streams = []
        for res in (group, rest):
            desc, ctx, stream = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_void_p()
            _check(
                cuda.cuDevResourceGenerateDesc(ctypes.byref(desc), ctypes.byref(res), 1),
                "cuDevResourceGenerateDesc",
            )
            _check(
                cuda.cuGreenCtxCreate(ctypes.byref(ctx), desc, dev, _GREEN_CTX_DEFAULT_STREAM),
                "cuGreenCtxCreate",
            )
            self._contexts.append(ctx)
            _check(
                cuda.cuGreenCtxStreamCreate(ctypes.byref(stream), ctx, _STREAM_NON_BLOCKING, 0),
                "cuGreenCtxStreamCreate",
            )
            streams.append(torch.cuda.ExternalStream(stream.value, device=torch.device("cuda", device)))
        self.first, self.rest = streams


def _sm_total() -> int:
    return torch.cuda.get_device_properties(0).multi_processor_count


def green_stream(num_sms: int):
    """(context, stream) of a CUDA green context holding num_sms SMs (torch.cuda.green_contexts)."""
    from torch.cuda.green_contexts import GreenContext

    ctx = GreenContext.create(num_sms=num_sms, device_id=0)
    if hasattr(ctx, "Stream"):
        return ctx, ctx.Stream()
    ctx.set_context()
    try:
        return ctx, torch.cuda.Stream()
    finally:
        ctx.pop_context()


if __name__ == "__main__":
    main()
