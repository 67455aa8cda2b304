"""``encdec bench``: the standard workloads on a GPU (encdec_cli.tasks.bench)."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from encdec_cli.commands import common


@common.command()
def bench(
    workloads: list[str] = typer.Argument(
        None,
        help="Workload ids of benchmarks/WORKLOADS.md: W1..W5 (the default), T1 / T2 (TensorRT-LLM's "
        "published shapes at batch 32, 64 and 128; or one batch, e.g. T1-B64).",
    ),
    baseline: str = typer.Option(
        "hf", "--baseline", help="hf: also time transformers generate in the same run; none: ours only."
    ),
    baseline_batch: list[int] = typer.Option(
        [16, 64, 128],
        "--baseline-batch",
        help="transformers batch sizes to try (the best counts; Whisper always uses 64).",
    ),
    out: str | None = typer.Option(
        None, "--out", help="JSON results file (default: benchmarks/results/<device>-<time>.json)."
    ),
    max_num_seqs: int = typer.Option(
        512,
        "--max-num-seqs",
        help="Sequences per engine step (beams count singly); the KV pool limits what is admitted.",
    ),
    enforce_eager: bool = typer.Option(False, "--enforce-eager", help="Disable CUDA graphs."),
    pipeline_parallel: common.PipelineParallel = 1,
    pp_layers: common.PpLayers = None,
    scale: float = typer.Option(1.0, "--scale", help="Fraction of each workload's requests (quick checks)."),
    profile: bool = typer.Option(False, "--profile", help="Also time each engine step phase (extra run)."),
    cross: str = typer.Option(
        "auto",
        "--cross",
        help="Cross-attention cache: auto (absorbed where the Hopper kernel runs it), absorbed (the encoder "
        "output once, K/V projections absorbed), kv (K and V per decoder layer).",
    ),
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
    ids, bad = expand_ids(workloads or list(DEFAULT_WORKLOADS))
    if bad:
        choices = ", ".join([w for w in WORKLOADS if not w.startswith(("T1-", "T2-"))] + list(GROUPS))
        common.fail(f"unknown workload(s) {', '.join(bad)}; choose from {choices} (or T1-B32 ... T2-B128)")
    results = []
    dev = torch.cuda.get_device_name().replace(" ", "-")
    path = Path(out or f"benchmarks/results/{dev}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    rates = device_rates()
    typer.echo(
        f"{torch.cuda.get_device_name()}: copy {rates['copy_bytes_per_s'] / 1e12:.2f} TB/s, "
        f"bf16 matmul {rates['bf16_flop_per_s'] / 1e12:.0f} TFLOP/s (the floors divide by these)",
        err=True,
    )
    for wid in ids:
        res = run_workload(
            wid,
            baseline == "hf",
            tuple(baseline_batch),
            {
                "max_num_seqs": max_num_seqs,
                "enforce_eager": enforce_eager,
                "profile": profile,
                "absorb_cross": absorb,
                **common.pipeline_options(pipeline_parallel, pp_layers),
            },
            scale,
            rates,
        )
        results.append(res)
        write_results(results, path, rates)
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
    typer.echo(f"wrote {path}", err=True)
