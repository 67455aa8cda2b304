"""Automatic prefix caching for encoder/decoder models. Pure Python bookkeeping (tensors are only
hashed).

Two kinds of cached content live in the BlockManager's pool, addressed by content hashes:

- **Cross entries.** An encoder input's cross-attention blocks (its encoder run, written once),
  keyed by ``encoder_key``: a hash of the input's content (the waveform's samples or log-mel
  values, or the token ids, with their dtype and shape) salted with the model, dtype and cache
  layout. Requests with the same key share the blocks (reference-counted); the encoder runs once.
- **Decoder blocks.** Full self-attention blocks of a decoder prompt, keyed by a hash chain:
  ``block_hash(parent, tokens)`` with the encoder key as the parent of block 0. Decoder K/V
  depends on the encoder output (through cross-attention), so a decoder prefix is only reusable
  for the same encoder input, and the chain starts from the encoder key.

A block whose last reference is dropped keeps its content and its key: it joins ``evictable``
(least recently freed first) and still counts as free. The pool takes plain free blocks first
and evicts the least recently used cached entry only when none is left; a block in use (any
reference) is never evicted. An entry is **pending** from the step that registers it until that
step's model run has written it (``commit``); if the step fails, ``drop_pending`` forgets it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import xxhash


def _digest(*parts: bytes) -> bytes:
    """A 128-bit content hash (xxHash XXH3: ~30 GB/s, so a 30 s window hashes in tens of
    microseconds; collisions between non-adversarial inputs are out of reach, ~2^-64 at 2^32 keys)."""
    h = xxhash.xxh3_128()
    for p in parts:
        h.update(p)
    return h.digest()


def content_bytes(item: Any) -> tuple[bytes, memoryview] | None:
    """What identifies an encoder input: (dtype and shape, the values' bytes) of an array (numpy,
    a host tensor, a list of numbers). None for what cannot be hashed cheaply or safely: a tensor
    on an accelerator (it would have to be read back), anything not an array of numbers."""
    if torch.is_tensor(item):
        if item.device.type != "cpu":
            return None
        t = item.detach().contiguous()
        return f"{t.dtype}{tuple(t.shape)}".encode(), memoryview(t.reshape(-1).view(torch.uint8).numpy())
    if isinstance(item, (list, tuple)):
        try:
            item = np.asarray(item)
        except (TypeError, ValueError):
            return None
    if not isinstance(item, np.ndarray) or item.dtype.kind not in "biuf":
        return None
    item = np.ascontiguousarray(item)
    return f"{item.dtype.str}{item.shape}".encode(), memoryview(item.reshape(-1).view(np.uint8))


def encoder_key(item: Any, salt: bytes) -> bytes | None:
    """Content hash of an encoder input (None: not cacheable), salted with what else decides the
    encoder's output (model, dtype, layout: see ``Engine``)."""
    data = content_bytes(item)
    return None if data is None else _digest(b"enc", salt, *data)


def block_hash(parent: bytes, tokens: Sequence[int]) -> bytes:
    """Key of a full decoder block: its parent's key (the encoder key for block 0) and its tokens."""
    return _digest(b"dec", parent, np.asarray(tokens, np.int64).tobytes())


def prompt_block_hashes(encoder_key: bytes, tokens: Sequence[int], block_size: int) -> list[bytes]:
    """The hash chain of every full block of ``tokens``."""
    out, parent = [], encoder_key
    for i in range(len(tokens) // block_size):
        parent = block_hash(parent, tokens[i * block_size : (i + 1) * block_size])
        out.append(parent)
    return out


@dataclass
class PrefixCacheCounters:
    hits: int = 0  # requests whose encoder output was cached (or being written this step)
    misses: int = 0  # requests with a cacheable encoder input that ran the encoder
    evictions: int = 0  # cached entries (cross or decoder) dropped to make room
    encoder_tokens_saved: int = 0  # encoder positions of the hits
    prompt_tokens_saved: int = 0  # decoder prompt tokens whose K/V came from the cache


class PrefixCache:
    """The key tables and the LRU of evictable blocks; the ``BlockManager`` owns the reference
    counts and the plain free list and calls in here."""

    def __init__(self):
        self.entries: dict[bytes, list[int]] = {}  # key -> blocks (a cross entry or one decoder block)
        self.key_of: dict[int, bytes] = {}  # block -> the key of the entry it belongs to
        self.evictable: OrderedDict[int, None] = OrderedDict()  # unreferenced cached blocks, LRU first
        self.pending: set[bytes] = set()  # registered this step, written by this step's model run
        self.counters = PrefixCacheCounters()

    def __len__(self) -> int:
        return len(self.entries)

    def lookup(self, key: Hashable, ready_only: bool = False) -> list[int] | None:
        blocks = self.entries.get(key)
        if blocks is None or (ready_only and key in self.pending):
            return None
        return blocks

    def register(self, key: bytes, blocks: list[int]) -> None:
        """Tag freshly allocated (referenced) blocks as holding ``key``'s content, pending."""
        if key in self.entries:
            raise RuntimeError("prefix cache entry registered twice")
        self.entries[key] = list(blocks)
        for b in blocks:
            self.key_of[b] = key
        self.pending.add(key)

    def commit(self) -> None:
        """The step's model run wrote every pending entry."""
        self.pending.clear()

    def released(self, block: int) -> bool:
        """A block's last reference was dropped: keep it as evictable if it holds cached content
        (True) or let the caller return it to the plain free list (False)."""
        if block in self.key_of:
            self.evictable[block] = None  # most recently used end
            return True
        return False

    def revived(self, block: int) -> None:
        """An unreferenced cached block is referenced again (a hit)."""
        self.evictable.pop(block, None)

    def forget(self, key: bytes) -> list[int]:
        """Drop an entry; returns its blocks that were evictable (now plain free blocks)."""
        freed = []
        for b in self.entries.pop(key):
            del self.key_of[b]
            if b in self.evictable:
                del self.evictable[b]
                freed.append(b)
        self.pending.discard(key)
        return freed

    def evict(self) -> list[int]:
        """Drop the entry of the least recently used evictable block; returns the blocks freed
        (every block of an evictable entry is unreferenced: an entry's blocks are referenced
        together)."""
        block = next(iter(self.evictable))
        self.counters.evictions += 1
        return self.forget(self.key_of[block])

    def drop_pending(self) -> list[int]:
        """The step failed before writing its pending entries: forget them (their blocks' content
        is not there); returns the blocks already released, now plain free."""
        freed = []
        for key in list(self.pending):
            freed += self.forget(key)
        return freed
