"""Host (CPU/Python) time per step of speculative verification against plain decoding, no GPU.

A tiny random BART (d_model 32, one layer each side, vocabulary 512: the model costs little) runs
N requests of exactly T new tokens on the CPU: once plain (recording each request's greedy tokens),
then with ``OracleDrafter`` drafts (K, each wrong with probability 1 - alpha) for each alpha.
Printed per run: CPU process time per step, and that time less the model's own encode / decode
(cProfile's cumulative time of the model's ``encode`` / ``decode``): the engine's host work per step
(scheduling, drafting, the runner's inputs, logits rules, acceptance, block bookkeeping). Also the
steps, drafts, accepted drafts and whether the outputs equal the plain run's.

    OMP_NUM_THREADS=1 python benchmarks/spec_host_profile.py [--requests 256] [--tokens 64] [--k 4]
        [--alphas 0,0.7] [--fixed-k] [--micro-batches 1,2] [--show k4a0.7 [--sort cumulative]]
        [--calls]
    # --show: cProfile's top engine (encdec_cli) functions of that run
    # --calls: median wall time per call of the step's pieces, without cProfile
    # --micro-batches: speculative runs with one cohort and (2) two (EngineConfig.micro_batches): a
    #   round of two cohort steps decodes every sequence once, as one whole step does, so the time
    #   is also printed per round; on the CPU nothing overlaps
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import tempfile
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--alphas", default="0,0.7")
    ap.add_argument("--fixed-k", action="store_true", help="speculative_adaptive=False")
    ap.add_argument(
        "--micro-batches",
        default="1",
        help="comma-separated micro_batches values of the speculative runs (1: whole steps, 2: cohorts)",
    )
    ap.add_argument("--show", default=None, help="print the profile of this run (plain, k4a0.7, ...)")
    ap.add_argument("--sort", default="tottime", help="--show's order (pstats: tottime, cumulative)")
    ap.add_argument(
        "--calls",
        action="store_true",
        help="also run each speculative engine once more without cProfile, timing the step's host "
        "pieces per call (wall us: scheduling, drafting, the layout, verification, ...)",
    )
    args = ap.parse_args()
    from transformers import BartConfig, BartForConditionalGeneration

    from encdec_cli.engine import Engine, OracleDrafter, Request, SamplingParams
    from encdec_models.loading import load_model

    torch.set_num_threads(1)
    path = tempfile.mkdtemp(prefix="spec-host-")
    cfg = BartConfig(
        vocab_size=512,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_position_embeddings=max(128, args.tokens + 8),
    )
    torch.manual_seed(0)
    BartForConditionalGeneration(cfg).save_pretrained(path)
    loaded = load_model(path, device="cpu", dtype="float32")
    n, t = args.requests, args.tokens
    p = SamplingParams(max_new_tokens=t, min_new_tokens=t, stop_token_ids=(cfg.eos_token_id,))

    def requests():
        start = [cfg.decoder_start_token_id]
        return [
            Request([0] + [5 + (i * 7 + j) % 400 for j in range(20)] + [2], start, p, i) for i in range(n)
        ]

    engine_cfg = dict(block_size=16, num_blocks=n * (t // 16 + 4), max_num_seqs=n)
    plain = Engine(loaded, **engine_cfg)
    recorded = {r.request_id: r.token_ids for r in plain.generate(requests())}

    def measure(engine, label):
        engine.reset_stats()
        prof = cProfile.Profile(time.process_time)
        t0 = time.process_time()
        prof.enable()
        out = list(engine.generate(requests()))
        prof.disable()
        cpu = time.process_time() - t0
        stats = pstats.Stats(prof)
        model = sum(
            v[3]
            for (f, _, fn), v in stats.stats.items()
            if f.endswith(("encdec_models/bart.py", "encdec_models/base.py")) and fn in ("encode", "decode")
        )
        if model == 0:  # the model's encode / decode moved: "less model" would silently be the total
            raise SystemExit("no model encode / decode time found in the profile; update the file filter")
        st = engine.stats
        same = sum(r.token_ids == recorded[r.request_id] for r in out) / len(out)
        rounds = st.steps - st.micro_batch_steps / 2  # whole-step equivalents
        split = (
            f", per round of both cohorts {cpu * 1e3 / rounds:.2f} / host "
            f"{(cpu - model) * 1e3 / rounds:.2f} ms "
            f"({st.micro_batch_steps} cohort steps)"
            if st.micro_batch_steps
            else ""
        )
        print(
            f"{label}: {cpu * 1e3 / st.steps:.2f} ms/step CPU, host (less model) "
            f"{(cpu - model) * 1e3 / st.steps:.2f} ms/step{split}, {st.steps} steps ({st.verify_steps} "
            f"verifying, {st.ahead_steps} run ahead), drafts {st.draft_tokens}, "
            f"accepted {st.accepted_tokens}, outputs equal to plain {same:.3f}"
        )
        if args.show == label:
            stats.sort_stats(args.sort).print_stats("encdec_cli", 40)

    def per_call(engine, label):
        """Median wall time per call of the step's host pieces, without cProfile (wrappers only; the
        median: on a shared machine a few calls are descheduled)."""
        from encdec_cli.engine import runner, scheduler, speculative

        pieces = [
            (scheduler.Scheduler, "schedule"),
            (speculative.Speculator, "propose"),
            (runner.ModelRunner, "_rows"),
            (runner.ModelRunner, "verify_layout"),
            (runner.ModelRunner, "decode"),
            (type(loaded.model), "decode"),
            (speculative.Speculator, "verify_launch"),
            (speculative.Speculator, "verify_finish"),
            (speculative, "process_logits"),  # the verification's rules (the sampler has its own name)
        ]
        spent: dict[str, list[float]] = {}  # piece -> its calls' seconds
        saved = []
        for owner, name in pieces:
            fn = getattr(owner, name)
            slot = spent.setdefault(f"{owner.__name__.rsplit('.', 1)[-1]}.{name}", [])

            def timed(*a, _fn=fn, _slot=slot, **kw):
                t0 = time.perf_counter()
                try:
                    return _fn(*a, **kw)
                finally:
                    _slot.append(time.perf_counter() - t0)

            saved.append((owner, name, fn, name in vars(owner)))
            setattr(owner, name, timed)
        try:
            engine.reset_stats()
            t0 = time.perf_counter()
            list(engine.generate(requests()))
            wall = time.perf_counter() - t0
        finally:
            for owner, name, fn, own in saved:
                if own:
                    setattr(owner, name, fn)
                else:  # inherited: drop the wrapper again
                    delattr(owner, name)
        steps = engine.stats.steps
        model = sum(spent[f"{type(loaded.model).__name__}.decode"])
        calls = ", ".join(f"{k} {statistics.median(v) * 1e6:.0f}" for k, v in spent.items() if v)
        less = (wall - model) * 1e6 / steps
        print(f"{label} per call (median wall us, no cProfile): step less model {less:.0f} (mean); {calls}")

    measure(plain, "plain")
    plain.close()
    for mb in (int(m) for m in args.micro_batches.split(",")):
        for alpha in (float(a) for a in args.alphas.split(",")):
            drafter = OracleDrafter(recorded, alpha, args.k, loaded.model.vocab_size)
            engine = Engine(
                loaded, drafter=drafter, speculative_adaptive=not args.fixed_k, micro_batches=mb, **engine_cfg
            )
            label = f"k{args.k}a{alpha}" + (f"mb{mb}" if mb != 1 else "")
            measure(engine, label)
            if args.calls:
                per_call(engine, label)
            engine.close()


if __name__ == "__main__":
    main()
