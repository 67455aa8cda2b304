"""Pure-Python tests of automatic prefix caching: keys, hash chains, reference counts, the LRU of
cached free blocks (engine/prefix_cache.py and its use in the BlockManager; no model)."""

import numpy as np
import pytest
import torch

from encdec_cli.engine.block_manager import BlockManager, OutOfBlocks
from encdec_cli.engine.prefix_cache import PrefixCache, block_hash, encoder_key, prompt_block_hashes

SALT = b"model"


def test_encoder_key_is_a_content_hash():
    wave = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    key = encoder_key(wave, SALT)
    assert key == encoder_key(wave.copy(), SALT)  # same content, another array
    assert key == encoder_key(wave[::-1].copy()[::-1], SALT)  # non-contiguous view of it
    assert key != encoder_key(wave.astype(np.float64), SALT)  # the dtype counts
    assert key != encoder_key(wave, b"other model")  # the salt counts
    changed = wave.copy()
    changed[500] += 1e-6
    assert key != encoder_key(changed, SALT)
    assert key != encoder_key(wave.reshape(10, 100), SALT)  # the shape counts
    assert encoder_key(torch.from_numpy(wave), SALT) == encoder_key(torch.from_numpy(wave.copy()), SALT)
    assert encoder_key(torch.ones(4, dtype=torch.bfloat16), SALT) is not None
    ids = [5, 9, 2]
    assert encoder_key(ids, SALT) == encoder_key(np.array(ids, np.int64), SALT)
    assert encoder_key(ids, SALT) != encoder_key([5, 9, 3], SALT)
    for uncacheable in ("text", [[1, 2], [3]], object(), np.array(["a"])):
        assert encoder_key(uncacheable, SALT) is None


def test_hash_chain():
    enc, other = encoder_key([1, 2, 3], SALT), encoder_key([1, 2, 4], SALT)
    toks = list(range(10))
    chain = prompt_block_hashes(enc, toks, 4)
    assert len(chain) == 2  # full blocks only
    assert chain[0] == block_hash(enc, toks[:4]) and chain[1] == block_hash(chain[0], toks[4:8])
    assert prompt_block_hashes(enc, toks[:8], 4) == chain  # a prefix's chain is the chain's prefix
    assert prompt_block_hashes(other, toks, 4)[0] != chain[0]  # another encoder input: other K/V
    changed = prompt_block_hashes(enc, [99] + toks[1:], 4)
    assert changed[0] != chain[0] and changed[1] != chain[1]  # a block's key covers its whole prefix


def test_cross_entry_shared_then_kept_free_then_revived():
    bm = BlockManager(8, 4, cache=PrefixCache())
    key = encoder_key([1, 2, 3], SALT)
    a, hit = bm.acquire_cross(key, 3)
    assert not hit and bm.num_free == 5
    b, hit = bm.acquire_cross(key, 3)  # a twin in the same step: shares the blocks being written
    assert hit and b == a and all(bm.refs[x] == 2 for x in a) and bm.num_free == 5
    bm.commit_cached()
    bm.free(a)
    bm.free(b)
    assert bm.num_free == 8 and len(bm.cache.evictable) == 3  # free, content kept
    c, hit = bm.acquire_cross(key, 3)  # the last user finished; a later request still hits
    assert hit and c == a and bm.num_free == 5 and not bm.cache.evictable
    counters = bm.cache.counters
    assert (counters.hits, counters.misses, counters.evictions) == (2, 1, 0)


def test_lru_eviction_only_when_needed_and_never_in_use():
    bm = BlockManager(6, 4, cache=PrefixCache())
    keys = [encoder_key([i], SALT) for i in range(3)]
    held = [bm.acquire_cross(k, 2)[0] for k in keys]  # the pool is full
    bm.commit_cached()
    with pytest.raises(OutOfBlocks):
        bm.allocate(1)  # blocks in use are never evicted
    bm.free(held[1])
    bm.free(held[0])  # entry 1 is the least recently freed, then entry 0
    assert bm.num_free == 4
    new = bm.allocate(1)  # no plain free block: evicts the LRU entry (1), whole
    assert new[0] in held[1] and bm.cache.lookup(keys[1]) is None
    assert bm.cache.counters.evictions == 1 and bm.num_free == 3
    assert bm.acquire_cross(keys[0], 2) == (held[0], True)  # still cached
    assert bm.acquire_cross(keys[2], 2) == (held[2], True)  # in use all along
    with pytest.raises(OutOfBlocks):
        bm.acquire_cross(keys[1], 2)  # evicted, and no room to encode it again
    bm.free(new)
    again, hit = bm.acquire_cross(keys[1], 2)  # a miss: encoded again
    assert not hit and bm.cache.counters.misses == 4 and bm.num_free == 0


def test_plain_free_blocks_go_before_cached_ones():
    bm = BlockManager(6, 4, cache=PrefixCache())
    key = encoder_key([7], SALT)
    cached, _ = bm.acquire_cross(key, 2)
    bm.commit_cached()
    bm.free(cached)
    other = bm.allocate(4)
    assert not set(other) & set(cached) and bm.cache.lookup(key) == cached


def test_decoder_prefix_blocks():
    bm = BlockManager(32, 4, cache=PrefixCache())
    enc = encoder_key([1, 2], SALT)
    prompt = list(range(100, 111))  # 11 tokens: two full blocks
    t1, cached = bm.acquire_prompt(enc, prompt, len(prompt))
    assert cached == 0 and len(t1) == 3
    t2, cached = bm.acquire_prompt(enc, prompt, len(prompt))
    assert cached == 0 and not set(t1) & set(t2)  # pending (not written yet): no sharing
    bm.commit_cached()
    t3, cached = bm.acquire_prompt(enc, prompt, len(prompt))
    assert cached == 8 and t3[:2] == t1[:2] and t3[2] != t1[2]
    assert bm.refs[t1[0]] == 2 and bm.cache.counters.prompt_tokens_saved == 8
    # diverging in the second block: only the first is shared
    t4, cached = bm.acquire_prompt(enc, prompt[:5] + [1] + prompt[6:], len(prompt))
    assert cached == 4 and t4[0] == t1[0] and t4[1] != t1[1]
    # another encoder input: nothing shared
    assert bm.acquire_prompt(encoder_key([3], SALT), prompt, len(prompt))[1] == 0
    # the last token is always computed: a prompt of exactly two blocks reuses one
    t5, cached = bm.acquire_prompt(enc, prompt[:8], 8)
    assert cached == 4 and t5[0] == t1[0] and t5[1] != t1[1]
    # a shared block is copied on write (as for beams), here a write into the cached block 1
    copies = bm.prepare_write(t3, 7, 9)
    assert copies == [(t1[1], t3[1])] and bm.cache.lookup(prompt_block_hashes(enc, prompt, 4)[1]) == [t1[1]]


def test_pending_entries_dropped_when_the_step_fails():
    bm = BlockManager(8, 4, cache=PrefixCache())
    key = encoder_key([1], SALT)
    blocks, _ = bm.acquire_cross(key, 2)
    table, _ = bm.acquire_prompt(key, list(range(9)), 9)
    bm.drop_pending()  # e.g. out of device memory: nothing was written
    bm.free(blocks)
    bm.free(table)
    assert len(bm.cache) == 0 and not bm.cache.evictable and bm.num_free == 8
    assert bm.acquire_cross(key, 2)[1] is False


def test_without_a_cache_nothing_is_shared():
    bm = BlockManager(8, 4)
    key = encoder_key([1], SALT)
    a, hit = bm.acquire_cross(key, 2)
    b, hit2 = bm.acquire_cross(key, 2)
    assert not hit and not hit2 and not set(a) & set(b)
    t, cached = bm.acquire_prompt(key, list(range(9)), 9)
    assert cached == 0 and len(t) == 3
    bm.free(a + b + t)
    assert bm.num_free == 8
