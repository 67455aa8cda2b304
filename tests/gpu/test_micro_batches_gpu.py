"""Two micro-batches on CUDA with graphs on (``EngineConfig.micro_batches``): beam search and seeded
sampling give the results of whole steps (tokens and finish reasons identical, scores up to
float32 rounding, as on the CPU: tests/engine/test_micro_batches.py), and a cohort's launch (its
logits rules, beam candidates, copies to pinned memory) never waits for the GPU, so the other
cohort's step is still running when the host turns to its bookkeeping."""

from __future__ import annotations

import pytest
import torch

from encdec_cli.engine import Engine
from tests.engine.test_micro_batches import BEAM, SAMPLED, assert_same, text_requests

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _run(loaded, reqs, micro_batches, check_sync=False, **cfg):
    engine = Engine(loaded, micro_batches=micro_batches, **{"max_num_seqs": 32, "num_blocks": 3000, **cfg})
    assert engine.uses_cuda_graphs
    checked = 0
    if check_sync:
        launch = engine.sampler.launch

        def checked_launch(logits, seqs):
            nonlocal checked
            if engine._pending is None:  # no other cohort's step in flight: nothing to overlap
                return launch(logits, seqs)
            checked += 1
            torch.cuda.set_sync_debug_mode("error")  # a sync here would idle the GPU
            try:
                return launch(logits, seqs)
            finally:
                torch.cuda.set_sync_debug_mode("default")

        engine.sampler.launch = checked_launch
    out = {}
    for r in engine.generate(reqs):
        assert r.error is None, r.error
        out[r.request_id] = [(c.token_ids, c.finish_reason, c.score, c.logprobs) for c in r.completions]
    assert sorted(out) == sorted(r.request_id for r in reqs)
    assert engine.blocks.num_free == engine.blocks.num_blocks
    return engine, out, checked


@pytest.mark.parametrize("params", [BEAM, SAMPLED], ids=["beam", "sampled"])
@pytest.mark.parametrize("num_blocks", [3000, 60], ids=["pool", "preemption"])
def test_micro_batches_match_whole_steps_with_graphs(tiny_text_model, params, num_blocks):
    from encdec_models.loading import load_model

    tiny = tiny_text_model("bart")
    loaded = load_model(tiny.path, device="cuda", dtype="float32")
    reqs = text_requests(tiny, loaded.tokenizer, 40, **params)
    whole, want, _ = _run(loaded, reqs, 1, block_size=4, num_blocks=num_blocks)
    split, got, checked = _run(
        loaded, reqs, 2, check_sync=params is BEAM, block_size=4, num_blocks=num_blocks
    )
    assert_same(got, want)
    assert whole.stats.micro_batch_steps == 0 and split.stats.micro_batch_steps >= 10
    assert split.runner.graphs.replays > 0
    if params is BEAM:
        assert checked >= 10


def test_auto_turns_micro_batches_on_for_cuda(tiny_text_model):
    from encdec_models.loading import load_model

    tiny = tiny_text_model("bart")
    loaded = load_model(tiny.path, device="cuda", dtype="float32")
    assert Engine(loaded, max_num_seqs=8, num_blocks=200).micro_batches == 2
    assert Engine(loaded, max_num_seqs=8, num_blocks=200, micro_batches=1).micro_batches == 1
