"""Adaptive drafting (Speculator, ``EngineConfig.speculative_adaptive``): a sequence whose drafts
keep being rejected drafts fewer, down to none with retries now and then; an accepted draft brings
K back; the greedy output never changes."""

from __future__ import annotations

from encdec_cli.engine import OracleDrafter
from encdec_cli.engine.speculative import BACKOFF_FIRST, BACKOFF_MOST, MISSES, Speculator
from encdec_models.loading import load_model
from tests.engine.test_speculative import run, text_requests
from tests.support.text_models import single_thread


class _Drafter:
    k = 8


class _Seq:  # what Speculator._want / adapt read of a sequence: nothing but its identity
    pass


def test_k_halves_after_missed_steps_backs_off_and_comes_back():
    spec, s = Speculator(_Drafter(), blocks=None), _Seq()
    assert spec._want(s) == 8
    seen = []
    for _ in range(3 * MISSES):  # every draft rejected: 8 -> 4 -> 2 -> 1 -> 0, MISSES steps each
        k = spec._want(s)
        seen.append(k)
        spec.adapt(s, k, 0)
    assert seen == [8] * MISSES + [4] * MISSES + [2] * MISSES
    for _ in range(MISSES):
        spec.adapt(s, spec._want(s), 0)
    # none now: BACKOFF_FIRST - 1 steps without drafts, then one try
    assert [spec._want(s) for _ in range(BACKOFF_FIRST)] == [0] * (BACKOFF_FIRST - 1) + [1]
    spec.adapt(s, 1, 0)  # the try failed: twice as long
    assert [spec._want(s) for _ in range(2 * BACKOFF_FIRST)] == [0] * (2 * BACKOFF_FIRST - 1) + [1]
    wait = 2 * BACKOFF_FIRST
    for _ in range(10):  # never longer than BACKOFF_MOST
        spec.adapt(s, 1, 0)
        wait = min(BACKOFF_MOST, wait * 2)
        got = [spec._want(s) for _ in range(wait)]
        assert got == [0] * (wait - 1) + [1]
    spec.adapt(s, 1, 1)  # accepted: K doubles from one try
    assert spec._want(s) == 2
    spec.adapt(s, 2, 1)
    spec.adapt(s, spec._want(s), 2)
    assert spec._want(s) == 8  # back at K
    spec.adapt(s, 8, 0)  # a single missed step keeps K
    assert spec._want(s) == 8
    fixed = Speculator(_Drafter(), blocks=None, adaptive=False)
    for _ in range(20):
        assert fixed._want(s) == 8
        fixed.adapt(s, 8, 0)


def test_adaptive_drafts_less_at_alpha_zero_with_the_same_output(tiny_text_model):
    tiny = tiny_text_model("bart")
    loaded = load_model(tiny.path, device="cpu", dtype="float32")
    reqs = text_requests(tiny, loaded.tokenizer, n=16)
    with single_thread():
        _, want, _ = run(loaded, reqs)
        recorded = {rid: toks for rid, (toks, _, _) in want.items()}
        drafts = {}
        for adaptive in (False, True):
            oracle = OracleDrafter(recorded, 0.0, 4, loaded.model.vocab_size, seed=1)
            engine, got, _ = run(loaded, reqs, drafter=oracle, speculative_adaptive=adaptive)
            assert got == want, adaptive
            assert engine.stats.accepted_tokens == 0
            drafts[adaptive] = engine.stats.draft_tokens
    assert 0 < drafts[True] < 0.75 * drafts[False]  # short requests (4-20 tokens): 185 of 300
