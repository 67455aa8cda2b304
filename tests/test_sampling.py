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
