"""Fixed-size KV blocks from one pool, ref-counted, copy-on-write. Pure Python: no tensors.

One pool serves both decoder self-attention blocks (per sequence) and cross-attention blocks
(per request, shared by its beams). A cross block holds ``cross_block_rows`` encoder positions:
``block_size`` when it holds every layer's cross K/V of its tokens, more when it holds the
encoder output itself (absorbed cross-attention, see ``ModelRunner``).
"""

from __future__ import annotations

from collections import deque


class OutOfBlocks(Exception):
    """Raised when the pool cannot satisfy an allocation; the scheduler preempts and retries."""


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, cross_block_rows: int | None = None):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.cross_block_rows = cross_block_rows or block_size
        self.free_blocks: deque[int] = deque(range(num_blocks))
        self.refs = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def cross_blocks_for(self, encoder_len: int) -> int:
        return -(-encoder_len // self.cross_block_rows)

    def allocate(self, n: int) -> list[int]:
        if n > len(self.free_blocks):
            raise OutOfBlocks(f"need {n} blocks, {len(self.free_blocks)} free")
        out = [self.free_blocks.popleft() for _ in range(n)]
        for b in out:
            self.refs[b] = 1
        return out

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block; blocks reaching zero return to the pool."""
        for b in blocks:
            self.refs[b] -= 1
            if self.refs[b] == 0:
                self.free_blocks.append(b)
            elif self.refs[b] < 0:
                raise RuntimeError(f"block {b} freed twice")

    def share(self, blocks: list[int]) -> list[int]:
        """A new reference to the same blocks (beam fork, shared encoder output)."""
        for b in blocks:
            self.refs[b] += 1
        return list(blocks)

    def prepare_write(self, table: list[int], first_pos: int, end_pos: int) -> list[tuple[int, int]]:
        """Make ``table`` able to hold positions [first_pos, end_pos) for writing.

        Appends blocks as needed and replaces a shared block that will be written by a private
        copy (copy-on-write). Returns the (src, dst) block copies the runner must do first.
        All-or-nothing: raises OutOfBlocks without changing anything.
        """
        bs, refs, free = self.block_size, self.refs, self.free_blocks
        end_blk = -(-end_pos // bs)
        need_new = max(0, end_blk - len(table))
        cow = [i for i in range(first_pos // bs, min(len(table), end_blk)) if refs[table[i]] > 1]
        if need_new + len(cow) > len(free):
            raise OutOfBlocks(f"need {need_new + len(cow)} blocks, {len(free)} free")
        copies = []
        for i in cow:  # a private copy; the shared block keeps its other references
            src, dst = table[i], free.popleft()
            refs[dst] = 1
            refs[src] -= 1
            copies.append((src, dst))
            table[i] = dst
        for _ in range(need_new):
            b = free.popleft()
            refs[b] = 1
            table.append(b)
        return copies

    def truncate(self, table: list[int], num_tokens: int) -> None:
        """Keep only the blocks that hold positions [0, num_tokens) of ``table``; free the rest (the
        slots of rejected draft tokens, see engine/speculative.py)."""
        keep = self.blocks_for(num_tokens)
        if len(table) > keep:
            self.free(table[keep:])
            del table[keep:]
