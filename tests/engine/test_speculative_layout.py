"""The verification step's input layout (``ModelRunner.verify_layout``), numpy over all sequences
(Python lists for a few): equal to the per-sequence construction it replaced, packed (the eager
path) and in q rows a sequence with the real inputs last (the verification CUDA graphs, tests/gpu
for the graphs)."""

from __future__ import annotations

import functools
import random
from types import SimpleNamespace

import numpy as np
import pytest

from encdec_cli.engine.runner import FEW_SEQS, ModelRunner


def _reference(seqs, drafts, bs, q):
    """Per sequence, as the runner and the graphs built it before: (dest row, token, position,
    slot) of each input, the logits rows, kv lens."""
    out, rows, kv = [], [], []
    at = 0
    for i, (s, d) in enumerate(zip(seqs, drafts)):
        inputs = s.tokens[s.num_cached :] + d
        start, r = s.num_cached, len(inputs)
        end = at + r if q is None else i * q + q
        for j, t in enumerate(inputs):
            p = start + j
            out.append((end - r + j, t, p, s.block_table[p // bs] * bs + p % bs))
        rows.extend(range(end - len(d) - 1, end))
        kv.append(start + r)
        at += r
    return out, rows, kv


@pytest.mark.parametrize("n", [1, 3, 23])  # a few sequences: the Python path (FEW_SEQS); more: numpy
@pytest.mark.parametrize("q", [None, 5, 9])
def test_verify_layout_matches_per_sequence_construction(q, n):
    rng = random.Random(n)
    bs = 4
    tables = np.zeros((n + 3, 16), np.int32)
    seqs, drafts, srows = [], [], []
    for i in range(n):
        length = rng.randint(1, 30)
        uncached = 1 if rng.random() < 0.8 else rng.randint(1, min(3, length))
        d = [rng.randrange(1000) for _ in range(rng.randint(0, 4 if q != 5 else 5 - uncached))]
        table = rng.sample(range(500), -(-(length + len(d)) // bs))
        row = n + 2 - i  # rows of the runner's table in another order than the sequences
        tables[row, : len(table)] = table
        seqs.append(
            SimpleNamespace(
                tokens=[rng.randrange(1000) for _ in range(length)],
                num_cached=length - uncached,
                block_table=table,
            )  # fmt: skip
        )
        drafts.append(d)
        srows.append(row)
    runner = SimpleNamespace(block_size=bs, self_tables=tables)
    runner._slots = functools.partial(ModelRunner._slots, runner)
    runner._verify_layout_few = functools.partial(ModelRunner._verify_layout_few, runner)
    assert (n <= FEW_SEQS) == (n < 23)
    lay = ModelRunner.verify_layout(runner, seqs, np.asarray(srows), drafts, q)
    assert all(x.dtype == np.int64 for x in vars(lay).values())
    want, rows, kv = _reference(seqs, drafts, bs, q)
    got = list(zip(lay.dest.tolist(), lay.tokens.tolist(), lay.positions.tolist(), lay.slots.tolist()))
    assert got == want
    assert lay.logits_rows.tolist() == rows and lay.kv_lens.tolist() == kv
    assert lay.start.tolist() == [s.num_cached for s in seqs]


def test_cross_attention_layout_by_default():
    """``absorb_cross`` None: absorbed encoder rows for batched plain decoding where the Hopper
    kernel runs the model; per-layer K/V with speculative decoding (K + 1 queries a sequence),
    which the paged kernel reads once for all of a sequence's queries; an explicit choice stands."""
    from encdec_cli.engine.config import EngineConfig
    from encdec_cli.engine.runner import ABSORB_MIN_SEQS, absorb_by_default

    hopper, elsewhere = (lambda: True), (lambda: False)
    batched = EngineConfig(max_num_seqs=512)
    assert absorb_by_default(batched, 1, hopper)
    assert not absorb_by_default(batched, 5, hopper)  # speculative, K 4
    assert not absorb_by_default(batched, 1, elsewhere)
    assert not absorb_by_default(EngineConfig(max_num_seqs=ABSORB_MIN_SEQS - 1), 1, hopper)
    for queries in (1, 5):
        assert absorb_by_default(EngineConfig(max_num_seqs=512, absorb_cross=True), queries, elsewhere)
        assert not absorb_by_default(EngineConfig(max_num_seqs=512, absorb_cross=False), queries, hopper)
