"""Steps launched one ahead (``EngineConfig.lookahead``): the next step's model run starts before
the current step's tokens reach the host; rows that stop are computed once more and dropped.
Outputs must be exactly those of the plain step-by-step engine, whatever happens meanwhile:
stop tokens, admissions, requests arriving mid-run, blocks running out (preemption). CPU, the
eager path; the CUDA-graph path is covered in tests/gpu/test_cuda_graphs.py."""

from __future__ import annotations

import pytest

from encdec_cli.engine import Engine, Request
from tests.support.text_models import random_text_requests, single_thread


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def requests(tiny, tok, n=30, seed=0, **params) -> list[Request]:
    return random_text_requests(tiny, tok, n, seed, **params)


def run(loaded, reqs, lookahead, stream=False, **cfg):
    engine = Engine(
        loaded, lookahead=lookahead, block_size=4, **{"num_blocks": 400, "max_num_seqs": 8, **cfg}
    )

    def source():  # a streaming source: now and then nothing is ready yet
        for i, r in enumerate(reqs):
            if stream and i % 3 == 0:
                yield None
            yield r

    results = {r.request_id: (r.token_ids, r.finish_reason, r.error) for r in engine.generate(source())}
    assert sorted(results) == [r.request_id for r in reqs]
    return engine, results


@pytest.mark.parametrize(
    "cfg,stream",
    [({}, False), ({}, True), ({"num_blocks": 24}, False), ({"max_num_seqs": 30}, True)],
    ids=["admissions", "arrivals", "preemption", "all-at-once"],
)
def test_lookahead_gives_the_step_by_step_results(bart_cpu, cfg, stream):
    tiny, loaded = bart_cpu
    reqs = requests(tiny, loaded.tokenizer)
    plain, want = run(loaded, reqs, False, stream, **cfg)
    ahead, got = run(loaded, reqs, True, stream, **cfg)
    assert got == want
    assert plain.stats.ahead_steps == 0
    assert ahead.stats.ahead_steps >= 10  # the path ran, many times
    assert any(reason == "stop" for _, reason, _ in got.values())  # rows did stop early
    if cfg.get("num_blocks") == 24:
        assert ahead.scheduler.num_preemptions > 0


def test_value_dependent_rules_do_not_run_ahead(bart_cpu):
    """A rule reading the previous tokens (no-repeat n-gram) needs them before the next step."""
    tiny, loaded = bart_cpu
    reqs = requests(tiny, loaded.tokenizer, n=6, no_repeat_ngram_size=2)
    engine, got = run(loaded, reqs, True)
    assert engine.stats.ahead_steps == 0
    assert got == run(loaded, reqs, False)[1]
