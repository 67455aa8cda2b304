"""Can a Whisper encoder run overlap decode steps on the GPU? (CUDA only; a measurement to decide
whether the engine should encode on a second stream.)

    python benchmarks/overlap_probe.py [--clips 10] [--steps 3]

Times on the Whisper large-v3 shapes (random weights): the encoder over --clips 30 s windows;
--steps decode-like steps of the dominant decode kernel (cross-attention over 1500 keys at batch
256, 32 layers); and both launched together on two streams (decode at high priority). Prints the
share of the shorter one hidden by running them together.
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import sys

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
_spec = importlib.util.spec_from_file_location("kbench", ROOT / "benchmarks" / "kernels.py")
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
    from kernels import attention

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clips", type=int, default=10)
    p.add_argument("--steps", type=int, default=3)
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

    def decode():
        for _ in range(args.steps * 32):
            attention._launch_paged(q, k_cache, v_cache, tables, lens, cu, 1, 0.125, False, None)

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


if __name__ == "__main__":
    main()
