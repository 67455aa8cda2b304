"""Speculative decoding at batch 1 (one sequence slot): the few-row paths of verification
(``Speculator._verify_few``: ``_launch_few`` and ``_finish_few``), of the logits rules
(``sampling.FEW_ROWS``) and of the input layout (``runner.FEW_SEQS``) give plain decoding's
tokens, with every count-based rule, with n-gram bans (the general rules path on those rows) and
with log-probabilities (the vectorised verification). CPU, float32."""

from __future__ import annotations

import pytest

from encdec_cli.engine import Engine, OracleDrafter
from encdec_cli.engine.speculative import Speculator
from tests.support.text_models import random_text_requests, single_thread


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


VARIANTS = {
    "min-length": dict(),
    "suppress+begin": dict(suppress_tokens=(7, 9), begin_suppress_tokens=(11, 12)),
    "allowed": dict(allowed_tokens=tuple(range(4, 60))),
    "ngram": dict(no_repeat_ngram_size=2),
    "logprobs": dict(logprobs=True),
}


def _run(loaded, reqs, drafter=None, **cfg):
    engine = Engine(loaded, drafter=drafter, block_size=4, num_blocks=200, max_num_seqs=1, **cfg)
    out = {r.request_id: (r.token_ids, r.finish_reason, r.logprobs) for r in engine.generate(reqs)}
    assert engine.num_free_blocks == engine.num_blocks
    return engine, out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_batch_one_verification_matches_plain(bart_cpu, monkeypatch, variant):
    tiny, loaded = bart_cpu
    params = VARIANTS[variant]
    reqs = random_text_requests(tiny, loaded.tokenizer, 6, 11, (2, 10), (6, 24), (0, 5, 12), **params)
    _, want = _run(loaded, reqs)
    few = []
    original = Speculator._launch_few  # the few-row path's launch (verify_launch takes it)

    def spy(self, logits, seqs, drafts, clock):
        few.append(len(seqs))
        return original(self, logits, seqs, drafts, clock)

    monkeypatch.setattr(Speculator, "_launch_few", spy)
    recorded = {rid: toks for rid, (toks, _, _) in want.items()}
    for kind in ("oracle", "ngram:4"):
        drafter = None
        if kind == "oracle":
            drafter = OracleDrafter(recorded, 0.7, 4, loaded.model.vocab_size, seed=2)
        engine, got = _run(loaded, reqs, drafter, speculative=None if drafter else kind)
        assert {k: v[:2] for k, v in got.items()} == {k: v[:2] for k, v in want.items()}, kind
        if variant == "logprobs":  # the vectorised verification; log-probabilities as plain decoding's
            for rid, (_, _, lps) in got.items():
                assert lps == pytest.approx(want[rid][2], abs=1e-4), (kind, rid)
        if kind == "oracle":
            assert engine.stats.accepted_tokens > 0
    assert bool(few) == (variant != "logprobs") and set(few) <= {1}
