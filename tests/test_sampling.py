"""Logits rules: the incremental no-repeat-n-gram index equals the full scan."""

import random

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
