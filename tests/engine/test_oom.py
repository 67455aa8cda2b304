"""Out of device memory during a step is not fatal: the engine sends the step's requests back to
waiting (they recompute), halves its batch limits and goes on; only a request that runs alone fails.

The OOM is injected by the runner's test hook (``runner.fail_at_calls`` / ``ENCDEC_INJECT_OOM_AT``):
the chosen encode/decode calls raise ``torch.OutOfMemoryError`` as a CUDA allocation would. CPU only.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from encdec_cli.engine import Engine, Request, SamplingParams
from encdec_cli.engine.block_manager import BlockManager
from encdec_cli.engine.config import EngineConfig
from encdec_cli.engine.scheduler import Scheduler
from encdec_cli.engine.sequence import SequenceGroup
from tests.support.text_models import N_WORDS, single_thread
from tests.support.whisper_models import EOT, SOT, load_ours, random_whisper

NUM_REQUESTS = 40
ENGINE = dict(block_size=4, num_blocks=400, max_num_seqs=12)


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def text_requests(tiny, tok, n=NUM_REQUESTS, num_beams=1, seed=0) -> list[Request]:
    rng = random.Random(seed)
    texts = [" ".join(f"w{rng.randrange(N_WORDS)}" for _ in range(rng.randint(1, 12))) for _ in range(n)]
    params = SamplingParams(
        max_new_tokens=16,
        stop_token_ids=(tiny.eos_token_id,),
        forced_tokens=tiny.forced_tokens,
        num_beams=num_beams,
    )
    return [Request(tok(t).input_ids, tiny.prompt_ids, params, i) for i, t in enumerate(texts)]


def run(loaded, requests, fail_at=(), **cfg) -> tuple[Engine, dict]:
    engine = Engine(loaded, **{**ENGINE, **cfg})
    engine.runner.fail_at_calls = set(fail_at)
    results = {r.request_id: r for r in engine.generate(requests)}
    assert sorted(results) == [r.request_id for r in requests]  # every request answered once
    return engine, results


def test_injected_oom_recovers_with_identical_results(bart_cpu, caplog):
    tiny, loaded = bart_cpu
    reqs = text_requests(tiny, loaded.tokenizer)
    ref_engine, ref = run(loaded, reqs)
    assert ref_engine.stats.oom_recoveries == 0
    assert all(r.error is None for r in ref.values())
    assert len({tuple(r.token_ids) for r in ref.values()}) > 0.8 * NUM_REQUESTS  # input-dependent

    fail_at = {1, 3, 8}  # the first encoder run, then decode / encode calls after re-admission
    with caplog.at_level("WARNING", logger="encdec"):
        engine, out = run(loaded, reqs, fail_at=fail_at)
    assert engine.stats.oom_recoveries == len(fail_at)
    assert [out[i].token_ids for i in range(NUM_REQUESTS)] == [ref[i].token_ids for i in range(NUM_REQUESTS)]
    assert all(r.error is None for r in out.values())
    # limits halved (from the number of sequences that were running), never below 1
    assert 1 <= engine.max_num_seqs < ENGINE["max_num_seqs"]
    assert engine.scheduler.max_encoder_tokens < ref_engine.scheduler.max_encoder_tokens
    assert sum("out of device memory" in m for m in caplog.messages) == len(fail_at)
    assert engine.blocks.num_free == engine.blocks.num_blocks  # nothing leaked
    assert engine.scheduler.idle


def test_oom_in_an_encoder_run_shrinks_the_encoder_batches_only(bart_cpu, caplog):
    """An encoder run that runs out of memory (a vision tower's activations, say) halves the encoder
    tokens a step, from that run's own, and leaves the decode batch limit as it was; one in a
    decode step halves both."""
    tiny, loaded = bart_cpu
    reqs = text_requests(tiny, loaded.tokenizer)
    ref_engine, ref = run(loaded, reqs)
    engine = Engine(loaded, **ENGINE)
    engine.runner.fail_at_calls = {1}  # call 1: the first encoder run
    runs, encode = [], engine.runner.encode
    engine.runner.encode = lambda groups: runs.append(sum(g.encoder_len for g in groups)) or encode(groups)
    with caplog.at_level("WARNING", logger="encdec"):
        out = {r.request_id: r for r in engine.generate(reqs)}
    assert engine.stats.oom_recoveries == 1
    assert {i: r.token_ids for i, r in out.items()} == {i: r.token_ids for i, r in ref.items()}
    assert engine.max_num_seqs == ENGINE["max_num_seqs"]
    assert engine.scheduler.max_encoder_tokens == runs[0] // 2 < ref_engine.scheduler.max_encoder_tokens
    assert max(runs[1:]) <= runs[0] // 2  # smaller encoder batches from then on
    assert any("in the encoder run of 12 requests" in m for m in caplog.messages)
    # a decode call (call 2: the first step's decode) halves the sequences too
    engine, out = run(loaded, reqs, fail_at={2})
    assert {i: r.token_ids for i, r in out.items()} == {i: r.token_ids for i, r in ref.items()}
    assert engine.max_num_seqs == ENGINE["max_num_seqs"] // 2
    assert engine.scheduler.max_encoder_tokens == ref_engine.scheduler.max_encoder_tokens // 2


def test_oom_with_a_single_request_fails_only_that_request(bart_cpu):
    tiny, loaded = bart_cpu
    reqs = text_requests(tiny, loaded.tokenizer, n=6)
    # one slot: every step runs one request; call 1 (its encoder run) fails -> that request fails
    engine, out = run(loaded, reqs, fail_at={1}, max_num_seqs=1)
    _, ref = run(loaded, reqs, max_num_seqs=1)
    failed = [i for i, r in out.items() if r.error]
    assert len(failed) == 1 and "out of device memory" in out[failed[0]].error
    assert out[failed[0]].completions == []
    assert all(out[i].token_ids == ref[i].token_ids for i in out if i not in failed)
    assert engine.stats.oom_recoveries == 1
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_beam_requests_recompute_after_oom(bart_cpu):
    tiny, loaded = bart_cpu
    reqs = text_requests(tiny, loaded.tokenizer, n=8, num_beams=4)
    _, ref = run(loaded, reqs)
    engine, out = run(loaded, reqs, fail_at={2, 5})  # decode steps of 3 and then 1-2 requests
    assert engine.stats.oom_recoveries == 2
    ok = [i for i, r in out.items() if r.error is None]
    assert len(ok) >= 7 and all(out[i].token_ids == ref[i].token_ids for i in ok)


def test_requests_wider_than_the_shrunk_limit_still_run(bart_cpu):
    """After shrinking, max_num_seqs can be below num_beams: such a request is admitted when
    nothing else runs instead of waiting forever."""
    tiny, loaded = bart_cpu
    reqs = text_requests(tiny, loaded.tokenizer, n=4, num_beams=4)
    _, ref = run(loaded, reqs)
    engine = Engine(loaded, **ENGINE)
    engine.scheduler.max_num_seqs = 2
    out = {r.request_id: r.token_ids for r in engine.generate(reqs)}
    assert out == {i: r.token_ids for i, r in ref.items()}


def test_whisper_oom_recovery(tmp_path):
    random_whisper(tmp_path)
    ours = load_ours(tmp_path)
    g = torch.Generator().manual_seed(3)
    feats = [torch.randn(80, 3000, generator=g) for _ in range(6)]
    reqs = [
        Request(f, [SOT], SamplingParams(max_new_tokens=20, stop_token_ids=(EOT,)), i)
        for i, f in enumerate(feats)
    ]
    cfg = dict(num_blocks=6 * 375 + 80, block_size=4, max_num_seqs=6)
    _, ref = run(ours, reqs, **cfg)
    engine, out = run(ours, reqs, fail_at={2, 5}, **cfg)
    assert engine.stats.oom_recoveries == 2
    assert {i: r.token_ids for i, r in out.items()} == {i: r.token_ids for i, r in ref.items()}


def test_scheduler_preempt_all_and_oversized_admission():
    blocks = BlockManager(64, 4)
    sched = Scheduler(EngineConfig(max_num_seqs=2, max_encoder_tokens=8, window=16), blocks)
    wide = SequenceGroup(Request([1] * 5, [0], SamplingParams(num_beams=4, max_new_tokens=3)), 5, 3, order=1)
    sched.add(wide)
    plan = sched.schedule()  # 4 beams > max_num_seqs 2, but nothing runs: admitted anyway
    assert plan.encode == [wide] and sched.running == [wide]
    assert sched.preempt_all() == [wide]
    assert sched.running == [] and sched.waiting == [wide] and wide.preempted and not wide.encoded
    assert blocks.num_free == blocks.num_blocks
    plan = sched.schedule()  # re-admitted, its blocks reserved again
    assert plan.encode == [wide] and wide.seqs[0].block_table


def test_cli_job_survives_injected_oom(tiny_text_model, tmp_path):
    """End to end: a summarize job with OOMs injected completes with the same output and says so."""
    tiny = tiny_text_model("bart")
    rng = random.Random(5)
    texts = [" ".join(f"w{rng.randrange(N_WORDS)}" for _ in range(rng.randint(1, 10))) for _ in range(60)]
    pq.write_table(pa.table({"text": texts}), tmp_path / "in.parquet")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def job(out, inject):
        e = {**env, "ENCDEC_INJECT_OOM_AT": inject} if inject else env
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "encdec_cli",
                "summarize",
                str(tmp_path / "in.parquet"),
                "-m",
                str(tiny.path),
                "-o",
                str(out),
                "--max-num-seqs",
                "16",
                "--device",
                "cpu",
                "-q",
            ],
            capture_output=True,
            text=True,
            env=e,
            timeout=300,
        )
        assert r.returncode == 0, r.stderr
        return r.stderr, [json.loads(line) for line in out.read_text().splitlines()]

    _, ref = job(tmp_path / "ref.jsonl", None)
    stderr, got = job(tmp_path / "oom.jsonl", "2,4")
    assert got == ref
    assert "2 out-of-memory recoveries" in stderr and "out of device memory" in stderr


def test_more_beams_than_sequence_slots_is_a_request_error(bart_cpu):
    tiny, loaded = bart_cpu
    reqs = text_requests(tiny, loaded.tokenizer, n=2, num_beams=4)
    _, out = run(loaded, reqs, max_num_seqs=2)
    assert all("exceeds max_num_seqs" in r.error for r in out.values())
