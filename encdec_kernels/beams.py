"""A beam-search step launched ahead, on the device (``encdec_cli.engine``): ``beam_mask_hits`` and
``beam_chosen``, the running beams chosen among the candidates and the children they make;
``beam_children``, the children's attention tables and cache slots; ``ngram_bans``, the
no-repeat-n-gram rule from the rows' token history. Each replaces up to a few dozen small torch
ops (each a kernel launch and ~15 us of host time a step) by one launch whose shape depends on no
tensor value (no host sync, CUDA-graph safe).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from encdec_kernels.reference import BEAM_NEG_LARGE

_ROWS = 64  # rows per program of _children_kernel
_NGRAM_STARTS = 128  # n-gram starts per program of _ngram_kernel

# One compiled variant per engine and workload: the sizes change from step to step (rows as requests
# end, the history's width as they come and go) and a specialisation on their values (1, multiples
# of 16) or a block size from them would compile a variant in the middle of a run. (The block sizes
# left depend only on the model and the requests' parameters: the beam count, the stop tokens.)
_RUNTIME_ARGS = ("n", "n_reserved", "width", "stride_s", "stride_t", "bs", "num", "k", "vocab", "info_width",
                 "stride_l", "starts")  # fmt: skip


def _runtime(fn):
    """``triton.jit`` without specialising on the values of the arguments in ``_RUNTIME_ARGS``."""
    names = fn.__code__.co_varnames[: fn.__code__.co_argcount]
    return triton.jit(do_not_specialize=[a for a in _RUNTIME_ARGS if a in names])(fn)


@_runtime
def _children_kernel(
    SELF_TABLES, PARENTS, FORK, UP, TABLES, HERE, BLOCK, COPY, SLOTS, LENS,
    n, n_reserved, width, stride_s, stride_t, bs,
    ROWS: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    # reserved blocks taken by the rows before this program's (rows that need one, in order)
    before = tl.zeros([ROWS], dtype=tl.int32)
    for start in range(0, pid * ROWS, ROWS):
        r = start + tl.arange(0, ROWS)
        fresh_r = tl.load(UP + n + r) > 0  # (rows before this program's: all < n)
        before += ((tl.load(FORK + r) != 0) | fresh_r).to(tl.int32)
    before = tl.sum(before, 0)
    b = pid * ROWS + tl.arange(0, ROWS)
    ok = b < n
    pos = tl.load(UP + b, mask=ok, other=0)
    fresh = tl.load(UP + n + b, mask=ok, other=0) > 0
    needs = (fresh | (tl.load(FORK + b, mask=ok, other=0) != 0)) & ok
    parent = tl.load(PARENTS + b, mask=ok, other=0).to(tl.int64)
    take = before + tl.cumsum(needs.to(tl.int32), 0) - 1
    take = tl.minimum(tl.maximum(take, 0), tl.maximum(n_reserved - 1, 0))
    col, off = pos // bs, pos % bs
    here = tl.load(SELF_TABLES + parent * stride_s + col, mask=ok, other=0).to(tl.int64)
    block = tl.where(needs, tl.load(UP + 2 * n + take, mask=needs, other=0), here)
    for c0 in range(0, width, BLOCK_W):  # the parent's table row, with the new block at col
        cols = c0 + tl.arange(0, BLOCK_W)
        m2 = ok[:, None] & (cols[None, :] < width)
        vals = tl.load(SELF_TABLES + parent[:, None] * stride_s + cols[None, :], mask=m2, other=0)
        vals = tl.where(cols[None, :] == col[:, None], block[:, None].to(vals.dtype), vals)
        tl.store(TABLES + b[:, None].to(tl.int64) * stride_t + cols[None, :], vals, mask=m2)
    tl.store(HERE + b, here, mask=ok)
    tl.store(BLOCK + b, block, mask=ok)
    tl.store(COPY + b, (needs & ~fresh).to(tl.uint8), mask=ok)
    tl.store(SLOTS + b, block * bs + off, mask=ok)
    tl.store(LENS + b, (pos + 1).to(tl.int32), mask=ok)


def beam_children(self_tables, parents, fork, up, n: int, block_size: int):
    """The inputs of a beam step's ``n`` children chosen on the device
    (``ModelRunner.decode_children``).

    self_tables: [R, W] int32, the last step's rows' self-attention block tables; parents: [n] each
    child's row there; fork: [n] bool, the child is not its parent's first; up: int64
    [positions (n), new_block (n, > 0: the new token starts a block), reserved blocks (the pool's
    first free ones)]. A child that starts a block or forks takes the next reserved block (in row
    order) at its new position's column; the others keep the parent's block there.

    Returns (tables [n, W] int32, here [n] int64: the parent's block at the new position, block
    [n] int64: the child's, copy [n] bool: a fork, whose block starts as a copy of ``here``,
    slots [n] int64: the new token's cache slot, lens [n] int32: positions + 1)."""
    dev = up.device
    width = self_tables.shape[1]
    tables = torch.empty((n, width), dtype=self_tables.dtype, device=dev)
    here, block, slots = (torch.empty(n, dtype=torch.long, device=dev) for _ in range(3))
    copy = torch.empty(n, dtype=torch.bool, device=dev)
    lens = torch.empty(n, dtype=torch.int32, device=dev)
    if n:
        if self_tables.stride(1) != 1:
            self_tables = self_tables.contiguous()
        _children_kernel[(triton.cdiv(n, _ROWS),)](
            self_tables, parents, fork.view(torch.uint8), up, tables, here, block, copy.view(torch.uint8),
            slots, lens, n, up.numel() - 2 * n, width, self_tables.stride(0), tables.stride(0), block_size,
            ROWS=_ROWS, BLOCK_W=64,
        )  # fmt: skip
    return tables, here, block, copy, slots, lens


@_runtime
def _ngram_kernel(LOGITS, TOK, LEN, ROWS, stride_l, stride_t, starts, M: tl.constexpr,
                  HAS_ROWS: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    if HAS_ROWS:
        r = tl.load(ROWS + tl.program_id(0)).to(tl.int64)
    else:
        r = tl.program_id(0).to(tl.int64)
    length = tl.load(LEN + r).to(tl.int64)
    tok = TOK + r * stride_t
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    match = (i < length - M) & (i < starts)  # start i exists: i + M < length
    for j in tl.static_range(M):  # the n-gram at i begins with the row's last M tokens
        last = tl.load(tok + tl.maximum(length - M + j, 0))
        match &= tl.load(tok + i + j, mask=match, other=-1) == last
    banned = tl.load(tok + i + M, mask=match, other=0)
    tl.store(LOGITS + r * stride_l + banned, tl.full([BLOCK], float("-inf"), tl.float32), mask=match)


def ngram_bans(logits, tokens, lengths, n: int, rows=None) -> None:
    """transformers' no_repeat_ngram_size rule from the rows' token history, in place: a token that
    would complete an n-gram the row already has is set to -inf.

    logits: [B, V] float32; tokens: [B, T] int64 (each row's tokens, -1 after its end); lengths:
    [B] tokens per row; rows: [R] int64 (None: every row), the rows of ``logits`` (and of
    ``tokens`` / ``lengths``) the rule applies to. n-gram start i of a row (i + n - 1 < its length)
    whose first n - 1 tokens are the row's last n - 1 bans the token after them. Every write is the
    same -inf, so duplicate bans need no order."""
    m = n - 1
    starts = tokens.shape[1] - m
    count = logits.shape[0] if rows is None else rows.numel()
    if starts <= 0 or count == 0:
        return
    if logits.stride(1) != 1 or tokens.stride(1) != 1:
        raise ValueError("ngram_bans: logits and tokens must be contiguous along their last dim")
    _ngram_kernel[(count, triton.cdiv(starts, _NGRAM_STARTS))](
        logits, tokens, lengths, rows if rows is not None else lengths, logits.stride(0), tokens.stride(0),
        starts, M=m, HAS_ROWS=rows is not None, BLOCK=_NGRAM_STARTS,
    )  # fmt: skip


_NEG_LARGE = tl.constexpr(BEAM_NEG_LARGE)  # transformers' "impossible" beam score


@_runtime
def _mask_hits_kernel(P, INFO, OUT, num, k, vocab, info_width, S: tl.constexpr, BLOCK_K: tl.constexpr):
    g = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK_K)
    ok = c < k
    score = tl.load(P + g * k + c, mask=ok, other=0).to(tl.float32)
    tok = tl.load(P + (num + g) * k + c, mask=ok, other=0).to(tl.int64) % vocab
    hit = tl.zeros([BLOCK_K], dtype=tl.int1) | (tl.load(INFO + g * info_width) > 0)
    for s in tl.static_range(S):
        hit |= tok == tl.load(INFO + g * info_width + 1 + s)
    tl.store(OUT + g * k + c, score + tl.where(hit, _NEG_LARGE, 0.0), mask=ok)


def beam_mask_hits(packed, info, vocab: int):
    """Beam search's step 2 on the device: the candidates' scores, a hit's pushed down by 1e9
    (transformers' arithmetic: the N best that did not hit are then the N best of these).

    packed: [P, G, K] contiguous (``beam._candidates``: scores, flat indices beam * vocab + token,
    float32 or float64); info: [G, 1 + S] int64 (at the length limit (> 0), then the request's stop
    tokens, -1: none). Returns [G, K] float32."""
    _, num, k = packed.shape
    out = torch.empty((num, k), dtype=torch.float32, device=packed.device)
    if num:
        _mask_hits_kernel[(num,)](
            packed, info, out, num, k, vocab, info.shape[1], S=info.shape[1] - 1,
            BLOCK_K=triton.next_power_of_2(k),
        )  # fmt: skip
    return out


@_runtime
def _chosen_kernel(P, CHOSEN, CHOSEN_OUT, ROWS, TOKENS, FORK, num, k, n, vocab, BLOCK_N: tl.constexpr):
    g = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, BLOCK_N)
    ok = j < n
    chosen = tl.load(CHOSEN + g * n + j, mask=ok, other=0)
    flat = tl.load(P + (num + g) * k + chosen, mask=ok, other=0).to(tl.int64)
    parent = flat // vocab
    # a fork: an earlier child has the same parent (the first child takes the parent's blocks)
    same = (parent[:, None] == parent[None, :]) & (j[None, :] < j[:, None]) & ok[None, :]
    fork = tl.max(same.to(tl.int32), 1) > 0
    tl.store(CHOSEN_OUT + g * n + j, chosen.to(CHOSEN_OUT.dtype.element_ty), mask=ok)
    tl.store(ROWS + g * n + j, parent + g * n, mask=ok)
    tl.store(TOKENS + g * n + j, flat % vocab, mask=ok)
    tl.store(FORK + g * n + j, fork.to(tl.uint8), mask=ok)


def beam_chosen(packed, chosen, vocab: int):
    """The children of the N candidates chosen per request (``torch.topk`` of
    ``beam_mask_hits``), on the device.

    packed: as ``beam_mask_hits``; chosen: [G, N] int64 candidate indices. Returns (chosen in
    packed's dtype [G, N], for the host; then per child, request g's at rows g * N ...: its parent's
    row [G * N] int64 (request g's beams are rows g * N ...), its token [G * N] int64, whether it
    forks [G * N] bool: an earlier child of its request has the same parent)."""
    _, num, k = packed.shape
    n = chosen.shape[1]
    dev = packed.device
    out = torch.empty((num, n), dtype=packed.dtype, device=dev)
    rows, tokens = (torch.empty(num * n, dtype=torch.long, device=dev) for _ in range(2))
    fork = torch.empty(num * n, dtype=torch.bool, device=dev)
    if num:
        _chosen_kernel[(num,)](
            packed, chosen.contiguous(), out, rows, tokens, fork.view(torch.uint8), num, k, n, vocab,
            BLOCK_N=triton.next_power_of_2(n),
        )  # fmt: skip
    return out, rows, tokens, fork
