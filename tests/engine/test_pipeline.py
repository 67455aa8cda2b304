"""Pipeline parallelism (encdec_cli/engine/pipeline.py) on the CPU over gloo: 2 and 3 stages give the
tokens of one process, greedy and 4-beam, with preemption forced by a small KV pool; the stage
placement and its checks; a stage killed mid-job ends the job cleanly and a re-run resumes."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from encdec_cli.engine import Engine, Request, SamplingParams
from encdec_cli.engine.pipeline import StagePlan, parse_pp_layers, split_layers, stage_sizes
from encdec_cli.errors import PipelineFailure
from tests.support.text_models import random_words, source_ids, vocabulary
from tests.support.whisper_models import EOT, SOT, random_whisper

# a small pool of small blocks: the 4-beam runs must preempt (asserted); a Whisper request's 1500
# encoder positions take 94 blocks of 16
POOL = dict(block_size=4, num_blocks=20, max_num_seqs=8, device="cpu", dtype="float32")
WHISPER_POOL = {**POOL, "block_size": 16, "num_blocks": 194}


def _text_requests(tiny, beams: int) -> list[Request]:
    rng = random.Random(1)
    vocab = vocabulary(tiny.name)
    params = SamplingParams(max_new_tokens=14, num_beams=beams, stop_token_ids=[vocab["</s>"]])
    return [
        Request(
            source_ids(tiny.name, random_words(rng, rng.randint(2, 11))),
            [tiny.decoder_start_token_id],
            params,
            i,
        )
        for i in range(10)
    ]


def _whisper_requests(beams: int) -> list[Request]:
    rng = np.random.default_rng(0)
    params = SamplingParams(max_new_tokens=24, num_beams=beams, stop_token_ids=[EOT])
    # log-mel features: the stage split is what is tested, not the feature extractor
    return [Request(torch_mel(rng), [SOT], params, i) for i in range(6)]


def torch_mel(rng):
    import torch

    return torch.from_numpy(rng.standard_normal((80, 3000)).astype(np.float32))


def _run(engine: Engine, requests: list[Request]) -> dict:
    before = engine.scheduler.num_preemptions
    out = {r.request_id: (r.error, [c.token_ids for c in r.completions]) for r in engine.generate(requests)}
    assert all(err is None for err, _ in out.values()), out
    return out, engine.scheduler.num_preemptions - before


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("whisper-pp")
    random_whisper(path, encoder_layers=2, decoder_layers=2)
    return path


def _family(family: str, tiny_text_model, whisper_dir):
    """(pool, model folder, requests(beams)) of a family's test model."""
    if family.startswith("whisper"):
        return WHISPER_POOL, whisper_dir, _whisper_requests
    tiny = tiny_text_model(family)
    return POOL, tiny.path, lambda beams: _text_requests(tiny, beams)


@pytest.mark.parametrize("family", ["whisper", "bart", "mbart", "t5", "t5_v1_1"])
def test_stages_give_the_tokens_of_one_process(family, tiny_text_model, whisper_dir):
    pool, path, make = _family(family, tiny_text_model, whisper_dir)
    one = Engine(str(path), **pool)
    want = {beams: _run(one, make(beams)) for beams in (1, 4)}
    assert want[4][1] > 0, "the 4-beam run did not preempt: the test's pool is too large"
    for stages in (2, 3):
        engine = Engine(str(path), pipeline_parallel=stages, **pool)
        try:
            assert engine.num_blocks == one.num_blocks
            for beams in (1, 4):
                got = _run(engine, make(beams))
                assert got == want[beams], f"{family}: {stages} stages, {beams} beam(s)"
            busy = engine.stats.stage_busy_seconds
            assert len(busy) == stages and all(b > 0 for b in busy)
        finally:
            engine.close()


@pytest.mark.parametrize("family", ["whisper", "bart"])
def test_stage_graphs_give_the_tokens_of_one_process(family, tiny_text_model, whisper_dir, monkeypatch):
    """Per-stage graphs (``StageGraphs``), on the CPU through their stand-in (a replay re-runs the
    captured call on the static buffers): micro-batches padded to the captured sizes, stage 0's
    tokens and the other stages' (x, residual) copied in (Whisper: pre-norm, a residual travels;
    BART: post-norm, none), the outputs cloned out. The tokens of one process, greedy and 4-beam
    through preemption, and every decoder stage replayed its graphs."""
    monkeypatch.setenv("ENCDEC_TEST_STAGE_GRAPHS", "1")  # read by every stage (the workers inherit it)
    pool, path, make = _family(family, tiny_text_model, whisper_dir)
    one = Engine(str(path), **pool)
    want = {beams: _run(one, make(beams)) for beams in (1, 4)}
    one.close()
    # 2 + 2 layers in 3 stages as 1, 2, 1: stage 0 holds no decoder layer (it embeds the tokens),
    # stage 1 receives that bare embedding, stage 2 what stage 1's layer passes on
    for stages, layers in ((2, None), (3, (1, 2, 1))):
        engine = Engine(str(path), pipeline_parallel=stages, pp_layers=layers, **pool)
        try:
            assert engine.uses_cuda_graphs
            for beams in (1, 4):
                got = _run(engine, make(beams))
                assert got[0] == want[beams][0], f"{family}: {stages} stages, {beams} beam(s)"
            assert got[1] > 0, "the 4-beam run in stages did not preempt"
            stats = engine.runner.stage_stats()
            decoding = [s for s, p in zip(stats, engine.runner.plans, strict=True) if p.has_decoder]
            assert decoding and all(s["replays"] > 0 for s in decoding), stats
        finally:
            engine.close()


def test_a_stage_without_room_for_its_graphs_runs_eagerly(tiny_text_model, monkeypatch):
    """Capturing stage 0's graphs runs out of memory: that stage goes on eagerly (the job is not
    lost), the other stage replays its graphs, the tokens are those of one process."""
    from encdec_cli.engine import pipeline

    monkeypatch.setenv("ENCDEC_TEST_STAGE_GRAPHS", "1")
    tiny = tiny_text_model("bart")
    one = Engine(str(tiny.path), **POOL)
    want = _run(one, _text_requests(tiny, 1))[0]
    one.close()

    def no_room(self, model):
        raise torch.OutOfMemoryError("injected: no room for the graphs")

    monkeypatch.setattr(pipeline.StageGraphs, "capture", no_room)  # this process: stage 0 only
    engine = Engine(str(tiny.path), pipeline_parallel=2, pp_layers=(3, 1), **POOL)  # both decode
    try:
        assert _run(engine, _text_requests(tiny, 1))[0] == want
        stats = engine.runner.stage_stats()
        assert stats[0]["replays"] == 0 and not engine.runner.stage.use_graphs
        assert stats[1]["replays"] > 0
    finally:
        engine.close()


def test_a_step_launched_ahead_runs_while_stage_0_works_and_a_dropped_one_is_drained(tiny_text_model):
    """Greedy steps launched ahead come back as ``InFlightLogits``: stage 0's host goes on while
    the stages compute, and the next step receives them. A job whose rows all stop at their first
    token leaves such a step unreceived (the engine drops it); the next job's first exchange
    drains it, so its logits are never taken for the next job's."""
    from encdec_cli.engine.pipeline import InFlightLogits

    tiny = tiny_text_model("bart")
    one = Engine(str(tiny.path), **POOL)
    want = _run(one, _text_requests(tiny, 1))[0]
    one.close()
    engine = Engine(str(tiny.path), pipeline_parallel=2, pp_layers=(3, 1), **POOL)
    try:
        assert _run(engine, _text_requests(tiny, 1))[0] == want
        assert engine.stats.ahead_steps > 0
        every = SamplingParams(max_new_tokens=8, stop_token_ids=list(range(engine.model.vocab_size)))
        reqs = [Request(r.encoder_input, r.prompt_ids, every, r.request_id) for r in _text_requests(tiny, 1)]
        stopped = _run(engine, reqs)[0]
        assert all(tokens == [[]] for _, tokens in stopped.values())
        assert isinstance(engine.runner._in_flight, InFlightLogits)  # launched, then let go
        assert _run(engine, _text_requests(tiny, 1))[0] == want
    finally:
        engine.close()


def test_absorbed_cross_attention_across_stages(whisper_dir):
    """The encoder rows of a request live in every decoder stage's own pool."""
    one = Engine(str(whisper_dir), absorb_cross=True, **WHISPER_POOL)
    want = _run(one, _whisper_requests(1))
    engine = Engine(
        str(whisper_dir), absorb_cross=True, pipeline_parallel=3, pp_layers=(1, 2, 1), **WHISPER_POOL
    )
    try:
        assert engine.absorbs_cross
        assert _run(engine, _whisper_requests(1)) == want
    finally:
        engine.close()


@pytest.mark.parametrize("family", ["whisper", "whisper-absorbed", "bart", "t5"])
def test_fp8_stages_give_the_tokens_of_one_fp8_process(family, tiny_text_model, whisper_dir):
    """--kv-dtype fp8 with stages: every stage's pool holds e4m3 values and a scale a row (K/V, or
    the absorbed encoder rows) for its own layers, as the one process's pool does for all: the same
    tokens, greedy and 4-beam, through preemption."""
    from encdec_kernels import FP8_DTYPE

    absorb = family == "whisper-absorbed"
    pool, path, make = _family(family, tiny_text_model, whisper_dir)
    pool = {**pool, "kv_dtype": "fp8", "absorb_cross": absorb}
    if absorb:  # a cross block of 2 stages holds the rows of one layer's K and V: 47 a request
        pool["num_blocks"] = 100
    one = Engine(str(path), **pool)
    assert one.kv_dtype_name == "fp8_e4m3" and one.absorbs_cross == absorb
    want = {beams: _run(one, make(beams)) for beams in (1, 4)}
    one.close()
    # stage 0: every encoder layer and decoder layer 0; stage 1: the last decoder layer (each of
    # the 2 + 2 layer models), so both stages hold a pool
    engine = Engine(str(path), pipeline_parallel=2, pp_layers=(3, 1), **pool)
    try:
        assert engine.kv_dtype_name == "fp8_e4m3" and engine.absorbs_cross == absorb
        kv = engine.runner.kv  # stage 0's own pool (decoder layer 0)
        assert kv.values.dtype == FP8_DTYPE and kv.values.shape[1] == 1
        assert kv.scales.shape == kv.values.shape[:-1]
        assert (kv.row_scales is not None) == absorb
        for beams in (1, 4):
            got = _run(engine, make(beams))
            assert got[0] == want[beams][0], f"{family}: {beams} beam(s)"
        assert got[1] > 0, "the 4-beam run in stages did not preempt: the test's pool is too large"
        if not absorb:  # one block layout, so the same preemptions
            assert got[1] == want[4][1]
    finally:
        engine.close()


def test_fp8_stage_pools_are_sized_from_fp8_bytes(whisper_dir):
    """The pool size of a pipeline is the fewest blocks any stage's memory holds, counted in fp8
    values plus their float32 scales: with the decoder on the worker stage, that stage's count."""
    from encdec_cli.engine.runner import KVPool
    from encdec_kernels import FP8_DTYPE

    budget = 1 << 20
    cfg = dict(block_size=4, max_num_seqs=4, device="cpu", dtype="float32", cpu_kv_cache_bytes=budget)
    # stage 0: encoder layer 0 (no pool); stage 1: encoder layer 1 and both decoder layers
    engine = Engine(str(whisper_dir), pipeline_parallel=2, pp_layers=(1, 3), kv_dtype="fp8", **cfg)
    try:
        spec = engine.model.cache_spec
        per = KVPool.bytes_per_block(spec, 2, 4, FP8_DTYPE)
        assert per == 2 * 2 * 4 * spec.num_heads * (spec.head_dim + 4)
        assert engine.runner.kv is None and engine.num_blocks == budget // per
        plain = budget // KVPool.bytes_per_block(spec, 2, 4, torch.float32)
        assert engine.num_blocks > 3 * plain  # float32 values: 4 bytes -> 1 (+ the scales)
        # the engine works on it
        assert _run(engine, _whisper_requests(1)[:2])[0]
    finally:
        engine.close()


def test_out_of_memory_in_a_pipeline_step_recovers(whisper_dir, monkeypatch):
    one = Engine(str(whisper_dir), **WHISPER_POOL)
    want = _run(one, _whisper_requests(1))[0]
    monkeypatch.setenv("ENCDEC_INJECT_OOM_AT", "3")
    engine = Engine(str(whisper_dir), pipeline_parallel=2, **WHISPER_POOL)
    try:
        assert _run(engine, _whisper_requests(1))[0] == want
        assert engine.stats.oom_recoveries == 1
    finally:
        engine.close()


def test_out_of_memory_in_a_worker_stage_recovers(whisper_dir, monkeypatch):
    """Stage 1 of 3 fails a part: the stages still exchange every message, the failure reaches
    stage 0 with the logits, and the step is recomputed."""
    one = Engine(str(whisper_dir), **WHISPER_POOL)
    want = _run(one, _whisper_requests(1))[0]
    monkeypatch.setenv("ENCDEC_INJECT_STAGE_OOM", "1:5")
    engine = Engine(str(whisper_dir), pipeline_parallel=3, **WHISPER_POOL)
    try:
        assert _run(engine, _whisper_requests(1))[0] == want
        assert engine.stats.oom_recoveries == 1
    finally:
        engine.close()


def test_placement_balances_cost_and_checks_pp_layers(whisper_dir):
    assert split_layers([1, 1, 1, 1], 2) == [2, 2]
    assert split_layers([1, 1, 1, 3], 2) == [3, 1]
    assert split_layers([4, 1, 1, 1, 1], 2) == [1, 4]
    assert split_layers([1, 1, 1], 3) == [1, 1, 1]
    # encoder-only, mixed and decoder-only stages
    plans = [StagePlan([1, 2, 1], 2, s) for s in range(3)]
    assert [(p.e0, p.e1, p.d0, p.d1) for p in plans] == [(0, 1, 0, 0), (1, 2, 0, 1), (2, 2, 1, 2)]
    assert plans[0].encoder_last == 1 and plans[0].decoder_stages == [1, 2]
    assert parse_pp_layers("3,1") == (3, 1) and parse_pp_layers(None) is None
    with pytest.raises(ValueError, match="comma-separated"):
        parse_pp_layers("3;1")
    from encdec_models.loading import load_model

    model = load_model(whisper_dir, "cpu", "float32").model
    assert stage_sizes(model, 2, (3, 1)) == [3, 1]
    with pytest.raises(ValueError, match="summing to this model's 4 layers"):
        stage_sizes(model, 2, (2, 3))
    with pytest.raises(ValueError, match="give 3 numbers"):
        stage_sizes(model, 3, (2, 2))
    with pytest.raises(ValueError, match="use 1 to 4 stages"):
        stage_sizes(model, 5, None)


def test_a_killed_stage_ends_the_engine_naming_the_requests_in_flight(whisper_dir):
    engine = Engine(str(whisper_dir), pipeline_parallel=2, **WHISPER_POOL)
    try:
        results = engine.generate(_whisper_requests(1))
        engine.step()  # requests now in flight
        os.kill(engine.runner.procs[0].pid, signal.SIGKILL)
        with pytest.raises(
            PipelineFailure, match=r"stage 1 \(exit code -9\) stopped.*in flight were not finished"
        ):
            list(results)
    finally:
        engine.close()


def test_a_killed_stage_fails_the_job_and_a_rerun_resumes(tiny_text_model, tmp_path):
    """The CLI: exit status 1 with one error line naming the stage; the rows that finished before
    are kept and the same command run again does the rest."""
    tiny = tiny_text_model("bart")
    rng = random.Random(0)
    src, out = tmp_path / "in.parquet", tmp_path / "out.parquet"
    texts = [" ".join(random_words(rng, rng.randint(2, 8))) for _ in range(40)]
    pq.write_table(pa.table({"id": list(range(40)), "text": texts}), src)
    cmd = [sys.executable, "-m", "encdec_cli", "summarize", str(src), "-m", str(tiny.path), "-o", str(out),
           "--device", "cpu", "-pp", "2", "-q", "--max-num-seqs", "4"]  # fmt: skip
    # the job kills its stage 1 at its 12th model call (a test hook); rows finished by then are saved
    env = {**os.environ, "ENCDEC_TEST_KILL_STAGE_AT_CALL": "12", "ENCDEC_PART_ROWS": "1"}
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 1, first.stderr
    assert "error: pipeline stage 1" in first.stderr and "run the same command again" in first.stderr
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    table = pq.read_table(out)
    assert table.column("id").to_pylist() == list(range(40))
    assert all(table.column("summary").to_pylist())


def _cli(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "encdec_cli", *map(str, args)],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )  # fmt: skip


def test_data_parallel_ranks_each_a_pipeline(tiny_text_model, tmp_path):
    """-dp 2 -pp 2: two data-parallel ranks, each the stage 0 of its own two-stage pipeline (four
    processes): the output table is byte for byte the one process's."""
    tiny = tiny_text_model("bart")
    rng = random.Random(6)
    texts = [" ".join(random_words(rng, rng.randint(2, 8))) for _ in range(24)]
    pq.write_table(pa.table({"id": list(range(24)), "text": texts}), tmp_path / "in.parquet")
    outs = {}
    for name, extra in (("one", []), ("dp-pp", ["-dp", 2, "-pp", 2])):
        out = tmp_path / f"{name}.parquet"
        r = _cli("summarize", tmp_path / "in.parquet", "-m", tiny.path, "-o", out, "--device", "cpu",
                 "--max-num-seqs", 4, "-q", *extra)  # fmt: skip
        assert r.returncode == 0, r.stderr
        outs[name] = out.read_bytes()
    assert outs["one"] == outs["dp-pp"]


def test_summarize_in_stages_with_an_fp8_cache(tiny_text_model, tmp_path):
    """summarize -pp 2 --kv-dtype fp8 writes what one process with --kv-dtype fp8 writes, and its
    summary says the cache was fp8."""
    import json

    tiny = tiny_text_model("bart")
    rng = random.Random(7)
    texts = [" ".join(random_words(rng, rng.randint(2, 8))) for _ in range(12)]
    pq.write_table(pa.table({"id": list(range(12)), "text": texts}), tmp_path / "in.parquet")
    outs = {}
    for name, extra in (("one", []), ("two", ["-pp", 2])):
        out, summary = tmp_path / f"{name}.parquet", tmp_path / f"{name}.json"
        r = _cli("summarize", tmp_path / "in.parquet", "-m", tiny.path, "-o", out, "--device", "cpu",
                 "--max-num-seqs", 4, "--kv-dtype", "fp8", "--summary-json", summary,
                 "-q", *extra)  # fmt: skip
        assert r.returncode == 0, r.stderr
        outs[name] = out.read_bytes()
        engine = json.loads(summary.read_text())["engine"]
        assert engine["kv_dtype"] == "fp8_e4m3"
        assert len(engine["stage_busy_seconds"]) == (2 if extra else 0)
    assert outs["one"] == outs["two"]
    assert all(pq.read_table(tmp_path / "two.parquet").column("summary").to_pylist())


def test_image_to_text_in_stages_and_the_usage_refusals(tmp_path, tiny_text_model):
    """image-to-text -pp 2 writes what one process writes; what cannot run in stages is a usage
    error (exit 2) that says why."""
    from tests.support.vision_models import draw_images, random_trocr

    model = tmp_path / "trocr"
    random_trocr(model)
    images = tmp_path / "images"
    images.mkdir()
    for i, im in enumerate(draw_images(3, seed=3)):
        im.save(images / f"{i}.png")
    outs = {}
    for name, extra in (("one", []), ("two", ["-pp", 2])):
        out = tmp_path / f"{name}.jsonl"
        r = _cli("image-to-text", images, "-m", model, "-o", out, "-f", "jsonl", "--device", "cpu",
                 "--max-new-tokens", 8, "-q", *extra)  # fmt: skip
        assert r.returncode == 0, r.stderr
        outs[name] = out.read_bytes()
    assert outs["one"] == outs["two"]
    r = _cli("transcribe", images, "-m", model, "-pp", 2, "--word-timestamps", "--device", "cpu")
    assert r.returncode == 2 and "--word-timestamps needs the whole decoder in one process" in r.stderr
    pq.write_table(pa.table({"text": ["a b c"]}), tmp_path / "x.parquet")
    r = _cli("summarize", tmp_path / "x.parquet", "-m", tiny_text_model("bart").path, "-pp", 2,
             "--pp-layers", "3,x")  # fmt: skip
    assert r.returncode == 2 and "--pp-layers takes comma-separated layer counts" in r.stderr
