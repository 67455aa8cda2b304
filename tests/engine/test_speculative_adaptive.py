"""Adaptive drafting (Speculator, ``EngineConfig.speculative_adaptive``): a sequence whose drafts
keep being rejected drafts fewer, down to none with retries now and then; an accepted draft brings
K back; the greedy output never changes."""

from __future__ import annotations

from encdec_cli.engine import OracleDrafter
from encdec_cli.engine.speculative import (
    BACKOFF_FIRST,
    BACKOFF_MOST,
    COLD,
    GOOD,
    MISSES,
    MISSES_GOOD,
    RECENT,
    Speculator,
)  # fmt: skip
from encdec_models.loading import load_model
from tests.engine.test_speculative import run, text_requests
from tests.support.text_models import single_thread


class _Drafter:
    k = 8


class _Seq:  # what Speculator._want / adapt read of a sequence: nothing but its identity
    pass


def _steps_until_try(spec: Speculator, s) -> int:
    """Engine steps (``tick``) until the sequence may take a draft again; that step's ``_want``."""
    for n in range(1, 10 * BACKOFF_MOST):
        spec.tick()
        k = spec._want(s)
        if k:
            assert k == 1 and spec.clock % spec._adapt[s].backoff == 0  # tries fall on multiples
            return n
    raise AssertionError("no try")


def test_k_halves_after_missed_steps_backs_off_and_comes_back():
    spec, s = Speculator(_Drafter(), blocks=None), _Seq()
    spec.tick()
    assert spec._want(s) == 8
    seen = []
    for _ in range(3 * MISSES):  # every draft rejected: 8 -> 4 -> 2 -> 1 -> 0, MISSES steps each
        spec.tick()
        k = spec._want(s)
        seen.append(k)
        spec.adapt(s, k, 0)
    assert seen == [8] * MISSES + [4] * MISSES + [2] * MISSES
    for _ in range(MISSES):
        spec.tick()
        spec.adapt(s, spec._want(s), 0)
    # none now: no drafts (and drafts_next_step says so) for about BACKOFF_FIRST steps, then one try
    assert not spec.drafts_next_step([s])
    assert BACKOFF_FIRST // 2 < _steps_until_try(spec, s) <= BACKOFF_FIRST * 3 // 2
    wait = BACKOFF_FIRST
    for _ in range(10):  # the try failed: twice as long, never longer than BACKOFF_MOST
        spec.adapt(s, 1, 0)
        wait = min(BACKOFF_MOST, wait * 2)
        assert wait // 2 < _steps_until_try(spec, s) <= wait * 3 // 2
    spec.adapt(s, 1, 1)  # accepted: K doubles from one try
    spec.tick()
    assert spec._want(s) == 2 and spec.drafts_next_step([s])
    spec.adapt(s, 2, 1)
    spec.adapt(s, spec._want(s), 2)
    assert spec._want(s) == 8  # back at K
    spec.adapt(s, 8, 0)  # a single missed step keeps K
    assert spec._want(s) == 8
    fixed = Speculator(_Drafter(), blocks=None, adaptive=False)
    for _ in range(20):
        fixed.tick()
        assert fixed._want(s) == 8 and fixed.drafts_next_step([s])
        fixed.adapt(s, 8, 0)


def _misses_until_halved(history: list[int]) -> int:
    """Steps with every draft rejected (after steps that accepted ``history[i]`` of 8 drafts, K
    kept at 8 by an accepted draft last) that a sequence takes before its K halves."""
    spec, s = Speculator(_Drafter(), blocks=None), _Seq()
    spec.tick()
    for accepted in history:
        spec.adapt(s, spec._want(s), accepted)
    assert spec._want(s) == 8
    for n in range(1, 10):
        spec.adapt(s, 8, 0)
        if spec._want(s) < 8:
            return n
    raise AssertionError("K never halved")


def test_k_halves_after_more_misses_where_first_drafts_were_mostly_accepted():
    """At a draft acceptance of 0.7 a step's first draft fails 30% of the time: two such steps in a
    row are too common to mean bad drafts. Where the sequence's first drafts were accepted at least
    GOOD of the time before, K halves after MISSES_GOOD; otherwise (new, or mostly wrong) after
    MISSES. Another sequence's record does not count."""
    assert MISSES_GOOD > MISSES and GOOD == 0.5
    assert _misses_until_halved([]) == MISSES  # no record yet
    assert _misses_until_halved([3]) == MISSES_GOOD
    assert _misses_until_halved([2, 0, 1, 0, 4]) == MISSES_GOOD  # 3 of 5
    assert _misses_until_halved([0, 0, 1, 0, 4]) == MISSES  # 2 of 5
    spec, good, new = Speculator(_Drafter(), blocks=None), _Seq(), _Seq()
    spec.tick()
    for _ in range(5):
        spec.adapt(good, spec._want(good), 4)
    spec._want(new)
    for _ in range(MISSES):
        spec.adapt(new, 8, 0)
    assert spec._want(new) == 4 and spec._want(good) == 8


def test_sequences_backing_off_try_on_the_same_steps():
    """Sequences whose tries fail on different steps with the same wait try again on multiples of
    it: 5 sequences failing on 5 consecutive steps try on at most 2 steps, not 5, so the steps
    between have no drafts at all (plain steps, which the engine may run ahead)."""
    spec = Speculator(_Drafter(), blocks=None)
    seqs = [_Seq() for _ in range(5)]
    for s in seqs:
        spec._want(s)
        spec._adapt[s].k = 1
        for _ in range(MISSES):
            spec.adapt(s, 1, 0)  # then backing off, BACKOFF_FIRST
    for _ in range(4):
        for s in seqs:  # a failed try each, on consecutive steps: the same (doubled) wait for all
            spec.tick()
            spec.adapt(s, 1, 0)
        wait = spec._adapt[seqs[0]].backoff
        tries: dict[int, list] = {}
        for _ in range(3 * BACKOFF_MOST):
            spec.tick()
            for s in seqs:
                if s not in sum(tries.values(), []) and spec._want(s):
                    tries.setdefault(spec.clock, []).append(s)
            if len(sum(tries.values(), [])) == len(seqs):
                break
        assert len(sum(tries.values(), [])) == len(seqs)
        assert len(tries) <= 2 and all(c % wait == 0 for c in tries), (wait, tries)


def test_new_sequences_start_backed_off_while_the_engines_drafts_are_rejected():
    """After RECENT verified sequence-steps whose drafts were (almost) all rejected, a new sequence
    takes no drafts at first and tries on the steps that are multiples of BACKOFF_MOST, where the
    others try; once drafts are accepted again, new sequences start at K."""
    spec = Speculator(_Drafter(), blocks=None)
    old = [_Seq() for _ in range(RECENT)]
    spec.tick()
    for s in old:
        assert spec._want(s) == 8 and not spec.cold  # no evidence yet: K
        spec.adapt(s, 8, 0)
    assert spec.cold and spec.recent < COLD
    new = _Seq()
    spec.tick()
    assert spec._want(new) == 0 and not spec.drafts_next_step([new])
    assert BACKOFF_MOST // 2 <= _steps_until_try(spec, new) <= BACKOFF_MOST * 3 // 2
    for s in old:  # accepted drafts: the recent share climbs over COLD
        spec.adapt(s, 8, 4)
    assert not spec.cold
    spec.tick()
    assert spec._want(_Seq()) == 8
    fixed = Speculator(_Drafter(), blocks=None, adaptive=False)
    for s in old:
        fixed.adapt(s, 8, 0)
    assert not fixed.cold and fixed._want(_Seq()) == 8


def test_a_new_drafter_starts_afresh():
    """What adaptive drafting learnt of one drafter says nothing of the next (``Engine.set_drafter``:
    the bench's oracle sweep runs alpha 0, then 0.7, on one engine): a cold engine is warm again and
    a backed-off sequence drafts K again."""
    spec = Speculator(_Drafter(), blocks=None)
    seqs = [_Seq() for _ in range(RECENT)]
    spec.tick()
    for _ in range(3 * MISSES_GOOD):
        for s in seqs:
            spec.adapt(s, spec._want(s) or 1, 0)
    assert spec.cold and spec._want(seqs[0]) == 0 and spec._want(_Seq()) == 0
    spec.set_drafter(_Drafter())
    assert not spec.cold
    assert spec._want(seqs[0]) == 8 and spec._want(_Seq()) == 8


def _verification_steps(accept: float, arrive: int = 8, arriving_steps: int = 48, life: int = 150):
    """A W1-shaped run at the Speculator's level: ``arrive`` sequences join a step for
    ``arriving_steps`` steps (encoder runs spread over many steps), each lives ``life`` steps and
    takes drafts whose each token is accepted with probability ``accept`` -> (steps in which some
    sequence takes drafts, steps)."""
    import random

    rng, spec = random.Random(0), Speculator(_Drafter(), blocks=None)
    live: list[tuple[_Seq, int]] = []
    verifying = steps = 0
    for step in range(arriving_steps + life):
        spec.tick()
        if step < arriving_steps:
            live += [(_Seq(), step + life) for _ in range(arrive)]
        live = [(s, end) for s, end in live if end > step]
        if not live:
            break
        steps += 1
        wants = [(s, spec._want(s)) for s, _ in live]
        verifying += any(k for _, k in wants)
        for s, k in wants:
            if k:
                accepted = next((i for i in range(k) if rng.random() >= accept), k)
                spec.adapt(s, k, accepted)
    return verifying, steps


def test_newcomers_do_not_make_every_step_a_verification_step_at_alpha_zero():
    """W1 at alpha 0 on an H100 ran verification shapes in 115 of 252 steps (0.69x), as requests
    kept arriving at K drafts; at this level that was 60 of 197 steps, now 18."""
    verifying, steps = _verification_steps(accept=0.0)
    assert verifying <= 0.12 * steps
    verifying, steps = _verification_steps(accept=0.7)  # drafts pay: every step verifies
    assert verifying == steps


def test_adaptive_drafts_less_at_alpha_zero_with_the_same_output(tiny_text_model):
    tiny = tiny_text_model("bart")
    loaded = load_model(tiny.path, device="cpu", dtype="float32")
    reqs = text_requests(tiny, loaded.tokenizer, n=16)
    with single_thread():
        _, want, _ = run(loaded, reqs)
        recorded = {rid: toks for rid, (toks, _, _) in want.items()}
        drafts, ahead = {}, {}
        for adaptive in (False, True):
            oracle = OracleDrafter(recorded, 0.0, 4, loaded.model.vocab_size, seed=1)
            engine, got, _ = run(loaded, reqs, drafter=oracle, speculative_adaptive=adaptive)
            assert got == want, adaptive
            assert engine.stats.accepted_tokens == 0
            drafts[adaptive] = engine.stats.draft_tokens
            ahead[adaptive] = engine.stats.ahead_steps
    assert 0 < drafts[True] < 0.75 * drafts[False]  # short requests (4-20 tokens): 185 of 300
    # every row backed off: plain steps between the tries, launched ahead (with fixed K the
    # oracle's verification steps run ahead too: tests/engine/test_speculative_ahead.py)
    assert ahead[True] > 0
