"""A request's beams as one cross-attention entry (``runner.cross_entries``): its consecutive rows
read the request's encoder keys once. The entries follow the rows through steps launched ahead,
requests that end (``keep_rows``) and preemption; the outputs are those of one entry a row."""

from __future__ import annotations

import numpy as np
import pytest

from encdec_cli.engine import Engine
from encdec_cli.engine import runner as runner_module
from encdec_cli.engine.runner import CROSS_ENTRY_ROWS, cross_entries
from tests.support.text_models import random_text_requests, single_thread


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def test_runs_of_one_request_become_entries():
    first, cu = cross_entries(np.array([5, 5, 5, 5, 7, 9, 9]))
    assert first.tolist() == [0, 4, 5]
    assert cu.tolist() == [0, 4, 5, 7]
    assert cu.dtype == np.int32
    assert cross_entries(np.array([3, 1, 2])) is None  # one row a request: the step's own entries
    assert cross_entries(np.array([4])) is None
    # a run longer than one query tile is cut into entries of at most CROSS_ENTRY_ROWS rows
    first, cu = cross_entries(np.array([2] * (CROSS_ENTRY_ROWS + 4) + [8, 8]))
    assert cu.tolist() == [0, CROSS_ENTRY_ROWS, CROSS_ENTRY_ROWS + 4, CROSS_ENTRY_ROWS + 6]
    # the same request again after another (not consecutive): entries of their own
    first, cu = cross_entries(np.array([1, 1, 2, 1, 1]))
    assert cu.tolist() == [0, 2, 3, 5]


def _run(loaded, reqs, **cfg):
    engine = Engine(loaded, block_size=4, **{"num_blocks": 400, "max_num_seqs": 12, **cfg})
    out = {r.request_id: r for r in engine.generate(reqs)}
    assert all(r.error is None for r in out.values())
    assert engine.blocks.num_free == engine.blocks.num_blocks
    return engine, {
        i: [(c.token_ids, c.finish_reason, c.score) for c in r.completions] for i, r in out.items()
    }


@pytest.mark.parametrize(
    "cfg", [{}, {"lookahead": False}, {"num_blocks": 30}], ids=["ahead", "step-by-step", "preemption"]
)
def test_beams_in_one_entry_give_the_row_by_row_results(bart_cpu, monkeypatch, cfg):
    """Beam search (3 beams, varied lengths: requests end at different steps and rows are kept
    ahead of the host) and best-of sampling through entries, against one entry a row."""
    tiny, loaded = bart_cpu
    reqs = random_text_requests(tiny, loaded.tokenizer, 10, seed=1, num_beams=3, num_return_sequences=2)
    reqs += random_text_requests(tiny, loaded.tokenizer, 4, seed=2)  # greedy rows between them
    for i, r in enumerate(reqs):
        r.request_id = i
    made = []

    def spy(crows):
        entries = cross_entries(crows)
        made.append(len(crows) if entries is None else len(entries[0]))
        made.append(-len(crows))
        return entries

    monkeypatch.setattr(runner_module, "cross_entries", spy)
    engine, got = _run(loaded, reqs, **cfg)
    rows, entries = -sum(m for m in made if m < 0), sum(m for m in made if m > 0)
    assert entries < rows / 2  # the beams' rows shared entries
    if cfg.get("num_blocks"):
        assert engine.scheduler.num_preemptions > 0
    if not cfg:
        assert engine.stats.ahead_steps >= 5  # beam steps launched ahead (children on the last entries)

    monkeypatch.setattr(runner_module, "cross_entries", lambda crows: None)
    _, want = _run(loaded, reqs, **cfg)
    # the same hypotheses; scores to float32 rounding (the CPU reference's products over three
    # query rows at once sum in another order than row by row)
    assert {i: [h[:2] for h in hyps] for i, hyps in got.items()} == {
        i: [h[:2] for h in hyps] for i, hyps in want.items()
    }
    for i, hyps in got.items():
        assert [h[2] for h in hyps] == pytest.approx([h[2] for h in want[i]], rel=1e-5)
