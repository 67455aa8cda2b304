"""``accept_and_next``: a verification step's greedy outcome and the next step's inputs in one
kernel (the engine's verification ahead), the Triton kernel in the interpreter and the reference
against a plain loop, in both layouts (packed rows; q rows a sequence with padding first)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from encdec_kernels import reference

BS, WIDTH = 4, 8  # block size, table columns


def _case(seed: int, q: int | None):
    """Random steps: per sequence 0-4 drafts in flight (some accepted, some not), 0-3 next drafts."""
    rng, pick = np.random.default_rng(seed), random.Random(seed)
    n = 8
    last_lens = rng.integers(0, 5, n)
    starts = np.concatenate([[0], np.cumsum(last_lens + 1)[:-1]])
    best = rng.integers(0, 50, int((last_lens + 1).sum()))
    last = np.full((n, max(last_lens.max(), 1)), -1)
    for b, k in enumerate(last_lens.tolist()):  # drafts agreeing with the argmax up to a random point
        keep = pick.randint(0, k)
        row = best[starts[b] : starts[b] + k].copy()
        row[keep:] = (row[keep:] + 1 + rng.integers(0, 3, k - keep)) % 50  # wrong from there
        last[b, :k] = row
    ks = rng.integers(0, 4, n)
    base = rng.integers(1, 10, n)
    cand = rng.integers(0, 50, (n, int(last_lens.max() + ks.max()) + 1))
    tables = rng.permutation(200)[: n * WIDTH].reshape(n, WIDTH).astype(np.int32)
    if q is None:  # packed
        row_end = np.cumsum(ks + 1)
        row_first = row_end - ks - 1
    else:
        row_first, row_end = np.arange(n) * q, np.arange(1, n + 1) * q
    return best, starts, last, last_lens, base, ks, cand, tables, row_first, row_end


def _expected(best, starts, last, last_lens, base, ks, cand, tables, row_first, row_end):
    """A plain loop: each sequence's outcome and its next rows."""
    rows = int(row_end[-1])
    tok, pos, slot = np.full(rows, -7), np.full(rows, -7), np.full(rows, -7)
    out = []
    for b in range(len(ks)):
        m = 0
        while m < last_lens[b] and last[b, m] == best[starts[b] + m]:
            m += 1
        t = best[starts[b] + m]
        drafts = [cand[b, m + i] for i in range(ks[b])]
        p0 = base[b] + m
        real = [t] + drafts
        pad = row_end[b] - row_first[b] - len(real)
        for r in range(row_first[b], row_end[b]):
            j = r - row_first[b] - pad
            if j < 0:
                tok[r], pos[r], slot[r] = 0, p0, -1
            else:
                p = p0 + j
                tok[r], pos[r], slot[r] = real[j], p, tables[b, p // BS] * BS + p % BS
        out.append((m, t, drafts, p0 + ks[b] + 1))
    return out, tok, pos, slot


@pytest.mark.parametrize("q", [None, 5], ids=["packed", "graph-rows"])
@pytest.mark.parametrize("seed", range(4))
def test_accept_and_next_matches_a_loop(verify, q, seed):
    case = _case(seed, q)
    best, starts, last, last_lens, base, ks, cand, tables, row_first, row_end = case
    want, tok, pos, slot = _expected(*case)
    assert any(m > 0 for m, *_ in want) and any(m < k for (m, *_), k in zip(want, last_lens))
    t = torch.from_numpy
    next_k = int(ks.max())
    rows = int((row_end - row_first).max())
    for impl in (verify, reference):
        bufs = [torch.full((int(row_end[-1]),), -7, dtype=torch.long) for _ in range(3)]
        accepted, chosen, drafts, kv = impl.accept_and_next(
            t(best), t(starts), t(last), t(base), t(ks), t(cand), t(tables), BS, t(row_first), t(row_end),
            *bufs, next_k, rows, 6,
        )  # fmt: skip
        name = impl.__name__
        assert accepted.tolist() == [w[0] for w in want], name
        assert chosen.tolist() == [w[1] for w in want], name
        assert kv.dtype == torch.int32 and kv.tolist() == [w[3] for w in want], name
        for b, w in enumerate(want):
            assert drafts[b, : ks[b]].tolist() == w[2] and (drafts[b, ks[b] :] == -1).all(), (name, b)
        assert bufs[0].tolist() == tok.tolist(), name
        assert bufs[1].tolist() == pos.tolist(), name
        assert bufs[2].tolist() == slot.tolist(), name
