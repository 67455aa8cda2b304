"""The garbage collector ignores the objects that existed before ``Engine.generate`` while it runs
(``gc.freeze``: a full collection would scan all of torch and transformers), and sees them again
once the last running ``generate`` ends, however it ends."""

from __future__ import annotations

import gc

import pytest

from encdec_cli.engine import Engine
from tests.support.text_models import random_text_requests, single_thread


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def test_generate_freezes_the_collector_while_it_runs(bart_cpu):
    tiny, loaded = bart_cpu
    reqs = random_text_requests(tiny, loaded.tokenizer, 4, 0)
    assert gc.get_freeze_count() == 0
    seen = []

    def source():
        for r in reqs:
            seen.append(gc.get_freeze_count())
            yield r

    a, b = Engine(loaded, max_num_seqs=2), Engine(loaded, max_num_seqs=2)
    first = a.generate(source())
    got = [next(first)]
    assert gc.get_freeze_count() > 0  # suspended mid-run: still frozen
    got += list(b.generate(reqs[:2]))  # a second run inside the first ends: the first's freeze holds
    assert gc.get_freeze_count() > 0
    got += list(first)
    assert gc.get_freeze_count() == 0
    assert seen and all(n > 0 for n in seen)
    assert len(got) == 6 and not any(r.error for r in got)

    stopped = a.generate(reqs)  # a run abandoned part-way unfreezes when it is closed
    next(stopped)
    assert gc.get_freeze_count() > 0
    stopped.close()
    assert gc.get_freeze_count() == 0
