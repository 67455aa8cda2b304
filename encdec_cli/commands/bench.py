"""``encdec bench``: the standard workloads on a GPU (encdec_cli.tasks.bench)."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from encdec_cli.commands import common
from encdec_cli.tasks import summary

ORACLE_ALPHAS = "0.0,0.5,0.7,0.9"  # encdec_cli.tasks.bench.ORACLE_ALPHAS (not imported: no torch for --help)
ENGINE_SEQS = 1024  # encdec_cli.tasks.bench.ENGINE_SEQS (likewise)
BASELINE_BATCHES = (16, 64, 128, 256)  # transformers' batch sizes tried (Whisper: 64)
ORACLE_KS = "2,4,8"


@common.command()
def bench(
    workloads: list[str] = typer.Argument(
        None,
        help="Workload ids of benchmarks/WORKLOADS.md: W1..W5 (the default), W6 (the prefix cache on "
        "against off, no transformers baseline), W7 (NLLB-200 translation), W8 (Moonshine), W9 "
        "(Florence-2-large captions), T1 / T2 (TensorRT-LLM's "
        "published shapes at batch 32, 64 and 128; or one batch, e.g. T1-B64).",
    ),
    baseline: str = typer.Option(
        "hf", "--baseline", help="hf: also time transformers generate in the same run; none: ours only."
    ),
    baseline_batch: list[int] = typer.Option(
        list(BASELINE_BATCHES),
        "--baseline-batch",
        help="transformers batch sizes to try (the best counts; Whisper always uses 64).",
    ),
    out: str | None = typer.Option(
        None, "--out", help="JSON results file (default: benchmarks/results/<device>-<time>.json)."
    ),
    max_num_seqs: int = typer.Option(
        ENGINE_SEQS,
        "--max-num-seqs",
        help="Sequences per engine step (beams count singly; a workload with fewer takes its own "
        "count); the KV pool limits what is admitted.",
    ),
    enforce_eager: bool = typer.Option(False, "--enforce-eager", help="Disable CUDA graphs."),
    pipeline_parallel: common.PipelineParallel = 1,
    pp_layers: common.PpLayers = None,
    scale: float = typer.Option(1.0, "--scale", help="Fraction of each workload's requests (quick checks)."),
    profile: bool = typer.Option(False, "--profile", help="Also time each engine step phase (extra run)."),
    data_parallel: int | None = typer.Option(
        None,
        "--data-parallel",
        "-dp",
        help="Also run each workload (default: W1 and W2) on N rank processes, one per GPU, and report "
        "the total and per-device throughput and the scaling over the one-GPU run.",
    ),
    device: str = typer.Option(
        "cuda",
        "--device",
        help="With --data-parallel: each rank's device, comma-separated (cuda:0,cuda:0 runs two ranks on "
        "one GPU, a correctness and overhead check); default cuda:0..N-1.",
    ),
    no_prefix_cache: common.NoPrefixCache = False,
    cross: str = typer.Option(
        "auto",
        "--cross",
        help="Cross-attention cache: auto (absorbed where the Hopper kernel runs it on bf16/fp16 rows; "
        "kv for speculative runs, whose K + 1 tokens a sequence the paged kernel serves in one read), "
        "absorbed (the encoder output once, K/V projections absorbed), kv (K and V per decoder layer).",
    ),
    kv_dtype: common.KvDtype = "auto",
    micro_batches: int = typer.Option(
        1,
        "--micro-batches",
        help="2: steps that need their tokens on the host before the next one (beam search, speculative "
        "verification, sampling) alternate between two cohorts of the requests, so one's host work "
        "overlaps the other's GPU step; 1: off (the default: slower on the H200's W3).",
    ),
    lookahead: bool = typer.Option(
        True,
        "--lookahead/--no-lookahead",
        help="Launch a step's successor before its tokens reach the host (greedy steps, and beam steps "
        "whose beams are chosen on the GPU); --no-lookahead measures the engine without it.",
    ),
    speculative: str = typer.Option(
        "off",
        "--speculative",
        help="off; oracle (synthetic: the plain run's own greedy tokens as drafts, each wrong with "
        "probability 1 - alpha, swept over --oracle-alpha x --oracle-k, each point run with as many "
        "oracle seeds as make 8 requests: W5 8 times, W1 once, the plain reference as often); "
        "oracle:ALPHA:K (one point); ngram[:K] (prompt lookup on the random inputs: its overhead).",
    ),
    oracle_alpha: str = typer.Option(
        ORACLE_ALPHAS, "--oracle-alpha", help="Oracle draft acceptance probabilities (comma-separated)."
    ),
    oracle_k: str = typer.Option(
        ORACLE_KS, "--oracle-k", help="Oracle draft tokens per step (comma-separated)."
    ),
    summary_json: common.SummaryJson = None,
):
    """Run the standard workloads (random weights of the real architectures, fixed output lengths)
    on the GPU, ours and the transformers baseline in one process; print a table and write JSON."""
    import torch

    from encdec_cli.tasks.bench import (
        DEFAULT_WORKLOADS,
        GROUPS,
        WORKLOADS,
        device_rates,
        expand_ids,
        run_workload,
        write_results,
    )

    if not torch.cuda.is_available():
        common.fail("encdec bench needs a CUDA GPU")
    absorb = {"auto": None, "absorbed": True, "kv": False}.get(cross, "bad")
    if absorb == "bad":
        common.fail(f"--cross must be auto, absorbed or kv, got {cross!r}")
    if kv_dtype not in ("auto", "fp8"):
        common.fail(f"--kv-dtype must be auto or fp8, got {kv_dtype!r}")
    if micro_batches not in (1, 2):
        common.fail(f"--micro-batches must be 1 or 2, got {micro_batches}")
    parallel = bool(data_parallel) or "," in device
    ids, bad = expand_ids(workloads or (["W1", "W2"] if parallel else list(DEFAULT_WORKLOADS)))
    devices = None
    if parallel:
        from encdec_cli.tasks.data_parallel import rank_devices

        devices = rank_devices(device, data_parallel)
    if bad:
        choices = ", ".join([w for w in WORKLOADS if not w.startswith(("T1-", "T2-"))] + list(GROUPS))
        common.fail(f"unknown workload(s) {', '.join(bad)}; choose from {choices} (or T1-B32 ... T2-B128)")
    oracle, spec = _speculative(speculative, oracle_alpha, oracle_k)
    if oracle is not None or spec is not None:
        beams = [w for w in ids if WORKLOADS[w].num_beams > 1]
        if beams:
            common.fail(f"--speculative cannot run beam-search workloads ({', '.join(beams)})")
    results = []
    dev = torch.cuda.get_device_name().replace(" ", "-")
    path = Path(out or f"benchmarks/results/{dev}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    rates = device_rates()
    typer.echo(
        f"{torch.cuda.get_device_name()}: copy {rates['copy_bytes_per_s'] / 1e12:.2f} TB/s, "
        f"bf16 matmul {rates['bf16_flop_per_s'] / 1e12:.0f} TFLOP/s (the floors divide by these)",
        err=True,
    )
    engine_cfg = {  # the one-device run's and every data-parallel rank's
        "max_num_seqs": max_num_seqs,
        "enforce_eager": enforce_eager,
        "absorb_cross": absorb,
        "kv_dtype": kv_dtype,
        "micro_batches": micro_batches,
        "lookahead": lookahead,
        **common.pipeline_options(pipeline_parallel, pp_layers),
        "prefix_cache": not no_prefix_cache,
    }
    for wid in ids:
        res = run_workload(
            wid,
            baseline == "hf",
            tuple(baseline_batch),
            {**engine_cfg, "profile": profile, **({"speculative": spec} if spec else {})},
            scale,
            rates,
            oracle,
        )
        if devices is not None and len(devices) > 1:
            from encdec_cli.tasks.bench_parallel import run_data_parallel

            res["data_parallel"] = dp = run_data_parallel(wid, devices, engine_cfg, scale, res["ours"])
            typer.echo(
                f"{wid} {len(devices)} ranks ({','.join(devices)}): total {dp['total']:,.1f}, per device "
                f"{dp['per_device']:,.1f}, scaling x{dp['scaling']:.2f} over one device ({res['ours']:,.1f})",
                err=True,
            )
        results.append(res)
        write_results(results, path, rates)
        summary.record(counts={"done": len(results), "failed": 0, "skipped": 0, "failed_before": 0},
                       workloads=results, output=str(path))  # fmt: skip
        if wid == "W6":
            pc = res["prefix_cache"]
            typer.echo(
                f"{wid} {res['model']:<18} {res['metric']:<13} prefix cache on {res['ours']:,.1f}  "
                f"off {res['cache_off']:,.1f}  x{res['ratio']:.2f}  ({pc['hits']} hits, {pc['misses']} "
                f"misses, {pc['evictions']} evictions, ~{pc['encoder_seconds_saved']:.2f} s encoder saved)",
                err=True,
            )
            continue
        base = (
            f"{res['baseline']:,.1f} (batch {res['baseline_batch']})  x{res['ratio']:.2f}"
            if "baseline" in res
            else ""
        )
        trt = "".join(
            f"  vs TensorRT-LLM {k} (published, H100) x{v:.2f}"
            for k, v in res.get("vs_trtllm_published_h100", {}).items()
        )
        typer.echo(
            f"{wid} {res['model']:<18} {res['metric']:<13} ours {res['ours']:,.1f}  baseline {base}  "
            f"floor {res['floor_fraction']:.0%}{trt}",
            err=True,
        )
        for run in res.get("speculative", {}).get("runs", []):
            typer.echo(
                f"    synthetic oracle alpha {run['alpha']:.2f} K {run['k']}: {run['value']:,.1f} "
                f"x{run['speedup']:.2f}, {run['tokens_per_step']:.2f} tokens/step, "
                f"{(run['acceptance_rate'] or 0):.0%} accepted",
                err=True,
            )
    typer.echo(f"wrote {path}", err=True)


def _speculative(text: str, alphas: str, ks: str):
    """--speculative for bench -> (oracle sweep (alphas, Ks) or None, engine speculative value or None)."""
    from encdec_cli.engine import parse_speculative

    t = text.strip().lower()
    if t == "oracle" or t.startswith("oracle:"):
        if t != "oracle":
            parts = t.split(":")
            if len(parts) != 3:
                common.fail(f"--speculative oracle:ALPHA:K, e.g. oracle:0.7:4; got {text!r}")
            alphas, ks = parts[1], parts[2]
        try:
            a = tuple(float(x) for x in alphas.split(",") if x.strip())
            k = tuple(int(x) for x in ks.split(",") if x.strip())
        except ValueError:
            common.fail(f"oracle alphas and Ks are comma-separated numbers; got {alphas!r} and {ks!r}")
        if not a or not k or any(not 0 <= x <= 1 for x in a) or any(not 1 <= x <= 16 for x in k):
            common.fail("oracle alphas must be in [0, 1] and Ks in 1..16")
        return (a, k), None
    try:
        spec = parse_speculative(text)
    except ValueError as e:
        common.fail(f"{e}; bench also takes oracle or oracle:ALPHA:K")
    if spec is not None and spec.kind == "model":
        common.fail(
            "bench runs random weights: a draft model would agree by chance only; use --speculative oracle"
        )
    return None, text if spec is not None else None
