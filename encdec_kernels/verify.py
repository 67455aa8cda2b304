"""One kernel between two speculative verification steps launched back to back (the engine's
verification ahead, ``Engine._verify_ahead``): the greedy outcome of the step in flight and the
next step's inputs, on the device. In torch this took about 30 small operations a step, each a
kernel launch the host pays for while the GPU waits for it."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_RUNTIME_ARGS = (
    "BEST", "STARTS", "LAST_DRAFTS", "BASE", "KS", "CANDIDATES", "TABLES", "ROW_FIRST", "ROW_END",
    "ACCEPTED", "CHOSEN", "DRAFTS", "KV_LENS", "TOKENS", "POSITIONS", "SLOTS",
    "num_best", "last_k", "next_k", "width", "table_stride",
)  # fmt: skip


# One compiled variant an engine: no specialisation on the values (draft counts of 1, widths) or on
# the pointers' alignment (views into one upload), which change from step to step and would each
# compile a variant in the middle of a run.
@triton.jit(do_not_specialize=_RUNTIME_ARGS)
def _accept_next_kernel(
    BEST, STARTS, LAST_DRAFTS, BASE, KS, CANDIDATES, TABLES, ROW_FIRST, ROW_END,
    ACCEPTED, CHOSEN, DRAFTS, KV_LENS, TOKENS, POSITIONS, SLOTS,
    num_best, last_k, next_k, width, table_stride,
    BS: tl.constexpr, LAST_K: tl.constexpr, NEXT_K: tl.constexpr, ROWS: tl.constexpr,
):  # fmt: skip
    """One program per sequence: see ``accept_and_next``."""
    b = tl.program_id(0)
    start = tl.load(STARTS + b)
    j = tl.arange(0, LAST_K)
    d = tl.load(LAST_DRAFTS + b * last_k + j, mask=j < last_k, other=-1)
    g = tl.load(BEST + tl.minimum(start + j, num_best - 1), mask=j < last_k, other=-2)
    m = tl.min(tl.where(d != g, j, LAST_K), axis=0)  # the first draft that is not the argmax (-1 never is)
    m = tl.minimum(m, last_k).to(tl.int64)
    t = tl.load(BEST + start + m)
    tl.store(ACCEPTED + b, m)
    tl.store(CHOSEN + b, t)
    k = tl.load(KS + b)
    first_pos = tl.load(BASE + b) + m
    i = tl.arange(0, NEXT_K)
    nxt = tl.load(CANDIDATES + b * width + tl.minimum(m + i, width - 1), mask=i < k, other=-1)
    tl.store(DRAFTS + b * next_k + i, nxt, mask=i < next_k)
    tl.store(KV_LENS + b, (first_pos + k + 1).to(tl.int32))
    end = tl.load(ROW_END + b)
    r = tl.load(ROW_FIRST + b) + tl.arange(0, ROWS)
    inside = r < end
    jj = r - (end - 1 - k)  # the row's input: 0 the chosen token, then the drafts; < 0 padding
    real = inside & (jj >= 0)
    col = tl.minimum(tl.maximum(m + jj - 1, 0), width - 1)
    tok = tl.load(CANDIDATES + b * width + col, mask=real & (jj > 0), other=0)
    tok = tl.where(jj == 0, t, tok)
    pos = tl.where(real, first_pos + jj, first_pos)
    blk = tl.load(TABLES + b * table_stride + pos // BS, mask=real, other=0)
    slot = tl.where(real, blk.to(tl.int64) * BS + pos % BS, -1)
    tl.store(TOKENS + r, tok, mask=inside)
    tl.store(POSITIONS + r, pos, mask=inside)
    tl.store(SLOTS + r, slot, mask=inside)


def accept_and_next(
    best, starts, last_drafts, base, ks, candidates, tables, block_size, row_first, row_end,
    tokens, positions, slots, next_k: int, rows: int, max_rows: int,
):  # fmt: skip
    """The greedy outcome of a verification step and the inputs of the step after it, in one
    kernel (no host sync; safe to queue before the outcome is known on the host).

    best [T] int64: the argmax of every row of the step (sequence b's from starts[b], one more than
    its drafts); last_drafts [B, KL] int64: those drafts, -1 past each sequence's. Sequence b takes
    accepted[b] drafts (those before the first that is not the argmax) and chosen[b], the argmax
    after them. The next step's inputs of sequence b: chosen[b] at position base[b] + accepted[b],
    then ks[b] drafts candidates[b, accepted[b] + i] ([B, W] int64: the drafts for every
    outcome), in rows row_first[b] .. row_end[b] of tokens / positions / slots ([*] int64,
    written in place): its inputs in the last ks[b] + 1 of them, padding rows before them (token
    0, the chosen token's position, slot -1). Slots from tables [B, width] int32 (block ids) and
    ``block_size``. ``next_k``: max(ks) (known on the host); ``rows``: the most rows a sequence;
    ``max_rows``: a bound on rows, KL + 1 and next_k + 1 that stays the same for every call of an
    engine (K + 1): the kernel's tile sizes, so that it compiles once.
    starts, base, ks, row_first, row_end: [B] int64. Returns (accepted [B], chosen [B], the next
    drafts [B, next_k] (-1 past each row's), the next key counts [B] int32: the last input's
    position + 1)."""
    n, dev = len(ks), best.device
    accepted = torch.empty(n, dtype=torch.long, device=dev)
    chosen = torch.empty(n, dtype=torch.long, device=dev)
    drafts = torch.empty((n, next_k), dtype=torch.long, device=dev)
    kv_lens = torch.empty(n, dtype=torch.int32, device=dev)
    if n == 0:
        return accepted, chosen, drafts, kv_lens
    last_k, width = last_drafts.shape[1], candidates.shape[1]
    if max(rows, last_k + 1, next_k + 1) > max_rows:
        raise ValueError(
            f"accept_and_next: rows {rows}, {last_k} and {next_k} drafts exceed max_rows {max_rows}"
        )
    tile = triton.next_power_of_2(max(max_rows - 1, 1))
    _accept_next_kernel[(n,)](
        best, starts, last_drafts, base, ks, candidates, tables, row_first, row_end,
        accepted, chosen, drafts, kv_lens, tokens, positions, slots,
        best.numel(), last_k, next_k, width, tables.stride(0),
        BS=block_size, LAST_K=tile, NEXT_K=tile, ROWS=triton.next_power_of_2(max_rows), num_warps=1,
    )  # fmt: skip
    return accepted, chosen, drafts, kv_lens
