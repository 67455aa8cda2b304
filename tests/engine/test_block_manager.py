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
