"""Pure-Python tests of the KV block pool (no tensors)."""

import pytest

from encdec_cli.engine.block_manager import BlockManager, OutOfBlocks


def test_allocate_free_refcount():
    bm = BlockManager(8, 4)
    a = bm.allocate(3)
    assert bm.num_free == 5
    shared = bm.share(a)
    bm.free(a)
    assert bm.num_free == 5  # still referenced by the fork
    bm.free(shared)
    assert bm.num_free == 8
    with pytest.raises(OutOfBlocks):
        bm.allocate(9)
    with pytest.raises(RuntimeError):
        bm.free([0])


def test_prepare_write_appends_and_copies_on_write():
    bm = BlockManager(10, 4)
    table = bm.allocate(2)  # positions 0..7; 6 tokens cached
    fork = bm.share(table)
    copies = bm.prepare_write(fork, 6, 7)  # writes into the shared second block
    assert copies == [(table[1], fork[1])] and fork[0] == table[0] and fork[1] != table[1]
    assert bm.refs[table[0]] == 2 and bm.refs[table[1]] == 1
    copies = bm.prepare_write(fork, 7, 9)  # block 1 is private now; needs one new block
    assert copies == [] and len(fork) == 3
    free_before = bm.num_free
    with pytest.raises(OutOfBlocks):
        bm.prepare_write(fork, 9, 9 + 4 * (free_before + 1))
    assert bm.num_free == free_before and len(fork) == 3  # all-or-nothing


def test_decode_inputs_match_the_per_row_rule():
    """The CUDA-graph step's input arrays (``cuda_graphs.decode_inputs``, whole-array numpy) hold
    for each sequence its last token, its position, that position's cache slot, its key count and
    encoder length: the per-row rule, for steps run in turn and run ahead."""
    import random

    import numpy as np

    from encdec_cli.engine.cuda_graphs import decode_inputs

    class _Group:
        def __init__(self, encoder_len):
            self.encoder_len = encoder_len

    class _Seq:
        def __init__(self, rng, bs):
            self.tokens = [rng.randrange(1000) for _ in range(rng.randint(1, 40))]
            self.block_table = rng.sample(range(500), len(self.tokens) // bs + 2)
            self.group = _Group(rng.randint(1, 300))

    rng = random.Random(0)
    for bs in (1, 4, 16):
        for ahead in (False, True):
            seqs = [_Seq(rng, bs) for _ in range(rng.randint(1, 20))]
            arrays = [np.full(24, -7, np.int64) for _ in range(5)]
            decode_inputs(seqs, ahead, bs, *arrays)
            tok, pos, slot, lens, clens = arrays
            for i, s in enumerate(seqs):
                p = len(s.tokens) - (not ahead)
                assert (tok[i], pos[i], lens[i], clens[i]) == (s.tokens[-1], p, p + 1, s.group.encoder_len)
                assert slot[i] == s.block_table[p // bs] * bs + p % bs
            assert all((a[len(seqs) :] == -7).all() for a in arrays)  # nothing past the sequences
