"""Random inputs for the kernel-vs-reference tests (CPU interpreter and GPU)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from encdec_kernels.reference import RelBias

# Relative error bound ||out - ref|| / ||ref|| per dtype.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def cu_seqlens(lens, device) -> torch.Tensor:
    """[B+1] int32 offsets of packed sequences of the given lengths."""
    return torch.tensor(
        [0, *torch.tensor(lens, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int32, device=device
    )


def rel_bias(heads, bidirectional, device, num_buckets=32, max_distance=128, gen=None) -> RelBias:
    table = torch.randn(heads, num_buckets, generator=gen).to(device)
    return RelBias(table, num_buckets, max_distance, bidirectional)


@contextmanager
def poisoned_allocations():
    """Make torch.empty / torch.empty_like return NaN-filled float tensors, so any element a
    kernel fails to write shows up as NaN (also in internal buffers, e.g. split partials)."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    torch.empty = lambda *a, **k: poison(empty(*a, **k))
    torch.empty_like = lambda *a, **k: poison(empty_like(*a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like


def randn(shape, dtype, device, gen=None) -> torch.Tensor:
    """Normal samples; from ``gen`` (a CPU generator) if given, else drawn on the device."""
    if gen is not None:
        return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    return torch.randn(shape, device=device).to(dtype)


def varlen_inputs(lens, heads, head_dim, dtype, device, fused=False, gen=None):
    """q, k, v [T, H, D] and cu_seqlens for packed sequences; fused: views of one [T, 3, H, D]."""
    t = sum(lens)
    if fused:
        q, k, v = randn((t, 3, heads, head_dim), dtype, device, gen).unbind(1)
    else:
        q, k, v = (randn((t, heads, head_dim), dtype, device, gen) for _ in range(3))
    return q, k, v, cu_seqlens(lens, device)


@dataclass
class PagedCase:
    q: torch.Tensor  # [Tq, H, D]
    k_cache: torch.Tensor  # [NB, BS, H, D], unused blocks and slots NaN
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # [B, max_blocks] int32
    seq_lens: torch.Tensor  # [B] int32
    cu_seqlens_q: torch.Tensor  # [B+1] int32
    max_seqlen_q: int

    def args(self):
        return (
            self.q,
            self.k_cache,
            self.v_cache,
            self.block_tables,
            self.seq_lens,
            self.cu_seqlens_q,
            self.max_seqlen_q,
        )


def paged_inputs(
    seq_lens,
    q_lens,
    heads,
    head_dim,
    block_size,
    dtype,
    device,
    share=(),
    spare_blocks=3,
    extra_cols=1,
    gen=None,
) -> PagedCase:
    """A paged cache holding sequences of seq_lens keys, blocks shuffled over the pool.

    share: pairs (b, a) meaning sequence b uses sequence a's block table row (beams sharing
    cross blocks; b must have a's length). Unused blocks and unused slots stay NaN, and the
    table is padded with extra_cols columns of a NaN block, so any read past seq_len fails.
    """
    shared = dict(share)
    nblocks = [0 if b in shared else -(-n // block_size) for b, n in enumerate(seq_lens)]
    pool = sum(nblocks) + spare_blocks
    k_cache = torch.full((pool, block_size, heads, head_dim), float("nan"), dtype=dtype, device=device)
    v_cache = torch.full_like(k_cache, float("nan"))
    perm = torch.randperm(pool, generator=gen).tolist()
    width = max(1, max(-(-n // block_size) for n in seq_lens)) + extra_cols
    table = torch.full((len(seq_lens), width), perm[-1], dtype=torch.int32)  # perm[-1]: never filled
    used = 0
    for b, n in enumerate(seq_lens):
        if b in shared or n == 0:
            continue
        blocks = perm[used : used + nblocks[b]]
        used += nblocks[b]
        table[b, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        idx = torch.tensor(blocks, device=device)
        for cache in (k_cache, v_cache):
            rows = torch.full(
                (len(blocks) * block_size, heads, head_dim), float("nan"), dtype=dtype, device=device
            )
            rows[:n] = randn((n, heads, head_dim), dtype, device, gen)
            cache[idx] = rows.view(len(blocks), block_size, heads, head_dim)
    for b, a in shared.items():
        assert seq_lens[b] == seq_lens[a]
        table[b] = table[a]
    q = randn((sum(q_lens), heads, head_dim), dtype, device, gen)
    return PagedCase(
        q,
        k_cache,
        v_cache,
        table.to(device),
        torch.tensor(seq_lens, dtype=torch.int32, device=device),
        cu_seqlens(q_lens, device),
        max(q_lens),
    )


@dataclass
class SharedKVCase:
    q: torch.Tensor  # [Tq, H, d]
    rows: torch.Tensor  # [C, NB, BS, d], rows no sequence owns NaN
    block_tables: torch.Tensor  # [B, max_blocks] int32
    seq_lens: torch.Tensor  # [B] int32
    cu_seqlens_q: torch.Tensor  # [B+1] int32
    max_seqlen_q: int

    def args(self):
        return self.q, self.rows, self.block_tables, self.seq_lens, self.cu_seqlens_q, self.max_seqlen_q


def shared_kv_inputs(
    seq_lens,
    q_lens,
    heads,
    width,
    chunks,
    block_size,
    dtype,
    device,
    share=(),
    spare_blocks=2,
    pad_rows=0,
    gen=None,
) -> SharedKVCase:
    """A row cache [chunks, NB, block_size, width] holding sequences of seq_lens rows in shuffled
    blocks of chunks * block_size rows (see encdec_kernels.shared_kv_attention). share: pairs (b, a),
    sequence b reads sequence a's table row (beams). Unused rows and a padding table column point
    at NaN, so any read past seq_len fails. pad_rows: the cache is a strided view, pad_rows NaN
    rows after each chunk (as the engine's pool when heads * head_dim != d_model)."""
    shared = dict(share)
    per_block = chunks * block_size
    nblocks = [0 if b in shared else -(-n // per_block) for b, n in enumerate(seq_lens)]
    pool = sum(nblocks) + spare_blocks
    base = torch.full((chunks, pool, block_size + pad_rows, width), float("nan"), dtype=dtype, device=device)
    rows = base[:, :, :block_size]
    perm = torch.randperm(pool, generator=gen).tolist()
    table = torch.full((len(seq_lens), max(1, max(nblocks)) + 1), perm[-1], dtype=torch.int32)
    used = 0
    for b, n in enumerate(seq_lens):
        if b in shared or n == 0:
            continue
        blocks = perm[used : used + nblocks[b]]
        used += nblocks[b]
        table[b, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        vals = torch.full((len(blocks) * per_block, width), float("nan"), dtype=dtype, device=device)
        vals[:n] = randn((n, width), dtype, device, gen)
        rows[:, torch.tensor(blocks, device=device)] = vals.view(
            len(blocks), chunks, block_size, width
        ).transpose(0, 1)
    for b, a in shared.items():
        table[b] = table[a]
    q = randn((sum(q_lens), heads, width), dtype, device, gen)
    return SharedKVCase(
        q,
        rows,
        table.to(device),
        torch.tensor(seq_lens, dtype=torch.int32, device=device),
        cu_seqlens(q_lens, device),
        max(q_lens),
    )


def hopper_shared_kv_inputs(lens, q_lens, heads, width, chunks, dtype, device) -> SharedKVCase:
    """shared_kv_inputs as the engine makes them for encdec_kernels/shared_kv_hopper.py: q a view of
    [H, Tq, d] (the layer's bmm), zeros after each sequence's rows to the end of its 64-row tile
    (ModelRunner._zero_tile_ends: the kernel loads whole tiles); rows further on stay NaN."""
    case = shared_kv_inputs(lens, q_lens, heads, width, chunks, 16, dtype, device)
    for b, n in enumerate(lens):
        for p in range(n, min(-(-n // 64) * 64, case.block_tables.shape[1] * chunks * 16)):
            blk, r = case.block_tables[b, p // (chunks * 16)], p % (chunks * 16)
            case.rows[r // 16, blk, r % 16] = 0
    case.q = case.q.transpose(0, 1).contiguous().transpose(0, 1)
    return case
