"""W9 (Florence-2-large, 768 x 768 images, <CAPTION>) on the GPU, piece by piece (CUDA only).

    python benchmarks/profile_w9.py                 # batch 32, engine run over 128 images
    python benchmarks/profile_w9.py --batch 32 --scale 0.25 --rows 25

1. Components at one batch of images (bf16, W9's models from ``bench.build_models``, the same
   weights in both): the vision tower, the image features (tower + projector) and the whole encode
   (tower + BART encoder) of ours against transformers' (``vision_tower``, ``get_image_features``,
   ``get_image_features`` + its BART encoder on the merged embeddings), in ms; the host side of
   ours: ``encoder_length`` (validation, on admission), the prefix cache's content hash, and
   ``prepare_encoder_batch`` (stack into pinned memory, copy to the GPU).
2. torch.profiler tables (by GPU time) of ours' and transformers' vision tower at that batch.
3. An engine run of W9 at ``--scale``: the wall time, then a second run with the per-phase timing
   (GPU synced: schedule / encode / decode / sample ...), the encoder runs and their batch sizes,
   and the host seconds inside encoder_length / the content hash / prepare_encoder_batch.

``python benchmarks/profile_step.py W9 --scale 0.25`` gives the engine run's kernel table and GPU idle
gaps; ``encdec bench W9 --scale 0.25`` the ratio against transformers' generate.
"""

from __future__ import annotations

import argparse
import contextlib
import pathlib
import sys
import time
from unittest import mock

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_ms(fn, n: int = 5) -> float:
    """Mean GPU-synchronised milliseconds of fn() over n calls after one warm-up call."""
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return (time.perf_counter() - t0) / n * 1e3


def host_ms(fn, n: int = 5) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e3


def counting(fn, acc: list):
    """fn wrapped to add [calls, host seconds] to acc."""

    def wrapper(*a, **kw):
        t0 = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            acc[0] += 1
            acc[1] += time.perf_counter() - t0

    return wrapper


def main(argv=None):
    from encdec_cli.tasks.bench import WORKLOADS, Workload, build_models, inputs_for

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=32, help="images per component measurement")
    p.add_argument("--scale", type=float, default=0.25, help="fraction of W9's 512 images for the engine run")
    p.add_argument("--rows", type=int, default=25, help="profiler table rows")
    p.add_argument("--no-hf", action="store_true", help="skip transformers' side")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("profile_w9 needs a CUDA device")

    w = WORKLOADS["W9"]
    hf, loaded = build_models(w, "cuda", torch.bfloat16, with_hf=not args.no_hf)
    items = inputs_for(Workload(**{**w.__dict__, "requests": args.batch}))[0]
    components(loaded.model, hf, items, args.rows, torch.device("cuda"))
    del hf
    torch.cuda.empty_cache()
    engine_run(w, loaded, args.scale)


def components(ours, hf, items: list, rows: int, dev: torch.device) -> None:
    """Ours against transformers' pieces at one batch of images, and the profiler tables."""
    from torch.profiler import ProfilerActivity, profile

    from encdec_cli.engine.prefix_cache import encoder_key

    pix = torch.stack([x["pixel_values"] for x in items]).to(dev, torch.bfloat16)
    ids = torch.tensor([x["input_ids"] for x in items], device=dev)
    b = len(items)

    with torch.inference_mode():
        batch = ours.prepare_encoder_batch(items, dev)
        # a batch size not seen before (the engine's encoder batches vary): per-shape setup costs
        # (cuDNN plans, cuBLAS heuristics) land in the first call
        sync()
        t0 = time.perf_counter()
        ours.vision_tower(pix[:-1])
        sync()
        first = (time.perf_counter() - t0) * 1e3
        res = {
            f"ours vision_tower b{b - 1}, first call": first,
            f"ours vision_tower b{b}": timed_ms(lambda: ours.vision_tower(pix)),
            f"ours image_features b{b}": timed_ms(lambda: ours.image_features(pix)),
            f"ours encode b{b} (tower + BART encoder)": timed_ms(lambda: ours.encode(batch)),
        }
        if hf is not None:
            m = hf.model

            def hf_encode():
                emb = m.get_input_embeddings()(ids)
                feats = m.get_image_features(pix)
                feats = getattr(feats, "pooler_output", feats)
                mask = (ids == hf.config.image_token_id)[..., None].expand_as(emb)
                emb = emb.masked_scatter(mask, feats.to(emb.dtype))
                return m.get_encoder()(inputs_embeds=emb)

            res |= {
                f"hf   vision_tower b{b}": timed_ms(lambda: m.vision_tower(pix)),
                f"hf   get_image_features b{b}": timed_ms(lambda: m.get_image_features(pix)),
                f"hf   encode b{b} (features + BART encoder)": timed_ms(hf_encode),
            }
        res |= {
            "ours host encoder_length per image": host_ms(lambda: ours.encoder_length(items[0])),
            "ours host content hash per image": host_ms(lambda: encoder_key(items[0], b"")),
            f"ours host prepare_encoder_batch b{b}": timed_ms(lambda: ours.prepare_encoder_batch(items, dev)),
        }
        for k, v in res.items():
            print(f"{k:48s} {v:9.2f} ms")

        for name, fn in (
            ("ours", lambda: ours.vision_tower(pix)),
            ("hf", lambda: hf.model.vision_tower(pix)),
        ):
            if name == "hf" and hf is None:
                continue
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                fn()
                sync()
            kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            gpu_ms = sum(e.device_time for e in kernels) / 1e3
            print(f"\n{name} vision tower b{b}: {len(kernels)} kernels, {gpu_ms:.1f} ms GPU")
            print(prof.key_averages().table(sort_by="device_time_total", row_limit=rows))


def engine_run(w, loaded, scale: float) -> None:
    """W9 at ``scale`` through the engine: wall time, then per-phase timing and host costs."""
    import encdec_cli.engine.engine as engine_mod
    from encdec_cli.engine import Engine
    from encdec_cli.tasks.bench import Workload, inputs_for, workload_requests

    ours = loaded.model
    w = Workload(**{**w.__dict__, "requests": max(1, int(w.requests * scale))})
    enc_inputs, targets = inputs_for(w)
    # the prefix cache off: the warm-up's inputs would be hits in the timed runs
    engine = Engine(loaded, max_num_seqs=min(512, w.requests), prefix_cache=False)

    def run():
        out = list(engine.generate(workload_requests(w, loaded.config, enc_inputs, targets)))
        sync()
        assert not any(r.error for r in out), [r.error for r in out if r.error][:1]
        return out

    run()  # warm-up at the run's own batch sizes
    engine.reset_stats()
    t0 = time.perf_counter()
    out = run()
    wall = time.perf_counter() - t0
    tokens = sum(len(r.token_ids) for r in out)
    print(f"\nengine W9 x{w.requests} (prefix cache off, warm): {wall:.3f} s, {tokens / wall:.0f} tok/s")
    print(f"steps: {engine.stats.steps}")

    host = {k: [0, 0.0] for k in ("encoder_length", "prepare_encoder_batch", "encoder_key")}
    enc_sizes: list[int] = []
    encode = engine.runner.encode

    def sized_encode(groups, *a, **kw):
        enc_sizes.append(len(groups))
        return encode(groups, *a, **kw)

    with contextlib.ExitStack() as patches:
        patches.enter_context(mock.patch.object(engine.runner, "encode", sized_encode))
        for name in ("encoder_length", "prepare_encoder_batch"):
            patches.enter_context(mock.patch.object(ours, name, counting(getattr(ours, name), host[name])))
        patches.enter_context(
            mock.patch.object(
                engine_mod, "encoder_key", counting(engine_mod.encoder_key, host["encoder_key"])
            )
        )
        engine.reset_stats(profile=True)
        t0 = time.perf_counter()
        run()
        wall_p = time.perf_counter() - t0
    print(f"same run, per-phase timing (GPU synced): {wall_p:.3f} s")
    for k, v in sorted(engine.stats.phase_seconds.items(), key=lambda kv: -kv[1]):
        print(f"  {k:20s} {v:8.3f} s")
    print(f"encoder runs: {len(enc_sizes)}, images per run: {enc_sizes}")
    for k, (calls, s) in host.items():
        print(f"host {k:24s} {calls:5d} calls {s * 1e3:9.1f} ms")


if __name__ == "__main__":
    main()
