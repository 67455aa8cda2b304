"""Fixed-size KV blocks from one pool, ref-counted, copy-on-write. Pure Python: no tensors.

One pool serves both decoder self-attention blocks (per sequence) and cross-attention blocks
(per request, shared by its beams). A cross block holds ``cross_block_rows`` encoder positions:
``block_size`` when it holds every layer's cross K/V of its tokens, more when it holds the
encoder output itself (absorbed cross-attention, see ``ModelRunner``).

With a ``PrefixCache`` (automatic prefix caching, see ``prefix_cache.py``) blocks holding cached
content stay cached after their last reference is dropped: they count as free, are handed out only
when no plain free block is left (least recently used entry first), and a hit references them
again (``acquire_cross``, ``acquire_prompt``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from encdec_cli.engine.prefix_cache import PrefixCache, prompt_block_hashes


class OutOfBlocks(Exception):
    """Raised when the pool cannot satisfy an allocation; the scheduler preempts and retries."""


class BlockManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        cross_block_rows: int | None = None,
        cache: PrefixCache | None = None,
    ):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.cross_block_rows = cross_block_rows or block_size
        self.free_blocks: deque[int] = deque(range(num_blocks))
        self.refs = [0] * num_blocks
        self.cache = cache

    @property
    def num_free(self) -> int:
        """Blocks an allocation can take: plain free ones and unreferenced cached ones."""
        return len(self.free_blocks) + (len(self.cache.evictable) if self.cache is not None else 0)

    def _take(self) -> int:
        """One free block: a plain one, else one of the least recently used cached entry's."""
        if not self.free_blocks:
            self.free_blocks.extend(self.cache.evict())  # the caller checked num_free
        b = self.free_blocks.popleft()
        self.refs[b] = 1
        return b

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def cross_blocks_for(self, encoder_len: int) -> int:
        return -(-encoder_len // self.cross_block_rows)

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise OutOfBlocks(f"need {n} blocks, {self.num_free} free")
        return [self._take() for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block; blocks reaching zero return to the pool."""
        for b in blocks:
            self.refs[b] -= 1
            if self.refs[b] == 0:
                if self.cache is None or not self.cache.released(b):
                    self.free_blocks.append(b)
            elif self.refs[b] < 0:
                raise RuntimeError(f"block {b} freed twice")

    def share(self, blocks: list[int]) -> list[int]:
        """A new reference to the same blocks (beam fork, a prefix cache hit)."""
        for b in blocks:
            if self.refs[b] == 0:
                self.cache.revived(b)
            self.refs[b] += 1
        return list(blocks)

    def prepare_write(self, table: list[int], first_pos: int, end_pos: int) -> list[tuple[int, int]]:
        """Make ``table`` able to hold positions [first_pos, end_pos) for writing.

        Appends blocks as needed and replaces a shared block that will be written by a private
        copy (copy-on-write). Returns the (src, dst) block copies the runner must do first.
        All-or-nothing: raises OutOfBlocks without changing anything.
        """
        bs, refs = self.block_size, self.refs
        end_blk = -(-end_pos // bs)
        need_new = max(0, end_blk - len(table))
        cow = [i for i in range(first_pos // bs, min(len(table), end_blk)) if refs[table[i]] > 1]
        if need_new + len(cow) > self.num_free:
            raise OutOfBlocks(f"need {need_new + len(cow)} blocks, {self.num_free} free")
        copies = []
        for i in cow:  # a private copy; the shared block keeps its other references
            src, dst = table[i], self._take()
            refs[src] -= 1
            copies.append((src, dst))
            table[i] = dst
        for _ in range(need_new):
            table.append(self._take())
        return copies

    # ---- prefix caching (a PrefixCache given) ----------------------------------------------------
    def acquire_cross(self, key: bytes | None, n: int) -> tuple[list[int], bool]:
        """``n`` cross blocks for an encoder input with cache key ``key`` (None: not cached):
        the cached entry's blocks, shared (True: no encoder run needed; its content is written by
        now or by this step's encoder run), or new blocks, registered under ``key`` (False)."""
        cache = self.cache
        if cache is None or key is None:
            return self.allocate(n), False
        blocks = cache.lookup(key)
        if blocks is not None and len(blocks) == n:
            cache.counters.hits += 1
            return self.share(blocks), True
        if blocks is not None:  # cannot happen for one model; never serve a wrong-sized entry
            self.free_blocks.extend(cache.forget(key))
        blocks = self.allocate(n)
        cache.counters.misses += 1
        cache.register(key, blocks)
        return blocks, False

    def acquire_prompt(
        self, key: bytes | None, tokens: Sequence[int], num_prompt: int
    ) -> tuple[list[int], int]:
        """A self-attention block table for ``tokens`` of a request whose encoder key is ``key``:
        the longest chain of written cached full blocks of ``tokens[:-1]`` (the last token is
        always computed: its logits are needed), shared, then new blocks; the new full blocks of
        the first ``num_prompt`` tokens are registered. Returns (table, tokens already cached)."""
        cache, bs = self.cache, self.block_size
        need = self.blocks_for(len(tokens))
        if cache is None or key is None:
            return self.allocate(need), 0
        hashes = prompt_block_hashes(key, tokens, bs)
        hit: list[int] = []
        for h in hashes[: (len(tokens) - 1) // bs]:
            blocks = cache.lookup(h, ready_only=True)
            if blocks is None:
                break
            hit += blocks
        table = self.share(hit)  # before allocating: an allocation may evict unreferenced blocks
        try:
            table += self.allocate(need - len(hit))
        except OutOfBlocks:
            self.free(table)
            raise
        for i in range(len(hit), num_prompt // bs):
            if cache.lookup(hashes[i]) is None:  # a twin admitted in this step registered it first
                cache.register(hashes[i], [table[i]])
        cache.counters.prompt_tokens_saved += len(hit) * bs
        return table, len(hit) * bs

    def commit_cached(self) -> None:
        """This step's model run was launched: its pending cache entries hold their content."""
        if self.cache is not None:
            self.cache.commit()

    def drop_pending(self) -> None:
        """This step failed before its model run: forget the entries it registered."""
        if self.cache is not None:
            self.free_blocks.extend(self.cache.drop_pending())

    def truncate(self, table: list[int], num_tokens: int) -> None:
        """Keep only the blocks that hold positions [0, num_tokens) of ``table``; free the rest (the
        slots of rejected draft tokens, see engine/speculative.py)."""
        keep = self.blocks_for(num_tokens)
        if len(table) > keep:
            self.free(table[keep:])
            del table[keep:]
