"""``encdec bench --data-parallel N``: a workload (W1, W2, ...) run by N rank processes, one engine
each (``encdec_cli.tasks.data_parallel``), beside the one-device run of ``encdec_cli.tasks.bench``.

Each rank builds the workload's model (the same random weights, seed 0) and inputs, warms up, and
then takes blocks of the workload's requests from the job's process as its engine has room, as a
data-parallel job does. The clock runs from the first block handed out (every rank loaded and warm)
to the last result: the total throughput, the throughput per device, and the scaling ratio (total
over the one-device run's)."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch

from encdec_cli.tasks.bench import (
    ENGINE_SEQS,
    WORKLOADS,
    Workload,
    build_models,
    inputs_for,
    warmup_requests,
    workload_requests,
)
from encdec_cli.tasks.data_parallel import DataParallel, chunks
from encdec_cli.tasks.ranks import UnitRequests, shared_config

BLOCK = 8  # requests handed to a rank at a time


def scaled(wid: str, scale: float) -> Workload:
    w = WORKLOADS[wid]
    return w if scale == 1.0 else Workload(**{**asdict(w), "requests": max(1, int(w.requests * scale))})


@dataclass(frozen=True)
class BenchSpec:
    """A rank's engine: the workload's model on the rank's device, warmed up (the untimed part)."""

    wid: str
    scale: float
    engine_cfg: tuple[tuple[str, object], ...]

    def load(self, device: str, share: tuple[int, int] = (0, 1)):
        from encdec_cli.engine import Engine

        w = scaled(self.wid, self.scale)
        enc_inputs, targets = inputs_for(w)
        _, loaded = build_models(w, device, torch.bfloat16, with_hf=False)
        torch.cuda.empty_cache()  # the transformers model the weights came from is gone
        cfg = shared_config({k: v for k, v in self.engine_cfg if k != "profile"}, share)
        cfg["max_num_seqs"] = min(cfg.get("max_num_seqs", ENGINE_SEQS), w.requests * w.num_beams)
        engine = Engine(loaded, **cfg)
        list(engine.generate(warmup_requests(w, loaded.config, enc_inputs, targets)))
        engine.reset_prefix_cache()  # the warm-up ran the workload's first inputs
        engine.reset_stats()
        return engine


@dataclass(frozen=True)
class BenchWork:
    """A rank's side: blocks of request numbers in, the output tokens of each request out."""

    wid: str
    scale: float

    def serve(self, engine, feed, result, progress) -> None:
        from dataclasses import replace

        w = scaled(self.wid, self.scale)
        enc_inputs, targets = inputs_for(w)
        requests = workload_requests(w, engine.loaded.config, enc_inputs, targets)
        units = UnitRequests(engine, feed, result, engine.max_num_seqs // w.num_beams + 2 * BLOCK)

        def expand(unit: int, block: list[int], count) -> Iterator:
            count(len(block))
            for i in block:
                yield replace(requests[i], request_id=(unit, i))

        for r in engine.generate(units.requests(expand)):
            if r.error:
                raise RuntimeError(f"request {r.request_id[1]} failed: {r.error}")
            units.answer(r.request_id[0], len(r.token_ids))


def run_data_parallel(wid: str, devices: list[str], engine_cfg: dict, scale: float, single: float) -> dict:
    """Workload ``wid`` on one rank per device of ``devices``; ``single``: the one-device run's result
    (RTFx or output tok/s). Returns the total and per-device throughput and the scaling ratio."""
    w = scaled(wid, scale)
    gc.collect()  # the one-device run's engine and model: their GPU memory back for the ranks
    torch.cuda.empty_cache()
    spec = BenchSpec(wid, scale, tuple(sorted(engine_cfg.items())))
    tokens = 0

    def on_result(block, n: int) -> None:
        nonlocal tokens
        tokens += n

    def on_failed(block, message: str) -> None:
        raise RuntimeError(message)

    report = DataParallel(spec, devices).run(
        BenchWork(wid, scale), chunks(range(w.requests), BLOCK), on_result, on_failed
    )
    wall = report.last_result - report.started
    if report.deaths:
        raise RuntimeError("; ".join(report.deaths))
    total = 30.0 * w.requests / wall if w.metric == "RTFx" else tokens / wall
    return {
        "ranks": len(devices),
        "devices": devices,
        "wall_s": wall,
        "output_tokens": tokens,
        "total": total,
        "per_device": total / len(devices),
        "scaling": total / single,
    }
