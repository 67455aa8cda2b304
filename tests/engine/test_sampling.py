"""Logits rules: the incremental no-repeat-n-gram index equals the full scan."""

import random

import pytest
import torch

from encdec_cli.engine.sampling import banned_ngram_tokens, banned_ngram_tokens_cached


class _Seq:
    def __init__(self):
        self.tokens = []


def test_cached_ngram_bans_match_full_scan_as_sequences_grow_and_fork():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 4)
        seqs = [_Seq()]
        for _ in range(40):
            for s in seqs:
                assert sorted(banned_ngram_tokens_cached(s, n)) == sorted(banned_ngram_tokens(s.tokens, n))
                s.tokens.append(rng.randint(0, 4))
            if rng.random() < 0.2:  # a beam fork: a new sequence object with a copy of the tokens
                child = _Seq()
                child.tokens = list(rng.choice(seqs).tokens)
                seqs.append(child)


def test_forked_sequences_carry_a_copy_of_the_ngram_index():
    """Sequence.fork copies the parent's index (no re-scan); parent and child then diverge."""
    from encdec_cli.engine.sequence import Sequence

    rng = random.Random(1)
    for n in (1, 2, 3, 4):
        seqs = [Sequence(None, [rng.randint(0, 4) for _ in range(rng.randint(0, 3))], 1)]
        for _ in range(60):
            for s in seqs:
                assert sorted(banned_ngram_tokens_cached(s, n)) == sorted(banned_ngram_tokens(s.tokens, n))
            if rng.random() < 0.3 and len(seqs) < 8:
                parent = rng.choice(seqs)
                child = parent.fork()
                assert parent.ngrams is None or (
                    child.ngrams is not parent.ngrams and child.ngrams.following == parent.ngrams.following
                )
                seqs.append(child)
            for s in seqs:
                s.tokens.append(rng.randint(0, 4))


def test_repetition_penalty_batched_over_rows_matches_transformers():
    """Rows of two penalties and one without, in one step: each row equals transformers'
    RepetitionPenaltyLogitsProcessor on that row alone (tokens seen, prompt included)."""
    import torch
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    from encdec_cli.engine.sampling import process_logits
    from encdec_cli.engine.sequence import Request, SamplingParams, SequenceGroup

    g = torch.Generator().manual_seed(0)
    params = [
        SamplingParams(repetition_penalty=1.3),
        SamplingParams(repetition_penalty=0.7),
        SamplingParams(),
    ]
    histories = [[2, 5, 5, 9], [2, 7, 3, 7, 1], [2, 4, 4], [2, 9, 11]]
    seqs = []
    for i, hist in enumerate(histories):
        p = params[[0, 1, 2, 0][i]]
        group = SequenceGroup(Request(None, hist[:1], p, i), 1, 8, i)
        group.seqs[0].tokens = list(hist)
        seqs.append(group.seqs[0])
    logits = torch.randn(len(seqs), 16, generator=g)
    ours = process_logits(logits.clone(), seqs)
    for i, (s, hist) in enumerate(zip(seqs, histories, strict=True)):
        pen = s.group.params.repetition_penalty
        want = logits[i : i + 1].clone()
        if pen != 1.0:
            want = RepetitionPenaltyLogitsProcessor(pen)(torch.tensor([hist]), want)
        assert torch.equal(ours[i], want[0]), i


def test_count_rules_on_few_rows_match_the_vectorised_path(monkeypatch):
    """The few-row path of the count-based rules (Python, row runs, ``sampling.FEW_ROWS``) gives the
    same logits as the vectorised one: suppress / allowed lists, begin suppression, min length and
    forced tokens, mixed SamplingParams, verification rows seen with drafts (``drafted``,
    ``generated``) and without."""
    import numpy as np
    import torch

    from encdec_cli.engine import sampling
    from encdec_cli.engine.sequence import Request, SamplingParams, SequenceGroup

    rng = random.Random(3)
    vocab = 24
    for trial in range(150):
        params = []
        for _ in range(rng.randint(1, 3)):
            kw = {}
            if rng.random() < 0.5:
                kw["suppress_tokens"] = tuple(rng.sample(range(vocab), rng.randint(1, 3)))
            if rng.random() < 0.4:
                kw["begin_suppress_tokens"] = tuple(rng.sample(range(vocab), rng.randint(1, 2)))
                kw["begin_index"] = rng.randint(0, 2)
            if rng.random() < 0.6:
                kw["stop_token_ids"] = tuple(rng.sample(range(vocab), rng.randint(1, 2)))
                kw["min_new_tokens"] = rng.randint(0, 6)
            if rng.random() < 0.3:
                kw["allowed_tokens"] = tuple(rng.sample(range(vocab), rng.randint(2, 8)))
            if rng.random() < 0.3:
                kw["forced_tokens"] = tuple((rng.randint(0, 4), rng.randrange(vocab)) for _ in range(2))
            params.append(SamplingParams(**kw))
        seqs = []
        for i in range(rng.randint(1, 4)):
            group = SequenceGroup(Request(None, [1], rng.choice(params), i), 1, 16, i)
            group.seqs[0].tokens = [1] + [rng.randrange(vocab) for _ in range(rng.randint(0, 4))]
            seqs.append(group.seqs[0])
        drafted = generated = None
        rows = seqs
        if trial % 2:  # verification rows: each sequence seen with 0..k drafts
            rows, d = [], []
            for s in seqs:
                k = rng.randint(0, 3)
                rows += [s] * (k + 1)
                d += range(k + 1)
            drafted = np.asarray(d, np.int64)
            generated = np.asarray([s.num_generated for s in rows], np.int64) + drafted
        logits = torch.randn(len(rows), vocab, generator=torch.Generator().manual_seed(trial))
        assert len(rows) <= sampling.FEW_ROWS
        few = sampling.process_logits(logits.clone(), rows, None, drafted, None, generated)
        monkeypatch.setattr(sampling, "FEW_ROWS", 0)
        wide = sampling.process_logits(logits.clone(), rows, None, drafted, None, generated)
        monkeypatch.undo()
        assert torch.equal(few, wide), trial


def test_batched_ngram_bans_match_full_scan():
    """``ngram_bans`` (every row of a step at once, the index updates inlined) gives each row the
    full scan's bans, as sequences grow and fork, for n = 1..4."""
    from encdec_cli.engine.sampling import ngram_bans
    from encdec_cli.engine.sequence import Sequence

    rng = random.Random(2)
    for n in (1, 2, 3, 4):
        seqs = [Sequence(None, [rng.randint(0, 4) for _ in range(rng.randint(1, 3))], 1)]
        for _ in range(60):
            out, counts = [], []
            ngram_bans(seqs, n, out, counts)
            assert len(counts) == len(seqs) and sum(counts) == len(out)
            start = 0
            for s, c in zip(seqs, counts):
                assert sorted(out[start : start + c]) == sorted(banned_ngram_tokens(s.tokens, n))
                start += c
            if rng.random() < 0.3 and len(seqs) < 8:
                seqs.append(rng.choice(seqs).fork())
            for s in seqs:
                s.tokens.append(rng.randint(0, 4))


def test_token_fields_given_as_lists_become_tuples_and_a_job_runs(tiny_text_model):
    """SamplingParams takes lists for its token fields, as users write them: they become tuples,
    so the params stay hashable (before: a job with min_new_tokens, whose rule is keyed on the stop
    tokens, failed with "unhashable type: 'list'") and give the tokens of the same params as tuples."""
    from encdec_cli.engine import Engine, Request, SamplingParams
    from tests.support.text_models import random_words, source_ids, vocabulary

    tiny = tiny_text_model("bart")
    eos = vocabulary(tiny.name)["</s>"]
    common = dict(max_new_tokens=8, min_new_tokens=3)
    as_lists = SamplingParams(
        **common, stop_token_ids=[eos], suppress_tokens=[5, 6], forced_tokens=[[0, 7]], bad_words_ids=[[8, 9]]
    )
    as_tuples = SamplingParams(
        **common,
        stop_token_ids=(eos,),
        suppress_tokens=(5, 6),
        forced_tokens=((0, 7),),
        bad_words_ids=((8, 9),),
    )
    assert as_lists == as_tuples and hash(as_lists) == hash(as_tuples)
    assert isinstance(as_lists.forced_tokens[0], tuple)
    rng = random.Random(2)
    sources = [source_ids(tiny.name, random_words(rng, rng.randint(2, 9))) for _ in range(6)]
    engine = Engine(str(tiny.path), device="cpu", dtype="float32")

    def run(params):
        results = list(
            engine.generate(
                Request(s, [tiny.decoder_start_token_id], params, i) for i, s in enumerate(sources)
            )
        )
        assert all(r.error is None for r in results), [r.error for r in results]
        return {r.request_id: r.token_ids for r in results}

    got = run(as_lists)
    assert got == run(as_tuples)
    assert all(len(t) >= 3 and t[0] == 7 for t in got.values()), got


@pytest.mark.parametrize("subset", [False, True], ids=["all-rows", "some-rows"])
def test_ngram_bans_on_device_match_full_scan(subset):
    """``ngram_bans_on_device`` (a beam step launched ahead: the rows' tokens on the device) bans
    exactly the full scan's tokens, rows of every length (shorter than n too) in one buffer, each
    token banned once or through several n-gram starts, other logits untouched."""
    from encdec_cli.engine.sampling import History, ngram_bans_on_device

    rng = random.Random(5)
    vocab, width = 6, 40
    for n in (1, 2, 3, 4):
        rows = [[rng.randint(0, vocab - 1) for _ in range(rng.randint(1, width))] for _ in range(12)]
        tokens = torch.full((len(rows), width), -1, dtype=torch.long)
        for i, r in enumerate(rows):
            tokens[i, : len(r)] = torch.tensor(r)
        history = History(tokens, torch.tensor([len(r) for r in rows], dtype=torch.int32))
        logits = torch.randn(len(rows), vocab)
        before = logits.clone()
        chosen = [i for i in range(len(rows)) if i % 3 != 1] if subset else list(range(len(rows)))
        ngram_bans_on_device(logits, history, chosen, n)
        for i, r in enumerate(rows):
            want = set(banned_ngram_tokens(r, n)) if i in chosen else set()
            assert set(torch.isinf(logits[i]).nonzero()[:, 0].tolist()) == want, (n, i)
            keep = ~torch.isinf(logits[i])
            assert torch.equal(logits[i][keep], before[i][keep])
        assert any(banned_ngram_tokens(r, n) for r in rows)  # not vacuous
